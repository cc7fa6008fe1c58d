"""Atomic writes, hashing and artifact I/O.

Every output is written to a temporary file in its directory, fsynced and renamed into
place: a failing stage never leaves a half-written file and the previous version
survives; a full disk is one :class:`DiskFullError` naming the file. Also the package's
one sha256, one inter-process file lock and one way to read what a short command printed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing.errors import ArtifactError, HousingError

if TYPE_CHECKING:
    import pandas as pd


#: errno values that mean "no room to write": the disk (or the quota) is full.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_SQLITE_FULL = "database or disk is full"


class DiskFullError(HousingError, OSError):
    """No space left writing a file; nothing half-written was left behind (an ``OSError``
    too, so handlers of write errors still catch it)."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or the error it wraps) is a full disk or quota (an ``OSError``, or
    SQLite's ``database or disk is full``)."""
    seen: BaseException | None = exc
    for _ in range(5):  # an SDK may wrap the OSError (raise ... from, or as __context__)
        if seen is None:
            return False
        if isinstance(seen, DiskFullError) or (
            isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS
        ):
            return True
        if type(seen).__name__ == "OperationalError" and _SQLITE_FULL in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def written_path(exc: BaseException) -> str | None:
    """The file a failed write was writing (a copy's destination), from ``exc`` or the
    ``OSError`` it wraps; None when no error in the chain names one."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, OSError) and (seen.filename2 or seen.filename):
            return str(seen.filename2 or seen.filename)
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full(path: str | os.PathLike[str] | None) -> DiskFullError:
    """The one-line error for a full disk while writing ``path`` (shown relative to the
    current directory when inside it)."""
    where = f" writing {relpath(path, Path.cwd())}" if path else ""
    return DiskFullError(f"disk full{where}: free space and rerun")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; fsync and rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched; a full
    disk raises :class:`DiskFullError` naming ``path``.
    """
    target = Path(path)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL with mode 0o666 honours the umask (mkstemp would make every output 0600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(target) from None
        raise


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any] | list[Any]) -> Path:
    """Atomically write ``data`` as indented, key-sorted JSON."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, turning a missing or corrupt file into an :class:`ArtifactError`."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{p}: file not found (run the stage that produces it)") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def write_csv(path: str | os.PathLike[str], frame: pd.DataFrame) -> Path:
    """Atomically write a DataFrame as CSV (header row, no index).

    Arrow writes the body (10x faster than pandas on a million rows, floats round-trip).
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    header = ",".join(_csv_field(str(c)) for c in frame.columns) + "\n"
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        fh.write(header.encode())
        pacsv.write_csv(table, fh, pacsv.WriteOptions(include_header=False))
    return Path(path)


def _csv_field(text: str) -> str:
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def relpath(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """``path`` relative to ``root`` when inside it (for records), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path))


def project_path(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """``path`` relative to the project ``root`` (``../`` when outside it), POSIX style.

    For versioned records and tracker params: never this machine's absolute path.
    """
    rel = os.path.relpath(Path(path).resolve(), Path(root).resolve())
    return Path(rel).as_posix()


def is_score(value: Any) -> bool:
    """A number a metrics file may hold (``bool`` is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def write_scores(path: str | os.PathLike[str], scores: Mapping[str, Any]) -> Path:
    """Atomically write a flat ``{name: number}`` score file; anything else is refused."""
    bad = sorted(k for k, v in scores.items() if not is_score(v))
    if bad:
        raise ArtifactError(f"{path}: not numbers, keep them in the .meta.json: {', '.join(bad)}")
    return write_json(path, dict(scores))


def read_scores(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read a flat ``{name: number}`` score file written by :func:`write_scores`."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(is_score(v) for v in data.values()):
        raise ArtifactError(
            f"{path}: not a flat {{name: number}} score file (re-run the stage that writes it)"
        )
    return {str(k): v for k, v in data.items()}


def read_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON object (a ``.meta.json`` record), refusing anything else."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: not a JSON object (re-run the stage that writes it)")
    return data


def file_md5(path: str | os.PathLike[str]) -> str:
    """MD5 of a file's bytes: the hash DVC 3 records for a file output."""
    return _file_digest(path, lambda: hashlib.md5(usedforsecurity=False))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes."""
    return _file_digest(path, hashlib.sha256)


def _file_digest(path: str | os.PathLike[str], digest: Callable[[], Any]) -> str:
    with Path(path).open("rb") as fh:
        return str(hashlib.file_digest(fh, digest).hexdigest())


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``filelock`` lock on ``path`` (created, with its directory).

    Excludes other processes and threads (each call opens its own lock). Yields True once
    held; with ``blocking=False``, False at once when someone else holds it.
    """
    from filelock import FileLock, Timeout

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        held = FileLock(path, timeout=-1 if blocking else 0).acquire()
    except Timeout:
        yield False
        return
    with held:
        yield True


def command_output(cmd: list[str], cwd: str | os.PathLike[str], timeout: float) -> str | None:
    """What ``cmd`` printed, or None when it failed or could not run."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode == 0:
            return proc.stdout
    return None


def save_model(path: str | os.PathLike[str], model: Any) -> str:
    """Atomically pickle ``model`` with joblib; return the file's sha256."""
    import joblib

    with atomic_path(path) as tmp:
        joblib.dump(model, tmp)
    return file_sha256(path)


def load_model(path: str | os.PathLike[str], expected_sha256: str | None) -> Any:
    """Load a joblib model after checking its sha256 against ``expected_sha256``.

    A mismatch, or no ``expected_sha256``, raises :class:`ArtifactError` before unpickling.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: model file not found (run the train stage)")
    if not expected_sha256:
        raise ArtifactError(f"{p}: no recorded sha256 to verify the model against")
    actual = file_sha256(p)
    if actual != expected_sha256:
        raise ArtifactError(
            f"{p}: sha256 {actual[:12]}... does not match the recorded {expected_sha256[:12]}...;"
            " refusing to unpickle (re-run the stage that wrote it)"
        )
    import joblib

    return joblib.load(p)
