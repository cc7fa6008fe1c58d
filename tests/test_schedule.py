"""housing.schedule: cron validation, next runs (croniter), crontab install, schedule file."""

from __future__ import annotations

import stat
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from housing import schedule as sch
from tests.helpers import find_line, uninstall_schedule


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "expr",
    [
        "0 6 * * *",
        "*/5 * * * *",
        "1-10/2 0,12 * * *",
        "0 0 1 jan,JUL *",
        "30 9 * * mon-fri",
        "0 0 * * 7",
        "0 0 * * 5-7",
        "0 0 * * 0-7/2",
        "0 0 1-1 oct-dec *",
        "0 0 29 2 *",
        "  15 3 * * sun  ",
        "@daily",
        "@HOURLY",
        "59 23 31 12 6",
    ],
)
def test_valid_expressions(expr: str) -> None:
    assert sch.validate_cron(expr) == expr.strip()


def test_parsed_sets() -> None:
    s = sch.parse_cron("1-10/3 */6 1,15 feb-apr mon-wed,7")
    assert s.minutes == (1, 4, 7, 10)
    assert s.hours == (0, 6, 12, 18)
    assert s.days == (1, 15)
    assert s.months == (2, 3, 4)
    assert s.weekdays == (0, 1, 2, 3)  # 7 folds into 0 = Sunday
    assert s.day_or  # both day fields restricted: either one runs
    assert sch.parse_cron("0 0 * * 7").weekdays == sch.parse_cron("0 0 * * sun").weekdays == (0,)
    every = sch.parse_cron("@daily")  # '*' expands to the whole range
    assert (len(every.minutes), every.hours, len(every.days)) == (1, (0,), 31)
    assert (len(every.months), len(every.weekdays), every.day_or) == (12, 7, False)
    assert not sch.parse_cron("0 0 13 * */2").day_or  # a field starting with '*': both


@pytest.mark.parametrize(
    ("expr", "needle"),
    [
        ("0 25 * * *", "field 'hour' value '25' is not acceptable, out of range (allowed: 0-23)"),
        ("60 * * * *", "field 'minute' value '60' is not acceptable, out of range (allowed: 0-59)"),
        ("* * 0 * *", "field 'day-of-month' value '0' is not acceptable, out of range"),
        ("* * 32 * *", "field 'day-of-month' value '32' is not acceptable, out of range"),
        ("* * * 13 *", "field 'month' value '13' is not acceptable, out of range"),
        ("* * * * 8", "field 'day-of-week' value '8' is not acceptable, out of range"),
        ("* * * foo *", "field 'month' value 'foo' is not acceptable (allowed: 1-12 or jan-dec)"),
        ("jan * * * *", "field 'minute' value 'jan' is not acceptable (allowed: 0-59)"),
        ("* * * * funday", "field 'day-of-week' value 'funday' is not standard cron syntax"),
        ("*/0 * * * *", "field 'minute' value '*/0' step '0' in field 0 is not acceptable"),
        ("*/x * * * *", "field 'minute' value '*/x' is not standard cron syntax"),
        ("5-1 * * * *", "field 'minute' value '5-1' is a reversed range (allowed: 0-59)"),
        ("* * * * sat-sun", "field 'day-of-week' value 'sat-sun' is a reversed range"),
        ("* * * dec-jan/2 *", "field 'month' value 'dec-jan/2' is a reversed range"),
        ("1/5 * * * *", "field 'minute' value '1/5' is not standard cron syntax"),
        ("-1 * * * *", "field 'minute' value '-1' is not standard cron syntax"),
        ("1,,2 * * * *", "field 'minute' value '1,,2' is not standard cron syntax"),
        # croniter extensions a crontab does not understand
        ("0 0 L * *", "field 'day-of-month' value 'L' is not standard cron syntax"),
        ("0 0 15W * *", "field 'day-of-month' value '15W' is not standard cron syntax"),
        ("0 0 * * 1#2", "field 'day-of-week' value '1#2' is not standard cron syntax"),
        ("0 0 ? * *", "field 'day-of-month' value '?' is not standard cron syntax"),
        ("H * * * *", "field 'minute' value 'H' is not standard cron syntax"),
        ("0 0 30 2 *", "'0 0 30 2 *' is not acceptable. Day(s) [30] can never occur in month"),
        ("0 0 31 4 */7", "Day(s) [31] can never occur in month(s) [4]"),
        ("0 0 * *", "expected 5 fields"),
        ("0 0 * * * *", "expected 5 fields"),  # no seconds field
        ("0 0 * * * * 2030", "expected 5 fields"),  # no year field
        ("", "expected 5 fields"),
        ("@reboot", "unsupported macro '@reboot' (use one of @yearly, "),
        ("@daily 5", "unsupported macro '@daily 5'"),
    ],
)
def test_invalid_expressions_name_key_and_field(expr: str, needle: str) -> None:
    with pytest.raises(sch.CronError) as info:
        sch.parse_cron(expr)
    message = str(info.value)
    assert message.startswith("clearml.pipeline.schedule_cron: ")
    assert needle in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_error_uses_caller_key() -> None:
    with pytest.raises(sch.CronError, match=r"^pipeline\.cron: field 'hour' value '24'"):
        sch.validate_cron("0 24 * * *", key="pipeline.cron")


