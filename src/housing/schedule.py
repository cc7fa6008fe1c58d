"""Cron expressions and crontab lines: validate 5-field expressions and compute next runs
with croniter, and install an idempotent, marker-tagged line into a crontab (system or file).

Only standard crontab syntax is accepted: five fields of ``*``, numbers, month/weekday
names, lists, ranges and ``*/n`` / ``a-b/n`` steps, or a macro (``@daily``...). croniter's
extensions (seconds/year fields, ``L``, ``W``, ``#``, ``?``, ``H``, ``n/step``) and reversed
ranges (``5-1``, which croniter wraps around) are refused: the line goes into a real
crontab. As in cron, when both day fields are restricted a day matching either runs. Under
DST a wall time skipped by spring-forward runs right after the gap (``02:30`` -> ``03:00``);
one repeated by fall-back is listed twice.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, Protocol

from croniter import CroniterBadDateError, CroniterError, croniter

from housing.errors import HousingError
from housing.io import write_text

CRON_KEY: Final = "clearml.pipeline.schedule_cron"
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


class ScheduleError(HousingError):
    """The crontab (or the ClearML scheduler) could not be updated."""


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


# --------------------------------------------------------------------------- cron


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


def parse_cron(expr: str, *, key: str = CRON_KEY) -> CronSchedule:
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


def validate_cron(expr: str, *, key: str = CRON_KEY) -> str:
    """Return the stripped expression if valid, else raise :class:`CronError`."""
    return parse_cron(expr, key=key).expr


def next_runs(
    expr: str | CronSchedule, start: datetime, count: int = 5, *, key: str = CRON_KEY
) -> list[datetime]:
    """The next ``count`` run times strictly after ``start`` (croniter, ``start``'s wall
    clock and timezone; DST as in the module docstring)."""
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


def crontab_line(expr: str, command: str, marker: str) -> str:
    """A crontab line ``<expr> <command> # housing:<marker>`` (``%`` escaped for cron)."""
    schedule = parse_cron(expr)
    if not _MARKER_RE.match(marker):
        raise ValueError(f"marker must match [A-Za-z0-9_.-]+, got {marker!r}")
    command = command.strip()
    if not command or "\n" in command or "\r" in command:
        raise ValueError("command must be a non-empty single line")
    escaped = re.sub(r"(?<!\\)%", r"\\%", command)  # cron reads a bare % as a newline
    return f"{schedule.expr} {escaped} # housing:{marker}"


def _marker_of(line: str) -> str | None:
    stripped = line.strip()
    match = None if stripped.startswith("#") else _TAG_RE.search(stripped)
    return match.group("marker") if match else None


def install_line(crontab_text: str, line: str | None, marker: str) -> str:
    """The crontab text with ``line`` as the marker's only line, where its first one was
    (else appended); ``line=None`` removes the marker's lines. Other lines are kept."""
    if line is not None and ("\n" in line.strip() or _marker_of(line) != marker):
        raise ValueError(f"line must be a single crontab line tagged '# housing:{marker}'")
    lines = crontab_text.splitlines()
    ours = [i for i, existing in enumerate(lines) if _marker_of(existing) == marker]
    kept = [existing for existing in lines if _marker_of(existing) != marker]
    if line is not None:
        kept.insert(ours[0] if ours else len(kept), line.strip())
    return "\n".join(kept) + "\n" if kept else ""


class CrontabIO(Protocol):
    """The whole crontab text: ``read`` ("" if none) and ``write`` (replace)."""

    def read(self) -> str: ...

    def write(self, text: str) -> None: ...


@dataclass(frozen=True)
class FileCrontab:
    """A crontab kept in a plain file (tests, systems without cron)."""

    path: Path

    def read(self) -> str:
        """File contents, or "" if the file does not exist."""
        return self.path.read_text(encoding="utf-8") if self.path.is_file() else ""

    def write(self, text: str) -> None:
        """Atomically replace the file."""
        write_text(self.path, text)


@dataclass(frozen=True)
class SystemCrontab:
    """The user's crontab via the ``crontab`` binary (``crontab -l`` / ``crontab -``)."""

    binary: str = "crontab"
    timeout_sec: float = 10.0

    def _run(self, option: str, stdin: str | None = None) -> str:
        try:
            proc = subprocess.run(
                [self.binary, option],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout_sec,
                check=False,
            )
        except FileNotFoundError:
            raise ScheduleError(
                f"crontab: '{self.binary}' not found; install cron or use a crontab file instead"
            ) from None
        except subprocess.TimeoutExpired:
            raise ScheduleError(
                f"crontab: '{self.binary}' timed out after {self.timeout_sec:g}s"
            ) from None
        if proc.returncode == 0:
            return proc.stdout
        if option == "-l" and "no crontab" in proc.stderr.lower():
            return ""
        raise ScheduleError(f"crontab: crontab {option} failed: {' '.join(proc.stderr.split())}")

    def read(self) -> str:
        """``crontab -l``; "no crontab for <user>" counts as empty."""
        return self._run("-l")

    def write(self, text: str) -> None:
        """Install ``text`` with ``crontab -``."""
        self._run("-", stdin=text)


def install_schedule(io: CrontabIO, line: str | None, marker: str) -> bool:
    """Make ``line`` the marker's line (None: remove it); write only if that changes the
    crontab. Returns ``changed``."""
    current = io.read()
    updated = install_line(current, line, marker)
    if updated != current:
        io.write(updated)
    return updated != current


def write_schedule_file(path: Path, expr: str, runs: Sequence[datetime], command: str) -> Path:
    """Atomically write the schedule summary (expression, next runs in ISO, command)."""
    lines = [
        "# housing pipeline schedule (generated; do not edit)",
        f"{CRON_KEY}: {expr.strip()}",
        f"command: {command}",
        "next_runs:",
        *(f"  - {run.isoformat()}" for run in runs),
    ]
    write_text(path, "\n".join(lines) + "\n")
    return path
