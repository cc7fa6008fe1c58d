"""Local tracking stores are never silently replaced.

MLflow re-creates a ``sqlite:///`` store that is empty or missing, and a ledger that no
longer parses would be rewritten from scratch: either way the project's recorded runs
and registry decisions vanish without a word. :func:`check_stores` runs before any work
(stage trackers, ``housing compare``/``report``/``doctor``) and refuses such a store with
one line naming the file and how to repair it; it only reads (SQLite ``mode=ro``).

A store that does not exist yet is fine unless the project shows it recorded runs before
(``mlruns/`` artifacts or ``<db>.parents.json`` beside the database). Standard library
only: ``housing doctor`` imports this.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Final

from housing.errors import ArtifactError, first_line

if TYPE_CHECKING:
    from housing.config import Settings

#: Tables every MLflow SQLite store has (created with the store).
MLFLOW_TABLES: Final = frozenset({"experiments", "runs", "metrics", "params", "tags"})
#: ClearML ledgers kept in ``clearml.offline_dir`` (sync index, registry, champions).
CLEARML_LEDGERS: Final = ("imported.json", "registry.json", "champions.json")
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_BUSY_SEC: Final = 5.0  # another run may be writing: wait for its lock, never refuse on it


class StoreError(ArtifactError):
    """A local tracking store is empty, truncated or unreadable: refused, left as it is."""


def check_stores(
    settings: Settings,
    backends: Iterable[str] | None = None,
    *,
    root: Path | None = None,
    offline_dir: Path | None = None,
) -> None:
    """Refuse (:class:`StoreError`) a damaged local store of ``backends`` (default: the
    active ones): the MLflow store resolved against ``root`` (default ``settings.root``)
    and the ClearML ledgers in ``offline_dir`` (default ``clearml.offline_dir``)."""
    chosen = set(settings.tracking if backends is None else backends)
    if "mlflow" in chosen:
        check_mlflow_store(settings.mlflow.tracking_uri, root or settings.root)
    if "clearml" in chosen:
        check_clearml_store(offline_dir or settings.clearml.offline_dir)


def check_mlflow_store(tracking_uri: str, root: Path) -> None:
    """Raise :class:`StoreError` when :func:`mlflow_store_problem` finds one."""
    problem = mlflow_store_problem(tracking_uri, root)
    if problem is not None:
        raise StoreError(problem)


def check_clearml_store(offline_dir: Path) -> None:
    """Raise :class:`StoreError` when :func:`clearml_store_problem` finds one."""
    problem = clearml_store_problem(offline_dir)
    if problem is not None:
        raise StoreError(problem)


def sqlite_path(tracking_uri: str, root: Path) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to ``root``), else None."""
    from housing.tracking.mlflow import local_store_path

    if not tracking_uri.startswith("sqlite:///"):
        return None
    return local_store_path(tracking_uri, root)


def mlflow_store_problem(tracking_uri: str, root: Path) -> str | None:
    """Why the local SQLite store of ``tracking_uri`` must not be opened, or None.

    Refused: a file that is not an SQLite database, is truncated or fails to read, has
    tables but not MLflow's, or is empty/missing while ``mlruns/`` or
    ``<db>.parents.json`` show that the project recorded runs before.
    """
    db = sqlite_path(tracking_uri, root)
    if db is None:
        return None
    history = _history(db)
    try:
        size = db.stat().st_size
    except FileNotFoundError:
        return _refuse(db, "missing", history, moved_aside=False) if history else None
    except OSError as exc:
        return _refuse(db, f"unreadable ({_why(exc)})")
    if size == 0:
        return _refuse(db, "empty (0 bytes)", history) if history else None
    try:
        with db.open("rb") as fh:
            header = fh.read(100)
    except OSError as exc:
        return _refuse(db, f"unreadable ({_why(exc)})")
    if not header.startswith(_SQLITE_MAGIC):
        return _refuse(db, "not an SQLite database")
    if _hot_journal(db):
        return None  # a writer was killed mid-transaction: the next open rolls it back
    expected = _header_size(header)
    if expected is not None and size < expected:
        return _refuse(db, f"truncated ({size} of {expected} bytes)")
    try:
        tables = _tables(db)
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return None  # another run holds it: not damage
        return _refuse(db, f"unreadable ({_why(exc)})")
    except sqlite3.DatabaseError as exc:
        return _refuse(db, f"unreadable ({_why(exc)})")
    if not tables:
        return _refuse(db, "has no tables", history) if history else None
    missing = sorted(MLFLOW_TABLES - tables)
    if missing:
        return _refuse(db, f"not an MLflow store (no {', '.join(missing)} table)")
    return None


def clearml_store_problem(offline_dir: Path) -> str | None:
    """Why a ClearML ledger in ``offline_dir`` must not be used, or None: each one that
    exists must be a JSON object (an empty or cut-off file is refused, not rewritten)."""
    for name in CLEARML_LEDGERS:
        path = offline_dir / name
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            return _refuse_ledger(path, f"unreadable ({_why(exc)})")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            what = "empty" if not text.strip() else f"corrupt JSON ({exc.msg}, line {exc.lineno})"
            return _refuse_ledger(path, what)
        if not isinstance(data, dict):
            return _refuse_ledger(path, f"not a JSON object (a {type(data).__name__})")
    return None


def _history(db: Path) -> list[str]:
    """What beside ``db`` shows that the project recorded MLflow runs before."""
    found = []
    artifacts = db.parent / "mlruns"
    if artifacts.is_dir() and _any(artifacts.iterdir()):
        found.append(f"{artifacts.name}/")
    parents = db.with_name(db.name + ".parents.json")
    if parents.is_file():
        found.append(parents.name)
    return found


def _hot_journal(db: Path) -> bool:
    """A rollback journal left by a writer killed mid-transaction (a read-only open cannot
    roll it back, and the database may be mid-change until MLflow's next open does)."""
    journal = db.with_name(db.name + "-journal")
    try:
        return journal.stat().st_size > 0
    except OSError:
        return False


def _any(items: Iterable[object]) -> bool:
    return next(iter(items), None) is not None


def _header_size(header: bytes) -> int | None:
    """The database size the SQLite header records (page size x page count), if valid."""
    if len(header) < 100:
        return None
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The count is valid only when "version-valid-for" equals the change counter.
    if pages == 0 or header[92:96] != header[24:28]:
        return None
    return page_size * pages


def _tables(db: Path) -> set[str]:
    """The table names of ``db``, opened read-only (nothing is created or changed)."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=_BUSY_SEC)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        tables = {str(row[0]) for row in rows}
        if "runs" in tables:
            conn.execute("SELECT count(*) FROM runs").fetchone()  # reads the table's pages
        return tables
    finally:
        conn.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror).lower()
    return first_line(exc)


def _refuse(db: Path, what: str, history: list[str] | None = None, moved_aside: bool = True) -> str:
    since = f" but {' and '.join(history)} show recorded runs" if history else ""
    if moved_aside:
        fix = f"restore it from a backup, or move it aside (mv {db} {db}.bad) to start a new store"
    else:
        fix = f"restore it from a backup, or move {' and '.join(history or [])} aside to start anew"
    return f"MLflow store {db}: {what}{since}; refusing to use or re-create it: {fix}"


def _refuse_ledger(path: Path, what: str) -> str:
    return (
        f"ClearML ledger {path}: {what}; refusing to use or rewrite it: restore it from a "
        f"backup, or move it aside (mv {path} {path}.bad) to start a new one"
    )
