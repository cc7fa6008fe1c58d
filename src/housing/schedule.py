"""Cron scheduling helpers: parse/validate 5-field expressions, compute next runs, and
install an idempotent, marker-tagged line into a crontab (system or plain file).

Semantics follow Vixie/cronie cron: ``*``, lists, ranges, ``*/n`` and ``a-b/n`` steps,
month and weekday names, weekday ``7`` = Sunday, and the day rule "if day-of-month and
day-of-week are both restricted (neither starts with ``*``), a day matching *either*
runs; otherwise both must match".  ``@hourly``/``@daily``/``@midnight``/``@weekly``/
``@monthly``/``@yearly``/``@annually`` are accepted.  Nothing happens at import time.
"""

from __future__ import annotations

import calendar
import os
import re
import shlex
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Final, Protocol, TypedDict

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

_FIELDS: Final[tuple[tuple[str, int, int], ...]] = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
)
_MONTH_NAMES: Final = {
    name: i
    for i, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_DOW_NAMES: Final = {
    name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}
_MACROS: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Longest days per month (leap February) for the "can this ever match" check.
_MAX_DAYS: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_SEARCH_YEARS: Final = 400  # the Gregorian calendar repeats every 400 years
_MARKER_RE: Final = re.compile(r"^[A-Za-z0-9_.-]+$")
_TAG_RE: Final = re.compile(r"#\s*housing:(?P<marker>\S+)\s*$")


class CronError(ValueError):
    """Invalid cron expression; the message is one line naming config key and field."""


class CrontabError(RuntimeError):
    """Reading or writing the crontab failed."""


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression; weekdays use 0 = Sunday .. 6 = Saturday."""

    expr: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: tuple[int, ...]
    weekdays: frozenset[int]
    dom_star: bool
    dow_star: bool

    def day_matches(self, year: int, month: int, day: int) -> bool:
        """Whether cron would run on this calendar date (day fields and month only)."""
        if month not in self.months:
            return False
        cron_dow = (calendar.weekday(year, month, day) + 1) % 7
        return self._day_ok(day, cron_dow)

    def matches(self, moment: datetime) -> bool:
        """Whether ``moment``'s wall-clock minute is a scheduled minute."""
        return (
            moment.minute in self.minutes
            and moment.hour in self.hours
            and self.day_matches(moment.year, moment.month, moment.day)
        )

    def _day_ok(self, day: int, cron_dow: int) -> bool:
        in_dom = day in self.days
        in_dow = cron_dow in self.weekdays
        if self.dom_star or self.dow_star:
            return in_dom and in_dow
        return in_dom or in_dow

    def _days_in(self, year: int, month: int) -> list[int]:
        first_dow, ndays = calendar.monthrange(year, month)  # Monday = 0
        first_cron_dow = (first_dow + 1) % 7
        return [
            day for day in range(1, ndays + 1) if self._day_ok(day, (first_cron_dow + day - 1) % 7)
        ]


def _error(key: str, field: str, value: str, problem: str, expr: str) -> CronError:
    return CronError(f"{key}: field '{field}' value '{value}' {problem} in '{expr}'")


class _ValueOpts(TypedDict):
    lo: int
    hi: int
    names: dict[str, int]
    key: str
    expr: str


def _parse_value(
    token: str, field: str, *, lo: int, hi: int, names: dict[str, int], key: str, expr: str
) -> int:
    lowered = token.lower()
    if lowered in names:
        return names[lowered]
    if not token.isdigit():
        hint = f"; names allowed: {', '.join(names)}" if names else ""
        raise _error(key, field, token, f"is not a number{hint}", expr)
    value = int(token)
    if not lo <= value <= hi:
        raise _error(key, field, token, f"out of range {lo}-{hi}", expr)
    return value


def _parse_field(text: str, index: int, key: str, expr: str) -> set[int]:
    field, lo, hi = _FIELDS[index]
    names = _MONTH_NAMES if field == "month" else _DOW_NAMES if field == "day-of-week" else {}
    opts: _ValueOpts = {"lo": lo, "hi": hi, "names": names, "key": key, "expr": expr}
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise _error(key, field, text, "has an empty list element", expr)
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise _error(key, field, item, "has an invalid step (need an integer >= 1)", expr)
            step = int(step_text)
        if base == "*":
            start, end = lo, hi
        elif "-" in base:
            first, _, last = base.partition("-")
            if not first or not last:
                raise _error(key, field, item, "is not a valid range", expr)
            start = _parse_value(first, field, **opts)
            end = _parse_value(last, field, **opts)
            if start > end:
                raise _error(key, field, item, "is a reversed range", expr)
        else:
            if slash:
                raise _error(key, field, item, "uses a step without a range or '*'", expr)
            start = end = _parse_value(base, field, **opts)
        values.update(range(start, end + 1, step))
    if field == "day-of-week" and 7 in values:
        values.discard(7)
        values.add(0)
    return values


def parse_cron(expr: str, *, key: str = DEFAULT_CRON_KEY) -> CronSchedule:
    """Parse and validate a cron expression; raise :class:`CronError` on any problem."""
    if not isinstance(expr, str):
        raise CronError(f"{key}: expected a cron expression string, got {expr!r}")
    original = expr.strip()
    if "\n" in original or "\r" in original:
        raise CronError(f"{key}: cron expression must be a single line, got {expr!r}")
    text = _MACROS.get(original.lower(), original)
    if text.startswith("@"):
        raise CronError(
            f"{key}: unsupported macro '{original}' (use one of {', '.join(_MACROS)}) "
            f"in '{original}'"
        )
    parts = text.split()
    if len(parts) != len(_FIELDS):
        raise CronError(
            f"{key}: expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)} in '{original}'"
        )
    sets = [_parse_field(part, i, key, original) for i, part in enumerate(parts)]
    schedule = CronSchedule(
        expr=original,
        minutes=tuple(sorted(sets[0])),
        hours=tuple(sorted(sets[1])),
        days=frozenset(sets[2]),
        months=tuple(sorted(sets[3])),
        weekdays=frozenset(sets[4]),
        dom_star=parts[2].startswith("*"),
        dow_star=parts[4].startswith("*"),
    )
    # Day-of-month alone decides (AND with an unrestricted weekday): it must be able to
    # occur in at least one selected month, otherwise the job would silently never run.
    possible = any(d <= _MAX_DAYS[m - 1] for m in schedule.months for d in schedule.days)
    if schedule.dow_star and len(schedule.weekdays) == 7 and not possible:
        raise _error(
            key, "day-of-month", parts[2], f"never occurs in month(s) '{parts[3]}'", original
        )
    return schedule


def validate_cron(expr: str, *, key: str = DEFAULT_CRON_KEY) -> str:
    """Return the stripped expression if valid, else raise :class:`CronError`."""
    return parse_cron(expr, key=key).expr


def _iter_wall_times(schedule: CronSchedule, after: datetime) -> Iterator[datetime]:
    """Naive wall-clock matches strictly after the naive minute-floored ``after``."""
    first = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start_date = (first.year, first.month, first.day)
    for year in range(first.year, first.year + _SEARCH_YEARS + 1):
        for month in schedule.months:
            if (year, month) < start_date[:2]:
                continue
            for day in schedule._days_in(year, month):
                if (year, month, day) < start_date:
                    continue
                same_day = (year, month, day) == start_date
                for hour in schedule.hours:
                    if same_day and hour < first.hour:
                        continue
                    for minute in schedule.minutes:
                        if same_day and hour == first.hour and minute < first.minute:
                            continue
                        yield datetime(year, month, day, hour, minute)


def _localize(naive: datetime, tz: tzinfo) -> datetime | None:
    """Attach ``tz`` (fold=0); ``None`` if the wall time does not exist (DST gap)."""
    aware = naive.replace(tzinfo=tz)
    if aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) != naive:
        return None
    return aware


