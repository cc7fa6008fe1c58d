"""One run at a time per checkout: the run lock, with real processes.

A holder is a real process holding the lock through the entry point's
``hold_run_lock`` (as every writing command does); the second command is a real
``housing prepare`` on a tiny synthetic table in a scratch folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from housing.runlock import (
    HOLDER_ENV,
    LOCK_DIR,
    RECORD_FILE,
    Holder,
    RunLockError,
    read_holder,
    run_lock,
)

PROJECT = Path(__file__).resolve().parents[1]
HOUSING = str(Path(sys.executable).parent / "housing")
PREPARE = ("prepare", "data=synthetic", "data.n_rows=200", "tracking=none")

#: Holds the run lock of its working directory as `housing repro` would; with arguments,
#: runs them as its child and exits with the child's code, else holds until stdin closes.
_HOLDER = """
import subprocess, sys
from pathlib import Path
from housing.entry import hold_run_lock

with hold_run_lock(Path.cwd(), "housing repro", wait=False, say=print):
    print("held", flush=True)
    if sys.argv[1:]:
        sys.exit(subprocess.call(sys.argv[1:]))
    sys.stdin.read()
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUSING_")}
    env["HOUSING_CONFIG_DIR"] = str(PROJECT / "conf")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def _housing(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HOUSING, *args],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def _start_holder(root: Path, *child: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, *child],
        cwd=root,
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n", proc.stderr.read() if proc.stderr else ""
    return proc


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = _start_holder(tmp_path)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


def test_a_second_command_is_refused_with_the_holders_details(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    record = read_holder(tmp_path)
    assert record is not None
    assert (record.command, record.pid) == ("housing repro", holder.pid)

    done = _housing(tmp_path, *PREPARE)

    assert done.returncode == 1
    when = record.describe().split("started ", 1)[1].rstrip(")")
    assert done.stderr == (
        f"error: {tmp_path / LOCK_DIR / 'run.lock'}: `housing repro` (pid {holder.pid}, "
        f"started {when}) is running in this checkout; wait for it with --wait "
        "(or HOUSING_WAIT=1)\n"
    )
    assert not (tmp_path / "data").exists()  # refused before any work
    assert read_holder(tmp_path) == record  # the holder's record is untouched


@pytest.mark.parametrize("command", [("sync",), ("clearml", "sync"), ("mlflow", "sync")])
def test_a_sync_is_refused_while_a_run_holds_the_lock(
    tmp_path: Path, holder: subprocess.Popen[str], command: tuple[str, ...]
) -> None:
    # a sync writes the tracker stores (imported sessions, the replayed spool) too
    done = _housing(tmp_path, *command, "tracking=both", "clearml.mode=offline")
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {tmp_path / LOCK_DIR / 'run.lock'}: `housing repro`")


def test_wait_waits_for_the_holder_then_runs(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    waiting = subprocess.Popen(
        [HOUSING, *PREPARE, "--wait"],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert waiting.stderr is not None
    line = waiting.stderr.readline()
    assert line.startswith(f"waiting for `housing repro` (pid {holder.pid}, started "), line
    time.sleep(0.5)
    assert waiting.poll() is None and not (tmp_path / "data").exists()

    holder.communicate("", timeout=10)  # the holder finishes
    _, err = waiting.communicate(timeout=60)

    assert waiting.returncode == 0, err
    assert "prepare: 200 rows (synthetic)" in err
    assert (tmp_path / "data" / "raw" / "housing.csv").is_file()
    assert not (tmp_path / LOCK_DIR / RECORD_FILE).exists()  # released


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = Holder("housing repro", gone.pid, time.time() - 60, os.uname().nodename, "x")
    folder = tmp_path / LOCK_DIR
    folder.mkdir()
    (folder / RECORD_FILE).write_text(json.dumps(dead.__dict__))

    done = _housing(tmp_path, *PREPARE)

    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == (
        f"run lock: taking over {folder / RECORD_FILE} from {dead.describe()}, "
        "which is no longer running"
    )
    assert (tmp_path / "data" / "raw" / "housing.csv").is_file()
    assert not (folder / RECORD_FILE).exists()


def test_a_reused_pid_is_a_dead_holder_and_a_live_one_is_not(tmp_path: Path) -> None:
    """Our own pid with another start time is a pid reused: taken over. With our own start
    time, a record (even with no lock file held) is a live holder: refused."""
    me = Holder.this_process("housing train")
    reused = Holder(me.command, me.pid, me.started - 100, me.host, me.locked_at)
    folder = tmp_path / LOCK_DIR
    folder.mkdir()
    lines: list[str] = []
    (folder / RECORD_FILE).write_text(json.dumps(reused.__dict__))
    with run_lock(tmp_path, "housing gc", say=lines.append) as held:
        assert held is not None and read_holder(tmp_path) == held
    assert lines == [
        f"run lock: taking over {folder / RECORD_FILE} from {reused.describe()}, "
        "which is no longer running"
    ]

    (folder / RECORD_FILE).write_text(json.dumps(me.__dict__))
    with (
        pytest.raises(RunLockError, match="is running in this checkout"),
        run_lock(tmp_path, "housing gc"),
    ):
        pass  # pragma: no cover - refused
    assert read_holder(tmp_path) == me


def test_a_child_of_the_holder_is_let_through_and_others_are_not(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path, HOUSING, *PREPARE)
    _, err = holder.communicate(timeout=60)

    assert holder.returncode == 0, err
    assert "prepare: 200 rows (synthetic)" in err and "run lock" not in err
    assert (tmp_path / "data" / "raw" / "housing.csv").is_file()
    assert not (tmp_path / LOCK_DIR / RECORD_FILE).exists()

    # the holder's identity in the environment of a process it did not start (its
    # holder gone, or another holder's) lets nothing through
    env = {**_env(), HOLDER_ENV: f"{holder.pid}:1.000"}
    with run_lock(tmp_path, "housing repro", environ=env) as held:
        assert held is not None  # took the lock itself
        refused = subprocess.run(
            [HOUSING, *PREPARE], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )
    assert refused.returncode == 1 and "is running in this checkout" in refused.stderr


def test_dvcs_own_lock_message_is_shown_whole(tmp_path: Path) -> None:
    """A DVC output write-locked by a live process (DVC's rwlock, as another `dvc repro`
    leaves it): `housing repro` says which process blocks it, not a cut line."""
    subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"],
        cwd=tmp_path,
        check=True,
    )
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: echo hi > out.txt\n    outs:\n    - out.txt\n"
    )
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    blocker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = str(tmp_path / "out.txt")
        rwlock = {"write": {out: {"pid": blocker.pid, "cmd": "dvc repro (elsewhere)"}}}
        (tmp_path / ".dvc" / "tmp" / "rwlock").write_text(json.dumps(rwlock))
        done = _housing(tmp_path, "repro", "tracking=none")
    finally:
        blocker.kill()
        blocker.wait()
    assert done.returncode == 1
    assert done.stderr == (
        f"error: dvc: '{out}' is busy, it is being blocked by: (PID {blocker.pid}): "
        "dvc repro (elsewhere) If there are no processes with such PIDs, you can manually "
        f"remove '{tmp_path / '.dvc' / 'tmp' / 'rwlock'}' and try again.\n"
    )
    assert not (tmp_path / "out.txt").exists()