def test_error_message_exact_example() -> None:
    with pytest.raises(sch.CronError) as info:
        sch.parse_cron("0 25 * * *")
    assert str(info.value) == (
        "clearml.pipeline.schedule_cron: field 'hour' value '25' is not acceptable, "
        "out of range (allowed: 0-23) in '0 25 * * *'"
    )


def test_non_string_and_multiline_are_refused() -> None:
    with pytest.raises(sch.CronError, match=r"^k: expected a cron expression string, got 5$"):
        sch.validate_cron(5, key="k")  # type: ignore[arg-type]
    with pytest.raises(sch.CronError, match=r"^k: cron expression must be a single line"):
        sch.validate_cron("0 6 * * *\n* * * * * rm -rf /", key="k")


def test_day_of_month_with_restricted_weekday_may_be_impossible_alone() -> None:
    # OR rule: Mondays in February run although February never has a 30th
    assert sch.next_runs("0 0 30 2 mon", _utc(2024, 1, 1), count=2) == [
        _utc(2024, 2, 5),
        _utc(2024, 2, 12),
    ]


# --------------------------------------------------------------------------- next runs


@pytest.mark.parametrize(
    ("expr", "start", "expected"),
    [
        (  # daily; start mid-minute just before the slot
            "0 6 * * *",
            _utc(2024, 1, 1, 5, 59) + timedelta(seconds=30),
            [_utc(2024, 1, d, 6, 0) for d in range(1, 6)],
        ),
        (  # strictly after start
            "*/15 * * * *",
            _utc(2024, 1, 1, 0, 0),
            [
                _utc(2024, 1, 1, 0, 15),
                _utc(2024, 1, 1, 0, 30),
                _utc(2024, 1, 1, 0, 45),
                _utc(2024, 1, 1, 1, 0),
                _utc(2024, 1, 1, 1, 15),
            ],
        ),
        (  # year rollover
            "30 23 31 12 *",
            _utc(2023, 12, 31, 23, 30),
            [_utc(y, 12, 31, 23, 30) for y in range(2024, 2029)],
        ),
        (  # 2024-03-01 is a Friday: weekdays of the following week
            "30 9 * * mon-fri",
            _utc(2024, 3, 1, 10, 0),
            [_utc(2024, 3, d, 9, 30) for d in (4, 5, 6, 7, 8)],
        ),
        (  # stepped range on day-of-month
            "0 0 1-10/3 * *",
            _utc(2024, 1, 1, 0, 0),
            [
                _utc(2024, 1, 4),
                _utc(2024, 1, 7),
                _utc(2024, 1, 10),
                _utc(2024, 2, 1),
                _utc(2024, 2, 4),
            ],
        ),
        (  # month names; Sunday as 7
            "0 12 * jan,jul 7",
            _utc(2024, 6, 15),
            [_utc(2024, 7, d, 12) for d in (7, 14, 21, 28)] + [_utc(2025, 1, 5, 12)],
        ),
        (  # leap day: 2100 is not a leap year
            "0 0 29 2 *",
            _utc(2096, 3, 1),
            [_utc(y, 2, 29) for y in (2104, 2108, 2112, 2116, 2120)],
        ),
    ],
)
def test_next_runs_hand_computed(expr: str, start: datetime, expected: list[datetime]) -> None:
    runs = sch.next_runs(expr, start, count=len(expected))
    assert runs == expected
    assert all(r.tzinfo is UTC for r in runs)


