"""The one local engine and the one pipeline-run identity, with real DVC and MLflow.

A scratch copy of the project tracks to MLflow (a local sqlite store); each way of
running the DAG must give exactly one MLflow parent run per pipeline run, and leave
no run RUNNING once the command exits.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from housing import runs
from tests.helpers import ran_stages, run_tool
from tests.scratch import make_scratch_repo

CANDIDATES = ("linear_regression", "ridge", "random_forest", "gradient_boosting")


def _client(repo: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")


def _runs(repo: Path, run_type: str | None = None) -> list[Any]:
    client = _client(repo)
    experiment = client.get_experiment_by_name("housing")
    if experiment is None:
        return []
    query = f"tags.\"housing.run_type\" = '{run_type}'" if run_type else ""
    return list(client.search_runs([experiment.experiment_id], query, max_results=1000))


def _children(repo: Path, parent_id: str) -> list[Any]:
    return [r for r in _runs(repo, "stage") if r.data.tags.get("mlflow.parentRunId") == parent_id]


def _running(repo: Path) -> list[str]:
    return [r.info.run_name for r in _runs(repo) if r.info.status == "RUNNING"]


def _new_parents(repo: Path, before: set[str]) -> list[Any]:
    return [r for r in _runs(repo, "pipeline") if r.info.run_id not in before]


def _parent_ids(repo: Path) -> set[str]:
    return {r.info.run_id for r in _runs(repo, "pipeline")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A git + DVC copy of the project tracking to MLflow only, 2-fold CV for speed."""
    root = make_scratch_repo(tmp_path_factory.mktemp("engine"), defaults={"tracking": "mlflow"})
    pipeline = root / "conf" / "pipeline.yaml"
    pipeline.write_text(pipeline.read_text().replace("cv_folds: 5 ", "cv_folds: 2 "))
    subprocess.run(["git", "commit", "-qam", "2 folds"], cwd=root, check=True)
    yield root


@pytest.mark.slow
@pytest.mark.integration
def test_housing_repro_is_dvc_repro_in_warm_parallel_workers(repo: Path) -> None:
    done = run_tool("housing", repo, "repro", "-j", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Updating lock file" not in done.stdout + done.stderr  # DVC's lines not repeated
    # recorded as dvc repro records it: nothing stale, every stage in dvc.lock
    status = run_tool("dvc", repo, "status")
    assert "up to date" in status.stdout, status.stdout
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prepare", "select_best", "evaluate", *(f"train@{c}" for c in CANDIDATES)}
    # the train stages ran side by side, each in its own worker process
    events = [json.loads(line) for line in (repo / "metrics/pipeline_events.jsonl").open()]
    run_id = events[-1]["run_id"]
    assert events[-1]["stage"] == "pipeline" and events[-1]["status"] == "succeeded"
    trains = [e for e in events if e["run_id"] == run_id and e["status"] == "succeeded"]
    trains = [e for e in trains if e["stage"].startswith("train_")]
    assert len({e["pid"] for e in trains}) == len(CANDIDATES)
    spans = sorted((e["started_at"], e["finished_at"]) for e in trains)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans
    # one pipeline run, one parent, seven children, nothing left RUNNING
    parents = _runs(repo, "pipeline")
    assert [p.data.tags["housing.pipeline_run_id"] for p in parents] == [run_id]
    assert parents[0].info.status == "FINISHED"
    assert len(_children(repo, parents[0].info.run_id)) == 3 + len(CANDIDATES)
    assert _running(repo) == []
    # nothing changed: a no-op that starts no worker
    again = run_tool("housing", repo, "repro")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "running" not in again.stdout
    assert _parent_ids(repo) == {parents[0].info.run_id}


@pytest.mark.slow
@pytest.mark.integration
def test_plain_dvc_repro_and_a_stage_by_hand_are_one_closed_run_each(repo: Path) -> None:
    before = _parent_ids(repo)
    done = run_tool("dvc", repo, "repro", "--force", "-s", "select_best", "evaluate")
    assert done.returncode == 0, done.stderr[-2000:]
    assert ran_stages(done.stdout) == ["select_best", "evaluate"]
    (parent,) = _new_parents(repo, before)
    assert parent.data.tags["housing.trigger"] == "dvc"
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in _children(repo, parent.info.run_id)) == [
        "evaluate",
        "select_best",
    ]
    before = _parent_ids(repo)
    by_hand = run_tool("housing", repo, "evaluate")
    assert by_hand.returncode == 0, by_hand.stderr[-2000:]
    (manual,) = _new_parents(repo, before)
    assert manual.data.tags["housing.trigger"] == "manual"
    assert manual.info.status == "FINISHED"
    assert _running(repo) == []


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_exp_run_temp_records_into_the_repository(repo: Path) -> None:
    """The experiment runs in .dvc/tmp/exps (deleted after); its runs land in ./mlflow.db."""
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"],
        cwd=repo,
        check=True,
    )
    before = _parent_ids(repo)
    done = run_tool(
        "dvc", repo, "exp", "run", "--temp", "-n", "alpha3", "-S",
        "conf/model/ridge.yaml:params.alpha=3.0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (parent,) = _new_parents(repo, before)
    assert parent.data.tags["housing.dvc_experiment"] == "alpha3"
    assert parent.data.tags.get("housing.dvc_baseline")
    assert parent.info.status == "FINISHED"
    names = sorted(r.info.run_name for r in _children(repo, parent.info.run_id))
    assert names == ["evaluate", "select_best", "train_ridge"]
    assert not list((repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))
    assert _running(repo) == []


@pytest.mark.slow
@pytest.mark.integration
def test_a_source_edit_reruns_the_stages_that_run_it(repo: Path) -> None:
    split = repo / "src" / "housing" / "data" / "split.py"
    split.write_text(split.read_text() + "\n# touched\n")
    status = run_tool("dvc", repo, "status", "--json")
    stale = set(json.loads(status.stdout))
    assert {f"train@{c}" for c in CANDIDATES} <= stale
    assert "prepare" in stale


@pytest.mark.slow
@pytest.mark.integration
def test_interrupted_repro_leaves_no_worker_and_no_open_run(tmp_path: Path) -> None:
    root = make_scratch_repo(tmp_path / "ctrl-c", defaults={"tracking": "mlflow"})
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "housing"), "repro"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the train stages are running
        if line.startswith("running train@"):
            break
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == 130
    time.sleep(1.0)
    import psutil

    left = [p.pid for p in psutil.process_iter() if _pgid(p.pid) == proc.pid]
    assert left == [], "worker processes outlived the command"
    # a later run closes whatever the interrupted one could not
    later = run_tool("housing", root, "prepare")
    assert later.returncode == 0, later.stderr[-2000:]
    assert _running(root) == []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_orphans_of_ended_processes_are_closed_killed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from housing.tracking.mlflow import close_orphans

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("housing", artifact_location=tmp_path.as_uri())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = client.create_run(experiment, tags={"housing.pid": str(gone.pid), "housing.host": host})
    alive = client.create_run(
        experiment, tags={"housing.pid": str(os.getpid()), "housing.host": host}
    )
    elsewhere = client.create_run(
        experiment, tags={"housing.pid": str(gone.pid), "housing.host": "another-host"}
    )
    assert close_orphans(client, experiment) == [dead.info.run_id]
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"


