"""Ctrl-C, SIGTERM and kill -9 against real process trees, with real DVC and MLflow.

A scratch copy of the project whose gradient_boosting candidate trains for minutes, so
a signal always lands while it runs. Each contract: the exit code, every process gone
within 10 s, the runs KILLED in MLflow (failed in ClearML) and ``killed`` in the events
log, with a pipeline summary.

The restore race (a signal landing while ``signal.signal`` puts a default handler back) is
made deterministic with an LD_PRELOAD shim built with gcc; it also pins the text of
CPython's report that ``housing.quirks.signals`` keeps off the terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import run_tool
from tests.scratch import make_scratch_repo

#: The bound the issue sets for every child to be gone after a signal.
STOP_BOUND = 10.0
#: A dead worker is noticed and the run closed promptly (a bound of ours, not the issue's
#: 10 s for Ctrl-C/SIGTERM; it measured 11.3 s once on a host loaded 4x).
DEAD_WORKER_BOUND = 30.0
SLOW_MODEL = "gradient_boosting"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scratch project tracking to MLflow whose gradient_boosting train is very slow."""
    root = make_scratch_repo(tmp_path_factory.mktemp("signals"), defaults={"tracking": "mlflow"})
    slow = root / "conf" / "model" / f"{SLOW_MODEL}.yaml"
    slow.write_text(slow.read_text().replace("n_estimators: 300", "n_estimators: 200000"))
    forest = root / "conf" / "model" / "random_forest.yaml"
    forest.write_text(forest.read_text().replace("n_estimators: 100", "n_estimators: 10"))
    pipeline = root / "conf" / "pipeline.yaml"
    pipeline.write_text(pipeline.read_text().replace("cv_folds: 5 ", "cv_folds: 2 "))
    subprocess.run(["git", "commit", "-qam", "slow candidate"], cwd=root, check=True)
    yield root


def _env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUSING_RUN_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["HOUSING_CONFIG_DIR"] = str(repo / "conf")
    env["HOUSING_STAGE_SERVER"] = "0"
    return env


#: Commands started by the running test: pid -> (process, start time in ms).
_STARTED: dict[int, tuple[subprocess.Popen[str], int]] = {}


@pytest.fixture(autouse=True)
def _stop_leftovers() -> Iterator[None]:
    """A test that fails midway must not leave its command running into the next test
    (which would find that command's RUNNING stage and signal the wrong process)."""
    yield
    for proc, _ in _STARTED.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    _STARTED.clear()


def _start(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    started_ms = int(time.time() * 1000)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "housing"), *args],
        cwd=repo,
        env={**_env(repo), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives a command
    )
    _STARTED[proc.pid] = (proc, started_ms)
    return proc


def _client(repo: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")


def _runs(repo: Path) -> list[Any]:
    client = _client(repo)
    experiment = client.get_experiment_by_name("housing")
    if experiment is None:
        return []
    return list(client.search_runs([experiment.experiment_id], "", max_results=1000))


def _wait_for_running_stage(repo: Path, proc: subprocess.Popen[str], name: str) -> Any:
    """The MLflow run of stage ``name`` once it is RUNNING (the stage is tracking).

    Polled with plain sqlite: an MLflow client here could race the stage creating the store.
    """
    import sqlite3

    # this command's run: one an earlier command left RUNNING is not it
    query = "SELECT run_uuid FROM runs WHERE name = ? AND status = 'RUNNING' AND start_time >= ?"
    since = _STARTED[proc.pid][1] - 1000  # the clocks agree; a second of slack
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ended early: {proc.communicate()[1][-2000:]}"
        try:
            uri = f"file:{repo / 'mlflow.db'}?mode=ro"  # never creates the store
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
                found = db.execute(query, (name, since)).fetchall()
        except sqlite3.Error:
            found = []
        if found:
            return _client(repo).get_run(found[0][0])
        time.sleep(0.3)
    raise AssertionError(f"{name} never started")


def _group(pgid: int) -> list[int]:
    left = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process.pid)
        except (OSError, psutil.Error):
            continue
    return left


