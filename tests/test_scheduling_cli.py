"""Pipeline scheduling: validation, next runs, idempotent crontab install, the cron-to-ClearML
mapping (checked with the SDK's own ScheduleJob) and the scheduler task re-run by an agent."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from housing.cli import schedule_lines
from housing.config import load_settings
from housing.errors import ConfigError
from housing.orchestration.scheduling import cron_command, schedule, scheduler_entries
from housing.schedule import FileCrontab, next_runs, parse_cron
from tests import test_orchestration_server as orch
from tests.conftest import CONF, PROJECT
from tests.fakes.clearml_api import FakeClearMLServer

NOW = datetime(2026, 3, 2, 5, 30, tzinfo=UTC)  # a Monday
server, repo = orch.server, orch.repo  # the fake ClearML server and a scratch checkout


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLEARML_API_ACCESS_KEY", raising=False)
    monkeypatch.delenv("CLEARML_API_SECRET_KEY", raising=False)


def test_invalid_cron_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(["clearml.pipeline.schedule_cron=0 25 * * *"], CONF, tmp_path)
    message = str(caught.value)
    assert message.startswith("clearml.pipeline.schedule_cron: ")
    assert "hour" in message and "\n" not in message
    assert not (tmp_path / "metrics" / "clearml_pipeline_schedule.txt").exists()


def test_next_runs_and_command_go_to_the_schedule_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = load_settings(["clearml.pipeline.schedule_cron=0 6 * * 1-5"], CONF, tmp_path)
    result = schedule(settings, install=False, now=NOW)
    assert result.mode == "crontab" and not result.changed
    assert [r.isoformat() for r in result.next_runs] == [
        "2026-03-02T06:00:00+00:00",
        "2026-03-03T06:00:00+00:00",
        "2026-03-04T06:00:00+00:00",
        "2026-03-05T06:00:00+00:00",
        "2026-03-06T06:00:00+00:00",
    ]
    python = tmp_path / ".venv" / "bin" / "python"
    expected = (
        f"cd {tmp_path} && {python if python.is_file() else sys.executable} "
        "scripts/clearml_pipeline.py >> metrics/clearml_pipeline_cron.log 2>&1"
    )
    assert result.command == expected
    text = result.schedule_file.read_text()
    assert result.schedule_file == tmp_path / "metrics" / "clearml_pipeline_schedule.txt"
    assert "clearml.pipeline.schedule_cron: 0 6 * * 1-5" in text
    assert f"command: {expected}" in text
    assert "  - 2026-03-06T06:00:00+00:00" in text
    assert result.crontab_line == f"0 6 * * 1-5 {expected} # housing:housing-pipeline"
    assert capsys.readouterr().out == ""  # only the command layer prints
    assert schedule_lines(result)[0] == result.crontab_line
    assert schedule_lines(result)[-1] == "crontab: not installed (add --install)"


def test_cron_command_quotes(tmp_path: Path) -> None:
    root = tmp_path / "my proj"
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").touch()
    cmd = cron_command(load_settings([], CONF, root))
    assert cmd == (
        f"cd '{root}' && '{root}/.venv/bin/python' scripts/clearml_pipeline.py"
        " >> metrics/clearml_pipeline_cron.log 2>&1"
    )


def test_install_is_idempotent_on_a_crontab_file(tmp_path: Path) -> None:
    crontab = FileCrontab(tmp_path / "crontab")
    crontab.write("MAILTO=ops@example.com\n15 * * * * /usr/bin/backup # housing:other\n")
    settings = load_settings([], CONF, tmp_path)
    first = schedule(settings, install=True, crontab=crontab, now=NOW)
    assert first.changed and first.installed
    text = crontab.read()
    second = schedule(settings, install=True, crontab=crontab, now=NOW)
    assert not second.changed
    assert crontab.read() == text
    lines = text.splitlines()
    assert lines[:2] == ["MAILTO=ops@example.com", "15 * * * * /usr/bin/backup # housing:other"]
    assert [ln for ln in lines if ln.endswith("# housing:housing-pipeline")] == [first.crontab_line]
    # a new expression replaces the line instead of adding one
    hourly = load_settings(["clearml.pipeline.schedule_cron=@hourly"], CONF, tmp_path)
    third = schedule(hourly, install=True, crontab=crontab, now=NOW)
    assert third.changed
    ours = [ln for ln in crontab.read().splitlines() if "housing:housing-pipeline" in ln]
    assert len(ours) == 1 and ours[0].startswith("@hourly cd ")


def test_script_entry_point(tmp_path: Path) -> None:
    crontab = tmp_path / "crontab"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    cmd = [sys.executable, str(PROJECT / "scripts" / "clearml_schedule.py"), "--config-dir"]
    cmd += [str(CONF), "--install", "--crontab-file", str(crontab)]
    ok = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "crontab: installed" in ok.stdout
    assert ok.stdout.splitlines()[0].endswith("# housing:housing-pipeline")
    assert crontab.read_text().count("# housing:housing-pipeline") == 1
    bad = subprocess.run(
        [*cmd, "clearml.pipeline.schedule_cron=* * *"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        .splitlines()[-1]
        .startswith("error: clearml.pipeline.schedule_cron: expected 5 fields")
    )


@pytest.mark.parametrize(
    ("expr", "entries"),
    [
        ("0 6 * * *", [{"minute": 0, "hour": 6, "day": 1}]),
        (
            "30 6,18 * * *",
            [{"minute": 30, "hour": 6, "day": 1}, {"minute": 30, "hour": 18, "day": 1}],
        ),
        ("15 * * * *", [{"minute": 15, "hour": 1}]),
        ("*/20 * * * *", [{"minute": m, "hour": 1} for m in (0, 20, 40)]),
        (
            "0 8 * * 6,0",
            [
                {"minute": 0, "hour": 8, "day": 1, "weekdays": ["sunday"]},
                {"minute": 0, "hour": 8, "day": 1, "weekdays": ["saturday"]},
            ],
        ),
        ("0 3 * * */7", [{"minute": 0, "hour": 3, "day": 1, "weekdays": ["sunday"]}]),
        ("0 3 * * 0-7", [{"minute": 0, "hour": 3, "day": 1}]),
        ("@hourly", [{"minute": 0, "hour": 1}]),
    ],
)
def test_cron_maps_to_taskscheduler_entries(expr: str, entries: list[dict[str, object]]) -> None:
    assert scheduler_entries(parse_cron(expr)) == entries


@pytest.mark.parametrize(
    "expr", ["0 6 * 1 *", "0 6 1 * 1", "0 3 1 * *", "@monthly", "*/5 6-18 * * *"]
)
def test_cron_a_taskscheduler_cannot_run_on_its_clock_is_refused(expr: str) -> None:
    with pytest.raises(ConfigError, match=r"^clearml\.pipeline\.schedule_cron: ") as caught:
        scheduler_entries(parse_cron(expr))
    assert "\n" not in str(caught.value) and expr in str(caught.value)


def _clearml_runs(entries: list[dict[str, Any]], start: datetime) -> list[datetime]:
    """The first five launches ClearML's own ScheduleJob computes for ``entries``, each
    launch 7 s late (as a real scheduler loop is)."""
    from clearml.automation.scheduler import ScheduleJob

    runs: list[datetime] = []
    for entry in entries:
        job = ScheduleJob(name="j", base_task_id="t", queue="q", starting_time=start, **entry)
        job.verify()
        for _ in range(5):
            run = job.next()
            assert run is not None
            runs.append(run)
            job._last_executed = run + timedelta(seconds=7)
            job._schedule_counter += 1
    return sorted(runs)[:5]


@pytest.mark.parametrize(
    "expr",
    [
        "*/20 * * * *",
        "*/7 * * * *",
        "5,10 * * * *",
        "0 8 * * 6,0",
        "*/15 6 * * 1-5",
        "0 * * * 1",
        "30 6,18 * * *",
        "@hourly",
        "@weekly",
        "0 0 * * 1",
    ],
)
@pytest.mark.parametrize(
    "start",
    [NOW, datetime(2026, 3, 7, 7, 0, 13, tzinfo=UTC), datetime(2026, 3, 8, 8, 0, tzinfo=UTC)],
)
def test_clearml_runs_what_the_schedule_file_lists(expr: str, start: datetime) -> None:
    cron = parse_cron(expr)
    assert _clearml_runs(scheduler_entries(cron), start) == list(next_runs(cron, start))


def test_missing_expression(tmp_path: Path) -> None:
    settings = load_settings(["~clearml.pipeline.schedule_cron"], CONF, tmp_path)
    with pytest.raises(ConfigError, match="schedule_cron: not set"):
        schedule(settings, install=False, now=NOW)


# --------------------------------------------------------------------------- on an agent


@pytest.mark.slow
@pytest.mark.integration
def test_agent_rerun_of_the_scheduler_task_runs_its_loop(
    server: FakeClearMLServer, repo: Path
) -> None:
    """What the services agent does with the registered scheduler task: run its recorded
    entry point with ``CLEARML_TASK_ID`` and nothing else; it must load its jobs and wait
    for the first run instead of exiting."""
    server.agent_completes = False  # no services agent: the scheduler stays queued
    first = orch._run(
        "clearml_schedule.py",
        ["--install", "clearml.pipeline.schedule_cron=*/20 * * * *"],
        repo,
        server,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    (scheduler,) = orch._tasks(server, "housing:pipeline-scheduler")
    entry = scheduler["script"]["entry_point"]
    argv = scheduler["hyperparams"]["Args"]["argv"]["value"]
    assert entry == "scripts/clearml_schedule.py"
    assert shlex.split(argv) == [
        "--install",
        "clearml.pipeline.schedule_cron=*/20 * * * *",
        "clearml.mode=online",
    ]
    server.reset_calls()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "HOUSING_"))}
    env.update(server.env(), HOME=str(repo.parent), CLEARML_TASK_ID=scheduler["id"])
    agent = subprocess.Popen(
        [sys.executable, entry],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        table: dict[str, list[Any]] = {}
        while not table and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            table = _schedule_table(server, scheduler["id"])
        assert agent.poll() is None, f"the scheduler task exited: {agent.communicate()[0][-3000:]}"
        assert table, "the scheduler loop reported no 'Schedule Tasks' table"
        assert table["name"] == [f"housing:pipeline #{i} (*/20 * * * *)" for i in (1, 2, 3)]
        # the SDK's table shows each value as text, 0 as empty
        assert (table["minute"], table["hour"]) == (["", "20", "40"], ["1", "1", "1"])
        assert set(table["queue"]) == {"default"}
        assert server.calls_to("tasks.enqueue") == []  # the agent did not re-register
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        agent.communicate(timeout=10)


def _schedule_table(server: FakeClearMLServer, task_id: str) -> dict[str, list[Any]]:
    """The TaskScheduler's own "Schedule Tasks" table plot (column -> values), once sent."""
    for event in server.events(task_id):
        if event.get("type") == "plot" and event.get("metric") == "Schedule Tasks":
            (table,) = json.loads(event["plot_str"])["data"]
            header, cells = table["header"]["values"], table["cells"]["values"]
            return dict(zip(header, cells, strict=True))
    return {}