def next_runs(
    expr: str | CronSchedule,
    start: datetime,
    count: int = 5,
    *,
    key: str = DEFAULT_CRON_KEY,
) -> list[datetime]:
    """The next ``count`` run times strictly after ``start`` (timezone-aware, same tz).

    Matching uses ``start``'s wall clock.  Under DST, non-existent local times are
    skipped and ambiguous ones run once (first occurrence).  Whole months and days that
    cannot match are skipped, so sparse schedules (e.g. ``0 0 29 2 *``) are fast.
    """
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be timezone-aware (e.g. datetime.now(UTC))")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    schedule = expr if isinstance(expr, CronSchedule) else parse_cron(expr, key=key)
    tz = start.tzinfo
    start_utc = start.astimezone(UTC)
    # Start one hour early in wall time so a fold=1 start still sees later wall times.
    wall = start.replace(tzinfo=None) - timedelta(hours=1)
    runs: list[datetime] = []
    if count == 0:
        return runs
    for naive in _iter_wall_times(schedule, wall):
        aware = _localize(naive, tz)
        if aware is None or aware.astimezone(UTC) <= start_utc:
            continue
        runs.append(aware)
        if len(runs) == count:
            return runs
    raise CronError(
        f"{key}: '{schedule.expr}' has no run time within {_SEARCH_YEARS} years after "
        f"{start.isoformat()}"
    )


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