def _stopped(proc: subprocess.Popen[str], signum: int, *, group: bool) -> tuple[float, str]:
    """Send ``signum`` (to the group, as a terminal, or the process, as ``kill``); wait
    until the command and every process of its group are gone. -> (seconds, stderr)."""
    t0 = time.monotonic()
    (os.killpg if group else os.kill)(proc.pid, signum)
    _, stderr = proc.communicate(timeout=60)
    while _group(proc.pid) and time.monotonic() - t0 < STOP_BOUND + 5:
        time.sleep(0.1)
    return time.monotonic() - t0, stderr


def _events(repo: Path) -> list[dict[str, Any]]:
    lines = (repo / "metrics" / "pipeline_events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    ("command", "signum", "group", "code"),
    [
        ("repro", signal.SIGTERM, False, 143),  # a supervisor's kill: the main process only
        ("pipeline", signal.SIGINT, True, 130),  # Ctrl-C: the whole process group
    ],
    ids=["repro-sigterm", "pipeline-ctrl-c"],
)
def test_a_signal_stops_every_process_and_records_the_run_killed(
    repo: Path, command: str, signum: int, group: bool, code: int
) -> None:
    proc = _start(repo, command)
    stage = _wait_for_running_stage(repo, proc, f"train_{SLOW_MODEL}")
    seconds, stderr = _stopped(proc, signum, group=group)

    assert proc.returncode == code, stderr[-2000:]
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    assert stderr.strip().splitlines()[-1] == f"error: {word}", stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert _group(proc.pid) == [], "processes outlived the command"
    assert seconds < STOP_BOUND, f"took {seconds:.1f}s to stop"

    runs = {r.info.run_id: r for r in _runs(repo)}
    assert runs[stage.info.run_id].info.status == "KILLED"
    parent = runs[stage.data.tags["mlflow.parentRunId"]]
    assert parent.info.status == "KILLED"
    assert [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"] == []

    run_id = stage.data.tags["housing.pipeline_run_id"]
    events = [e for e in _events(repo) if e["run_id"] == run_id]
    last = {e["stage"]: e for e in events}
    assert last[f"train_{SLOW_MODEL}"]["status"] == "killed"
    assert last["pipeline"]["status"] == "killed"
    assert f"train@{SLOW_MODEL}" in last["pipeline"]["stages_killed"]


def _ended_killed(
    repo: Path,
    proc: subprocess.Popen[str],
    stage: Any,
    stderr: str,
    seconds: float,
    *,
    ending: tuple[int, str],
) -> dict[str, dict[str, Any]]:
    """Assert the stopped command exited with ``ending`` (code, last stderr line), left
    no process, and recorded its stage run and the parent KILLED; the last event of each
    stage of its pipeline run."""
    code, line = ending
    assert proc.returncode == code, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == line, stderr[-2000:]
    assert _group(proc.pid) == [] and seconds < STOP_BOUND, f"{seconds:.1f}s"
    runs = {r.info.run_id: r for r in _runs(repo)}
    assert runs[stage.info.run_id].info.status == "KILLED"
    assert runs[stage.data.tags["mlflow.parentRunId"]].info.status == "KILLED"
    run_id = stage.data.tags["housing.pipeline_run_id"]
    return {e["stage"]: e for e in _events(repo) if e["run_id"] == run_id}


@pytest.mark.slow
@pytest.mark.integration
def test_a_stage_run_by_hand_stops_on_sigterm_and_records_it_killed(repo: Path) -> None:
    # Both trackers: the ClearML offline session (no keys here) is closed failed too.
    proc = _start(repo, "train", f"model={SLOW_MODEL}", "tracking=both", "clearml.mode=offline")
    stage = _wait_for_running_stage(repo, proc, f"train_{SLOW_MODEL}")
    # and both trackers started: the config is logged (MLflow's first) once they have
    artifacts = Path(stage.info.artifact_uri.removeprefix("file://"))
    deadline = time.monotonic() + 60
    while not (artifacts.is_dir() and any(artifacts.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "trackers never started"
        time.sleep(0.3)
    seconds, stderr = _stopped(proc, signal.SIGTERM, group=False)

    last = _ended_killed(repo, proc, stage, stderr, seconds, ending=(143, "error: terminated"))
    assert last[f"train_{SLOW_MODEL}"]["status"] == "killed"
    run_id = stage.data.tags["housing.pipeline_run_id"]
    from housing.tracking.offline import list_sessions

    (session,) = [s for s in list_sessions(repo / ".clearml") if SLOW_MODEL in s.name]
    assert session.closed and session.status == "failed", session
    assert session.properties.get("pipeline_run_id", run_id) == run_id


@pytest.mark.slow
@pytest.mark.integration
def test_a_stage_killed_by_sigkill_fails_the_run_and_the_next_run_closes_it(repo: Path) -> None:
    proc = _start(repo, "repro")
    stage = _wait_for_running_stage(repo, proc, f"train_{SLOW_MODEL}")
    while any(r.info.status == "RUNNING" for r in _runs(repo) if r.info.run_id != stage.info.run_id
              and r.data.tags.get("housing.run_type") == "stage"):  # fmt: skip
        time.sleep(0.3)  # the slow stage alone: the failure names it
    pid = int(stage.data.tags["housing.pid"])
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 1, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: stage train@{SLOW_MODEL} failed: its worker process died"
    ), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert time.monotonic() - t0 < DEAD_WORKER_BOUND
    assert _group(proc.pid) == []
    parent = stage.data.tags["mlflow.parentRunId"]
    assert _client(repo).get_run(parent).info.status == "FAILED"  # the engine closed it

    later = run_tool("housing", repo, "prepare", env={"HOUSING_STAGE_SERVER": "0"})
    assert later.returncode == 0, later.stderr[-2000:]
    closed = _client(repo).get_run(stage.info.run_id)
    assert closed.info.status == "KILLED"
    assert closed.data.tags["housing.close_reason"] == (
        f"process {pid} on {closed.data.tags['housing.host']} ended without closing its run"
    )
    assert [r.info.run_name for r in _runs(repo) if r.info.status == "RUNNING"] == []


_BETWEEN_STAGES = """
import os, signal, sys
from pathlib import Path
from housing.entry import configure_logging, report_error
from housing.repro import reproduce

def on_event(stage, what):  # prepare recorded, no train stage started yet
    if (stage, what) == ("prepare", "done"):
        os.kill(os.getpid(), signal.SIGTERM)

configure_logging(0)
try:
    reproduce(Path.cwd(), on_event=on_event)
except KeyboardInterrupt as exc:
    sys.exit(report_error(exc))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_a_sigterm_between_two_stages_stops_everything_and_records_it(tmp_path: Path) -> None:
    # housing repro's own engine, a real SIGTERM to its process the moment prepare is
    # recorded: no stage is running, the fork server and the finished worker are.
    root = make_scratch_repo(tmp_path / "between", defaults={"tracking": "mlflow"})
    proc = subprocess.Popen(
        [sys.executable, "-c", _BETWEEN_STAGES], cwd=root, env=_env(root),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    _, stderr = proc.communicate(timeout=300)
    t0 = time.monotonic()
    while _group(proc.pid) and time.monotonic() - t0 < STOP_BOUND:
        time.sleep(0.1)

    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "error: terminated", stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert _group(proc.pid) == [], "processes outlived the command"
    events = _events(root)
    assert [(e["stage"], e["status"]) for e in events] == [
        ("prepare", "started"), ("prepare", "succeeded"), ("pipeline", "killed")
    ]  # fmt: skip
    assert events[-1]["stages_run"] == ["prepare"] and events[-1]["stages_killed"] == []
    runs = _runs(root)
    assert {r.data.tags["housing.run_type"]: r.info.status for r in runs} == {
        "pipeline": "KILLED", "stage": "FINISHED"
    }  # fmt: skip


# --------------------------------------------------------------------------- the restore race

#: An LD_PRELOAD shim: the first time the process sets ``RACE_SIGNAL``'s disposition to
#: SIG_DFL/SIG_IGN while a handler is installed (CPython's ``signal.signal`` putting a
#: default handler back), the signal is raised first. It lands exactly where CPython
#: has already run the pending handlers and not yet swapped the handler: the race. With
#: ``RACE_ARM_FILE``, only once that file exists.
_RACE_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static int fired = 0;
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    static sigaction_fn real = NULL;
    if (!real) real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    const char *want = getenv("RACE_SIGNAL"), *arm = getenv("RACE_ARM_FILE");
    if (!fired && want && act && sig == atoi(want) && (!arm || access(arm, F_OK) == 0)
        && (act->sa_handler == SIG_DFL || act->sa_handler == SIG_IGN)) {
        struct sigaction now;
        if (real(sig, NULL, &now) == 0 && now.sa_handler != SIG_DFL
            && now.sa_handler != SIG_IGN) {
            fired = 1;
            raise(sig);
        }
    }
    return real(sig, act, old);
}
"""

#: A command's stop_signals block: left normally, or after a Ctrl-C raised inside it.
_RESTORE = """
import os, signal, sys
from housing.entry import report_error
from housing.runner import stop_signals

try:
    with stop_signals():
        if sys.argv[1] == "ctrl-c":
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10))  # the handler raises here
    print("not stopped")
except KeyboardInterrupt as exc:
    sys.exit(report_error(exc))
"""


@pytest.fixture(scope="module")
def race_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import require_tool

    gcc = require_tool(("gcc", "cc"), "apt-get install gcc (builds the signal-race injector)")
    folder = tmp_path_factory.mktemp("race")
    (folder / "shim.c").write_text(_RACE_SHIM)
    shim = folder / "shim.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-o", str(shim), str(folder / "shim.c"), "-ldl"], check=True
    )
    return shim


