"""Cron scheduling helpers: validate 5-field expressions and compute next runs with
croniter, and install an idempotent, marker-tagged line into a crontab (system or file).

Only standard crontab syntax is accepted: five fields of ``*``, numbers, month/weekday
names, lists, ranges and ``*/n`` / ``a-b/n`` steps, or one of the macros
``@yearly``/``@annually``/``@monthly``/``@weekly``/``@daily``/``@midnight``/``@hourly``.
croniter's extensions (seconds/year fields, ``L``, ``W``, ``#``, ``?``, ``H``, ``n/step``)
are refused, as the line goes into a real crontab, and so are reversed ranges (``5-1``,
which croniter would read as wrapping around).  croniter checks and expands values,
ranges and names.  Day rule as in cron: if day-of-month and day-of-week both are restricted
(neither starts with ``*``), a day matching *either* runs, otherwise both must match.
Next runs follow croniter under DST: a wall time skipped by spring-forward runs at the
first instant after the gap (``02:30`` -> ``03:00``); one repeated by fall-back is
listed twice.  Nothing happens at import time.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol

from croniter import CroniterBadDateError, CroniterError, croniter

from housing.io import write_text

__all__ = [
    "DEFAULT_CRON_KEY",
    "CronError",
    "CronSchedule",
    "CrontabError",
    "CrontabIO",
    "FileCrontab",
    "SystemCrontab",
    "build_cron_command",
    "crontab_line",
    "find_line",
    "install_line",
    "install_schedule",
    "next_runs",
    "parse_cron",
    "remove_line",
    "uninstall_schedule",
    "validate_cron",
    "write_schedule_file",
]

DEFAULT_CRON_KEY: Final = "clearml.pipeline.schedule_cron"

_FIELDS: Final = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat"),
)
_MACROS: Final = "@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly"
# One standard list item: '*' or a value or a range, a step only after '*' or a range.
_ITEM: Final = r"(?:\*|(?:\d+|[a-z]{3})-(?:\d+|[a-z]{3}))(?:/\d+)?|\d+|[a-z]{3}"
_FIELD_RE: Final = re.compile(rf"(?:{_ITEM})(?:,(?:{_ITEM}))*", re.IGNORECASE)
_RANGE_RE: Final = re.compile(r"(\w+)-(\w+)")
_MARKER_RE: Final = re.compile(r"^[A-Za-z0-9_.-]+$")
_TAG_RE: Final = re.compile(r"#\s*housing:(?P<marker>\S+)\s*$")


class CronError(ValueError):
    """Invalid cron expression; the message is one line naming config key and field."""


class CrontabError(RuntimeError):
    """Reading or writing the crontab failed."""


@dataclass(frozen=True)
class CronSchedule:
    """A valid expression and croniter's expansion of it (weekdays 0 = Sunday .. 6)."""

    expr: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]
    day_or: bool  # both day fields restricted: a day matching either one runs


def _reason(exc: CroniterError) -> str:
    """croniter's message as one line, without its ``[expression]`` prefix."""
    last = (str(exc).strip().splitlines() or ["is not acceptable"])[-1]
    return re.sub(r"^\[[^]]*\]\s*", "", last)


def _probe(part: str, index: int) -> str:
    """An expression with ``part`` in field ``index`` and ``*`` elsewhere."""
    return " ".join(part if i == index else "*" for i in range(len(_FIELDS)))


def _number(token: str, index: int) -> int:
    """A value as cron orders it in a range: digits as written (weekday 7 stays 7)."""
    if token.isdigit():
        return int(token)
    return int(croniter.expand(_probe(token, index))[0][index][0])  # a name