def test_store_root_maps_an_experiment_copy_back_to_the_repository(tmp_path: Path) -> None:
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12" / "sub"
    assert runs.store_root(copy) == tmp_path / "repo"
    assert runs.store_root(tmp_path / "repo") == tmp_path / "repo"


def test_run_context_from_the_environment_and_from_a_dvc_parent(tmp_path: Path) -> None:
    owned = runs.current({"HOUSING_RUN_ID": "r1", "HOUSING_RUN_OWNER_PID": str(os.getpid())})
    assert (owned.run_id, owned.trigger, owned.closes_parent) == ("r1", "housing", False)
    manual = runs.current({})
    assert manual.trigger == "manual" and manual.owner_pid == os.getpid()
    # a process whose parent is a program named dvc belongs to that program's run
    fake = tmp_path / "dvc"
    probe = "from housing import runs; c = runs.current({}); print(c.trigger, c.owner_pid)"
    fake.write_text(f"#!/bin/sh\n'{sys.executable}' -c '{probe}'\necho $$\n")
    fake.chmod(0o755)
    out = subprocess.run([str(fake)], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "dvc" and out[1] == out[2]


def test_pipeline_without_a_server_refuses_overrides_that_change_outputs(
    tmp_path: Path,
) -> None:
    """Offline, `housing pipeline` is dvc.yaml with conf/ as it is: only tracking keys."""
    from housing.errors import ConfigError
    from housing.orchestration.pipeline import run_pipeline
    from tests.conftest import CONF

    with pytest.raises(ConfigError, match=r"prepare\.test_size: .*dvc exp run -S"):
        run_pipeline(["tracking=none", "prepare.test_size=0.3"], CONF, root=tmp_path)
    assert not (tmp_path / "metrics").exists()


def test_experiment_copies_track_into_the_repository_clearml_folder(tmp_path: Path) -> None:
    from housing.config import load_settings
    from housing.tracking.recorder import _in_store
    from tests.conftest import CONF

    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12"
    settings = load_settings(["tracking=clearml"], CONF, copy)
    assert settings.clearml.offline_dir == copy / ".clearml"
    assert _in_store(settings).offline_dir == tmp_path / "repo" / ".clearml"