def test_leap_day_is_fast() -> None:
    t0 = time.perf_counter()
    runs = sch.next_runs("0 0 29 2 *", _utc(2023, 3, 1), count=5)
    elapsed = time.perf_counter() - t0
    assert runs == [_utc(y, 2, 29) for y in (2024, 2028, 2032, 2036, 2040)]
    assert elapsed < 0.2
    # AND-rule rarity (dow starts with '*'): Feb 29 that is a Sunday -> 2032, 2060
    t0 = time.perf_counter()
    assert sch.next_runs("0 0 29 2 */7", _utc(2024, 3, 1), count=2) == [
        _utc(2032, 2, 29),
        _utc(2060, 2, 29),
    ]
    assert time.perf_counter() - t0 < 0.2


def test_dom_dow_or_rule() -> None:
    # September 2024: the 1st is a Sunday, so Fridays are 6, 13, 20, 27; Oct 13 is a Sunday.
    runs = sch.next_runs("0 12 13 * 5", _utc(2024, 9, 1), count=7)
    assert runs == [
        _utc(2024, 9, 6, 12),
        _utc(2024, 9, 13, 12),  # both the 13th and a Friday: once
        _utc(2024, 9, 20, 12),
        _utc(2024, 9, 27, 12),
        _utc(2024, 10, 4, 12),
        _utc(2024, 10, 11, 12),
        _utc(2024, 10, 13, 12),  # 13th, not a Friday
    ]
    # With an unrestricted ('*'-prefixed) day-of-week, day-of-month alone decides.
    assert sch.next_runs("0 0 13 * *", _utc(2024, 9, 1), count=2) == [
        _utc(2024, 9, 13),
        _utc(2024, 10, 13),
    ]


def _matches(s: sch.CronSchedule, t: datetime) -> bool:
    in_dom, in_dow = t.day in s.days, t.isoweekday() % 7 in s.weekdays
    day = (in_dom or in_dow) if s.day_or else (in_dom and in_dow)
    return t.minute in s.minutes and t.hour in s.hours and t.month in s.months and day


def test_next_runs_agree_with_brute_force() -> None:
    start = _utc(2024, 2, 20, 13, 7)
    for expr in ["*/7 3-5 * * *", "0 0 1,15 * mon", "5 4 * * sun", "0 */8 28-31 * *"]:
        parsed = sch.parse_cron(expr)
        expected: list[datetime] = []
        t = start.replace(second=0) + timedelta(minutes=1)
        while len(expected) < 6:
            if _matches(parsed, t):
                expected.append(t)
            t += timedelta(minutes=1)
        assert sch.next_runs(parsed, start, count=6) == expected, expr


BERLIN = ZoneInfo("Europe/Berlin")


def _berlin(month: int, day: int, hour: int, minute: int = 0, fold: int = 0) -> datetime:
    return datetime(2024, month, day, hour, minute, fold=fold, tzinfo=BERLIN)


