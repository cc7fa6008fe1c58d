"""The stage server: `python scripts/<stage>.py` run in a warm child, as if in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from housing import stage_server
from tests.scratch import make_scratch_repo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_scratch_repo(tmp_path_factory.mktemp("server") / "repo")


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A private TMPDIR (short: socket paths are limited) for this test's servers."""
    folder = Path(tempfile.mkdtemp(prefix="hs-", dir="/tmp"))
    yield folder
    for server in _servers(folder):
        server.kill()
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def _env(tmpdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUSING_RUN")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = str(tmpdir)
    env["HOUSING_STAGE_SERVER_IDLE"] = "30"
    env.update(extra)
    return env


def _script(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["python", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _servers(tmpdir: Path) -> list[psutil.Process]:
    """The stage servers of this test (not their forked stage children)."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "housing.stage_server" in cmdline and any(str(tmpdir) in a for a in cmdline):
            procs.append(proc)
    pids = {p.pid for p in procs}
    return [p for p in procs if p.ppid() not in pids]


def _stage_child(server: psutil.Process) -> psutil.Process:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        children = server.children()
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError("no stage child appeared")


def _events(repo: Path) -> list[dict[str, object]]:
    lines = (repo / "metrics" / "pipeline_events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_stages_run_in_one_warm_server_with_the_callers_streams_env_and_place(
    repo: Path, sockets: Path
) -> None:
    env = _env(sockets, HOUSING_RUN_ID="served-1")
    first = _script(repo, env, "scripts/prepare.py")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "prepare: 506 rows" in first.stderr  # the child wrote to the caller's stream
    (server,) = _servers(sockets)
    second = _script(repo, env, "scripts/train.py", "model=ridge")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "train ridge:" in second.stderr
    assert _servers(sockets) == [server], "the second stage reused the warm server"
    assert (repo / "models" / "ridge.joblib").is_file()  # ran in the caller's directory
    # the caller's environment (its run id) reached the stage
    run_ids = {e["run_id"] for e in _events(repo) if e.get("stage") == "train_ridge"}
    assert "served-1" in run_ids


def test_a_config_error_exits_2_with_one_line_through_the_server(repo: Path, sockets: Path) -> None:
    result = _script(repo, _env(sockets), "scripts/train.py", "model.params.alhpa=3")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert _servers(sockets), "served, not run in-process"


def test_switched_off_the_stage_runs_in_the_scripts_own_process(repo: Path, sockets: Path) -> None:
    result = _script(repo, _env(sockets, HOUSING_STAGE_SERVER="0"), "scripts/prepare.py")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _servers(sockets) == []
    assert not list(sockets.glob("housing-stage-server-*/*.sock"))


def _long_stage(
    repo: Path, sockets: Path, **popen: Any
) -> tuple[subprocess.Popen[str], psutil.Process]:
    """A slow train stage started through a warm server: (its client, the stage child)."""
    env = _env(sockets)
    assert _script(repo, env, "scripts/prepare.py").returncode == 0  # the server is warm
    (server,) = _servers(sockets)
    proc = subprocess.Popen(
        ["python", "scripts/train.py", "model=random_forest", "model.params.n_estimators=3000"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        text=True,
        **popen,
    )
    return proc, _stage_child(server)


def test_ctrl_c_reaches_the_stage_and_nothing_is_left_running(repo: Path, sockets: Path) -> None:
    proc, child = _long_stage(repo, sockets, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "error: interrupted" in err
    child.wait(timeout=10)
    assert not child.is_running()


def test_a_vanished_caller_takes_its_stage_with_it(repo: Path, sockets: Path) -> None:
    proc, child = _long_stage(repo, sockets, stderr=subprocess.DEVNULL)
    proc.kill()  # kill -9: no chance to forward anything
    proc.wait()
    child.wait(timeout=30)
    assert not child.is_running()


def test_a_killed_stage_fails_once_and_is_not_run_again(repo: Path, sockets: Path) -> None:
    def starts() -> int:
        events = _events(repo) if (repo / "metrics" / "pipeline_events.jsonl").exists() else []
        return sum(
            e.get("stage") == "train_random_forest" and e.get("status") == "started" for e in events
        )

    before = starts()
    proc, child = _long_stage(repo, sockets, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while starts() == before and time.monotonic() < deadline:  # until the stage has started
        time.sleep(0.1)
    child.kill()  # kill -9 of the stage process itself
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "ended without an exit code" in err
    assert starts() == before + 1, "the client ran the stage again in its own process"


def test_an_idle_server_exits_and_removes_its_socket(repo: Path, sockets: Path) -> None:
    env = _env(sockets, HOUSING_STAGE_SERVER_IDLE="1")
    assert _script(repo, env, "scripts/prepare.py").returncode == 0
    (server,) = _servers(sockets)
    server.wait(timeout=30)
    assert not list(sockets.glob("housing-stage-server-*/*.sock"))


def test_the_server_key_follows_code_config_place_and_tracker_env(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    conf = tmp_path / "conf" / "pipeline.yaml"
    conf.write_text("a: 1\n")
    key = stage_server.server_key(tmp_path, {})
    assert stage_server.server_key(tmp_path, {"HOUSING_RUN_ID": "x", "HOME": "/h"}) == key
    assert stage_server.server_key(tmp_path, {"CLEARML_API_HOST": "http://h"}) != key
    assert stage_server.server_key(tmp_path / "conf", {}) != key
    conf.write_text("a: 22\n")
    assert stage_server.server_key(tmp_path, {}) != key


def test_files_of_long_gone_servers_are_removed(tmp_path: Path) -> None:
    week_ago = time.time() - 8 * 86400
    for name in ("gone.lock", "gone.log", "live.lock", "live.sock", "recent.log"):
        (tmp_path / name).write_text("")
    for name in ("gone.lock", "gone.log", "live.lock"):
        os.utime(tmp_path / name, (week_ago, week_ago))
    stage_server._forget_old_servers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.lock", "live.sock", "recent.log"]