@pytest.mark.parametrize(
    ("block", "code", "word"),
    [("normal", 143, "terminated"), ("ctrl-c", 130, "interrupted")],
)
def test_a_sigterm_while_the_handlers_are_put_back_is_honoured(
    race_shim: Path, tmp_path: Path, block: str, code: int, word: str
) -> None:
    # SIGTERM arrives inside signal.signal(SIGTERM, SIG_DFL), after its pending check:
    # CPython drops it and prints "OSError: Signal 15 ignored due to race condition".
    env = {**os.environ, "LD_PRELOAD": str(race_shim), "RACE_SIGNAL": str(int(signal.SIGTERM))}
    done = subprocess.run(
        [sys.executable, "-c", _RESTORE, block],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Traceback" not in done.stderr and "race condition" not in done.stderr, done.stderr
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [f"error: {word}"], done.stderr
    assert "not stopped" not in done.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_ctrl_c_with_a_sigterm_landing_in_the_restore_ends_cleanly(
    repo: Path, race_shim: Path, tmp_path: Path
) -> None:
    # The CI failure: Ctrl-C of `housing pipeline`, and a SIGTERM lands while a process
    # puts its handlers back (the shim raises it there once per process, from the Ctrl-C on).
    armed = tmp_path / "armed"
    race = {"LD_PRELOAD": str(race_shim), "RACE_SIGNAL": str(int(signal.SIGTERM)),
            "RACE_ARM_FILE": str(armed)}  # fmt: skip
    proc = _start(repo, "pipeline", env=race)
    stage = _wait_for_running_stage(repo, proc, f"train_{SLOW_MODEL}")
    armed.touch()
    seconds, stderr = _stopped(proc, signal.SIGINT, group=True)

    assert "Traceback" not in stderr and "race condition" not in stderr, stderr[-3000:]
    last = _ended_killed(repo, proc, stage, stderr, seconds, ending=(130, "error: interrupted"))
    assert last["pipeline"]["status"] == "killed"