@pytest.mark.parametrize(
    ("expr", "start", "expected"),
    [
        # 2024-03-31 spring forward: 02:00-02:59 do not exist; like cron, the run is not
        # dropped but happens right after the gap, at 03:00 CEST.
        ("0 2 * * *", _berlin(3, 30, 12), [_berlin(3, 31, 3), _berlin(4, 1, 2)]),
        ("30 2 * * *", _berlin(3, 30, 12), [_berlin(3, 31, 3), _berlin(4, 1, 2, 30)]),
        # 2024-10-27 fall back: 02:00-02:59 happen twice (CEST, then CET); croniter lists both.
        (
            "0 2 * * *",
            _berlin(10, 26, 12),
            [_berlin(10, 27, 2), _berlin(10, 27, 2, fold=1), _berlin(10, 28, 2)],
        ),
        (
            "30 2 * * *",
            _berlin(10, 26, 12),
            [_berlin(10, 27, 2, 30), _berlin(10, 27, 2, 30, fold=1), _berlin(10, 28, 2, 30)],
        ),
        # starting inside the repeated hour (second pass) goes on to the next day
        ("30 2 * * *", _berlin(10, 27, 2, 40, fold=1), [_berlin(10, 28, 2, 30)]),
    ],
)
def test_next_runs_on_daylight_saving_days(
    expr: str, start: datetime, expected: list[datetime]
) -> None:
    runs = sch.next_runs(expr, start, count=len(expected))
    assert [r.astimezone(UTC) for r in runs] == [e.astimezone(UTC) for e in expected]
    assert [(r.isoformat(), r.fold) for r in runs] == [(e.isoformat(), e.fold) for e in expected]
    assert all(r.tzinfo is BERLIN for r in runs)


def test_next_runs_keeps_start_timezone() -> None:
    msk = timezone(timedelta(hours=3))
    runs = sch.next_runs("0 6 * * *", datetime(2024, 1, 1, 7, 0, tzinfo=msk), count=2)
    assert runs == [datetime(2024, 1, 2, 6, tzinfo=msk), datetime(2024, 1, 3, 6, tzinfo=msk)]
    assert runs[0].astimezone(UTC) == _utc(2024, 1, 2, 3)


def test_next_runs_rejects_naive_and_bad_count() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        sch.next_runs("0 6 * * *", datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="count"):
        sch.next_runs("0 6 * * *", _utc(2024, 1, 1), count=-1)
    assert sch.next_runs("0 6 * * *", _utc(2024, 1, 1), count=0) == []
    with pytest.raises(sch.CronError, match=r"custom\.key: field 'hour'"):
        sch.next_runs("0 99 * * *", _utc(2024, 1, 1), key="custom.key")
    never = sch.CronSchedule("0 0 30 2 *", (0,), (0,), (30,), (2,), tuple(range(7)), False)
    with pytest.raises(sch.CronError, match=r"^k: '0 0 30 2 \*' has no run time within 50 years"):
        sch.next_runs(never, _utc(2024, 1, 1), key="k")


# --------------------------------------------------------------------------- crontab


CMD = "cd /srv/housing && .venv/bin/python scripts/clearml_pipeline.py >> metrics/cron.log 2>&1"


def test_crontab_line_format_and_escaping() -> None:
    line = sch.crontab_line("0 6 * * *", CMD, "clearml_pipeline")
    assert line == f"0 6 * * * {CMD} # housing:clearml_pipeline"
    assert sch.crontab_line("@daily", "date +%F", "m") == r"@daily date +\%F # housing:m"
    with pytest.raises(sch.CronError):
        sch.crontab_line("0 25 * * *", CMD, "m")
    with pytest.raises(ValueError, match="marker"):
        sch.crontab_line("0 6 * * *", CMD, "bad marker")
    with pytest.raises(ValueError, match="single line"):
        sch.crontab_line("0 6 * * *", "echo a\necho b", "m")


def test_install_idempotent_on_crontab_file(tmp_path: Path) -> None:
    path = tmp_path / "crontab.txt"
    original = "MAILTO=ops@example.com\n# keep me\n*/5 * * * * /usr/bin/other-job\n"
    path.write_text(original)
    io = sch.FileCrontab(path)
    line = sch.crontab_line("0 6 * * *", CMD, "clearml_pipeline")

    assert sch.install_schedule(io, line, "clearml_pipeline") is True
    assert sch.install_schedule(io, line, "clearml_pipeline") is False  # second run: no-op
    text = path.read_text()
    assert text == original + line + "\n"
    assert text.count("housing:clearml_pipeline") == 1

    changed = sch.crontab_line("30 2 * * 1", CMD, "clearml_pipeline")
    assert sch.install_schedule(io, changed, "clearml_pipeline") is True
    lines = path.read_text().splitlines()
    assert lines[:3] == original.splitlines()  # other lines preserved, in order
    assert lines[3] == changed
    assert len(lines) == 4
    assert find_line(path.read_text(), "clearml_pipeline") == changed

    # a different marker is independent
    other = sch.crontab_line("0 0 * * *", "true", "other")
    sch.install_schedule(io, other, "other")
    assert find_line(path.read_text(), "clearml_pipeline") == changed

    assert uninstall_schedule(io, "clearml_pipeline") is True
    assert find_line(path.read_text(), "clearml_pipeline") is None
    assert uninstall_schedule(io, "clearml_pipeline") is False