def parse_cron(expr: str, *, key: str = DEFAULT_CRON_KEY) -> CronSchedule:
    """Validate and expand a cron expression; raise :class:`CronError` on any problem."""
    if not isinstance(expr, str):
        raise CronError(f"{key}: expected a cron expression string, got {expr!r}")
    original = expr.strip()
    if "\n" in original or "\r" in original:
        raise CronError(f"{key}: cron expression must be a single line, got {expr!r}")
    parts = original.split()
    if original.startswith("@"):
        if len(parts) != 1 or not croniter.is_valid(original):
            raise CronError(f"{key}: unsupported macro '{original}' (use one of {_MACROS})")
    elif len(parts) != len(_FIELDS):
        raise CronError(
            f"{key}: expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)} in '{original}'"
        )
    else:
        for index, (part, (field, allowed)) in enumerate(zip(parts, _FIELDS, strict=True)):
            try:
                if not _FIELD_RE.fullmatch(part):
                    raise CroniterError("is not standard cron syntax")
                croniter.expand(_probe(part, index))
                if any(_number(a, index) > _number(b, index) for a, b in _RANGE_RE.findall(part)):
                    raise CroniterError("is a reversed range")
            except CroniterError as exc:
                raise CronError(
                    f"{key}: field '{field}' value '{part}' {_reason(exc)} "
                    f"(allowed: {allowed}) in '{original}'"
                ) from None
    try:  # strict: a day-of-month that alone decides must occur in a selected month
        expanded, _ = croniter.expand(original, strict=parts[-1].startswith("*"))
    except CroniterError as exc:
        raise CronError(f"{key}: '{original}' {_reason(exc)}") from None
    minutes, hours, days, months, weekdays = [
        tuple(range(lo, hi + 1)) if values == ["*"] else tuple(int(v) for v in values)
        for values, (lo, hi) in zip(expanded, croniter.RANGES[:5], strict=True)
    ]
    day_or = len(parts) == 5 and not any(p.startswith("*") for p in parts[2:5:2])
    return CronSchedule(original, minutes, hours, days, months, weekdays, day_or)


def validate_cron(expr: str, *, key: str = DEFAULT_CRON_KEY) -> str:
    """Return the stripped expression if valid, else raise :class:`CronError`."""
    return parse_cron(expr, key=key).expr


def next_runs(
    expr: str | CronSchedule,
    start: datetime,
    count: int = 5,
    *,
    key: str = DEFAULT_CRON_KEY,
) -> list[datetime]:
    """The next ``count`` run times strictly after ``start`` (croniter; same tz as it).

    Matching uses ``start``'s wall clock; see the module docstring for DST.
    """
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be timezone-aware (e.g. datetime.now(UTC))")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    schedule = expr if isinstance(expr, CronSchedule) else parse_cron(expr, key=key)
    runs = croniter(schedule.expr, start, day_or=schedule.day_or)
    try:
        return [runs.get_next(datetime) for _ in range(count)]
    except CroniterBadDateError:
        raise CronError(
            f"{key}: '{schedule.expr}' has no run time within 50 years after {start.isoformat()}"
        ) from None


# --------------------------------------------------------------------------- crontab


def build_cron_command(
    project_dir: str | os.PathLike[str],
    argv: Sequence[str],
    log_path: str | os.PathLike[str] | None = None,
) -> str:
    """Shell command ``cd <dir> && <argv...> [>> <log> 2>&1]`` with proper quoting."""
    if not argv:
        raise ValueError("argv must not be empty")
    command = f"cd {shlex.quote(str(project_dir))} && {shlex.join(str(a) for a in argv)}"
    if log_path is not None:
        command += f" >> {shlex.quote(str(log_path))} 2>&1"
    return command


def crontab_line(expr: str, command: str, marker: str, *, key: str = DEFAULT_CRON_KEY) -> str:
    """A crontab line ``<expr> <command> # housing:<marker>`` (``%`` escaped for cron)."""
    schedule = parse_cron(expr, key=key)
    if not _MARKER_RE.match(marker):
        raise ValueError(f"marker must match [A-Za-z0-9_.-]+, got {marker!r}")
    command = command.strip()
    if not command or "\n" in command or "\r" in command:
        raise ValueError("command must be a non-empty single line")
    # cron turns an unescaped % into a newline (stdin); escape them.
    escaped = re.sub(r"(?<!\\)%", r"\\%", command)
    return f"{schedule.expr} {escaped} # housing:{marker}"