def test_install_line_dedupes_and_handles_empty() -> None:
    line = "0 6 * * * run # housing:m"
    assert sch.install_line("", line, "m") == line + "\n"
    messy = "a\n1 1 * * * old # housing:m\nb\n2 2 * * * old2 # housing:m\n"
    assert sch.install_line(messy, line, "m") == f"a\n{line}\nb\n"
    # a similar but different marker and commented-out lines are left alone
    keep = "# 0 6 * * * run # housing:m\n0 1 * * * x # housing:m2\n"
    assert sch.install_line(keep, line, "m") == keep + line + "\n"
    with pytest.raises(ValueError, match="tagged"):
        sch.install_line("", "0 6 * * * run", "m")


def test_file_crontab_missing_is_empty(tmp_path: Path) -> None:
    io = sch.FileCrontab(tmp_path / "nested" / "crontab")
    assert io.read() == ""
    io.write("x\n")
    assert io.read() == "x\n"


def _fake_crontab(tmp_path: Path, script: str) -> str:
    binary = tmp_path / "crontab"
    binary.write_text("#!/bin/sh\n" + script)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return str(binary)


def test_system_crontab_with_fake_binary(tmp_path: Path) -> None:
    store = tmp_path / "store"
    script = (
        f'if [ "$1" = "-l" ]; then\n'
        f'  if [ -f "{store}" ]; then cat "{store}"; exit 0; fi\n'
        f'  echo "no crontab for tester" >&2; exit 1\n'
        f"fi\n"
        f'if [ "$1" = "-" ]; then cat > "{store}"; exit 0; fi\n'
        f"exit 2\n"
    )
    io = sch.SystemCrontab(_fake_crontab(tmp_path, script))
    assert io.read() == ""  # "no crontab for user" means empty
    line = sch.crontab_line("0 6 * * *", CMD, "clearml_pipeline")
    assert sch.install_schedule(io, line, "clearml_pipeline") is True
    assert sch.install_schedule(io, line, "clearml_pipeline") is False
    assert store.read_text() == line + "\n"


def test_system_crontab_errors(tmp_path: Path) -> None:
    failing = sch.SystemCrontab(_fake_crontab(tmp_path, 'echo "permission denied" >&2; exit 1\n'))
    with pytest.raises(sch.ScheduleError, match=r"^crontab: crontab -l failed: permission denied"):
        failing.read()
    with pytest.raises(sch.ScheduleError, match="permission denied"):
        failing.write("x\n")
    with pytest.raises(sch.ScheduleError, match="not found"):
        sch.SystemCrontab(str(tmp_path / "no-such-binary")).read()


# --------------------------------------------------------------------------- schedule file


def test_write_schedule_file_atomic(tmp_path: Path) -> None:
    target = tmp_path / "metrics" / "clearml_pipeline_schedule.txt"
    runs = sch.next_runs("0 6 * * *", _utc(2024, 1, 1), count=5)
    assert sch.write_schedule_file(target, "0 6 * * *", runs, CMD) == target
    text = target.read_text()
    assert text.splitlines() == [
        "# housing pipeline schedule (generated; do not edit)",
        "clearml.pipeline.schedule_cron: 0 6 * * *",
        f"command: {CMD}",
        "next_runs:",
        *(f"  - 2024-01-0{d}T06:00:00+00:00" for d in range(1, 6)),
    ]
    # rewriting replaces the file and leaves no temp files behind
    sch.write_schedule_file(target, "@daily", [], "true")
    assert "clearml.pipeline.schedule_cron: @daily" in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == [target.name]