def _marker_of(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    match = _TAG_RE.search(stripped)
    return match.group("marker") if match else None


def find_line(crontab_text: str, marker: str) -> str | None:
    """The first crontab line tagged ``# housing:<marker>``, if any."""
    for line in crontab_text.splitlines():
        if _marker_of(line) == marker:
            return line
    return None


def install_line(current_crontab_text: str, line: str, marker: str) -> str:
    """Return crontab text with exactly one line for ``marker`` (idempotent).

    An existing line for the marker is replaced in place (duplicates are dropped);
    otherwise the line is appended.  Other lines are preserved verbatim.
    """
    if "\n" in line.strip() or _marker_of(line) != marker:
        raise ValueError(f"line must be a single crontab line tagged '# housing:{marker}'")
    out: list[str] = []
    placed = False
    for existing in current_crontab_text.splitlines():
        if _marker_of(existing) == marker:
            if not placed:
                out.append(line.strip())
                placed = True
            continue
        out.append(existing)
    if not placed:
        out.append(line.strip())
    return "\n".join(out) + "\n"


def remove_line(current_crontab_text: str, marker: str) -> str:
    """Return crontab text without lines tagged for ``marker``."""
    kept = [ln for ln in current_crontab_text.splitlines() if _marker_of(ln) != marker]
    return "\n".join(kept) + "\n" if kept else ""


class CrontabIO(Protocol):
    """Read/write the whole crontab text."""

    def read(self) -> str:
        """Current crontab text ("" if none)."""
        ...

    def write(self, text: str) -> None:
        """Replace the crontab with ``text``."""
        ...


class FileCrontab:
    """Crontab stored in a plain file (tests, systems without cron, /etc/cron.d-like use)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> str:
        """File contents, or "" if the file does not exist."""
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""

    def write(self, text: str) -> None:
        """Atomically replace the file."""
        write_text(self.path, text)


class SystemCrontab:
    """The user's crontab via the ``crontab`` binary (``crontab -l`` / ``crontab -``)."""

    def __init__(
        self, binary: str = "crontab", *, user: str | None = None, timeout_sec: float = 10.0
    ) -> None:
        self.binary = binary
        self.user = user
        self.timeout_sec = timeout_sec

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [self.binary, *(["-u", self.user] if self.user else []), *args]
        try:
            return subprocess.run(
                cmd,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout_sec,
                check=False,
            )
        except FileNotFoundError:
            raise CrontabError(
                f"'{self.binary}' not found; install cron or use a crontab file instead"
            ) from None
        except subprocess.TimeoutExpired:
            raise CrontabError(f"'{self.binary}' timed out after {self.timeout_sec:g}s") from None

    def read(self) -> str:
        """``crontab -l``; "no crontab for <user>" counts as empty."""
        result = self._run(["-l"])
        if result.returncode == 0:
            return result.stdout
        if "no crontab" in result.stderr.lower():
            return ""
        raise CrontabError(f"crontab -l failed: {' '.join(result.stderr.split())}")

    def write(self, text: str) -> None:
        """Install ``text`` with ``crontab -``."""
        result = self._run(["-"], stdin=text)
        if result.returncode != 0:
            raise CrontabError(f"crontab - failed: {' '.join(result.stderr.split())}")


def install_schedule(io: CrontabIO, line: str, marker: str) -> bool:
    """Install/replace the marker's line; write only if changed.  Returns ``changed``."""
    current = io.read()
    updated = install_line(current, line, marker)
    if updated == current:
        return False
    io.write(updated)
    return True


def uninstall_schedule(io: CrontabIO, marker: str) -> bool:
    """Remove the marker's line(s); write only if changed.  Returns ``changed``."""
    current = io.read()
    updated = remove_line(current, marker)
    if updated == current:
        return False
    io.write(updated)
    return True


def write_schedule_file(
    path: str | os.PathLike[str],
    expr: str,
    next_runs: Sequence[datetime],
    command: str,
    *,
    key: str = DEFAULT_CRON_KEY,
) -> Path:
    """Atomically write the schedule summary (expression, next runs in ISO, command)."""
    target = Path(path)
    lines = [
        "# housing pipeline schedule (generated; do not edit)",
        f"{key}: {expr.strip()}",
        f"command: {command}",
        "next_runs:",
        *(f"  - {run.isoformat()}" for run in next_runs),
    ]
    write_text(target, "\n".join(lines) + "\n")
    return target
