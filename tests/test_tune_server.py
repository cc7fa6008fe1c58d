"""``housing tune`` with a server and agents (``clearml.pipeline.run_locally: false``):
ClearML's ``HyperParameterOptimizer`` with ``OptimizerOptuna`` clones the model's train step
task and enqueues each trial with its overrides, read back from the strict fake."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from housing.config import load_settings
from housing.orchestration.clearml_controller import TRIAL_SECTION as SECTION
from housing.orchestration.clearml_controller import trial_overrides
from housing.orchestration.clearml_tune import OBJECTIVE
from tests.fakes.clearml_api import FakeClearMLServer
from tests.scratch import make_scratch_repo

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REMOTE = ["clearml.pipeline.run_locally=false", "++clearml.pipeline.poll_sec=0.2"]
SPACE = {"n_estimators": (50, 400), "max_depth": (3, 20), "min_samples_leaf": (1, 10)}
CHOICES = (1.0, 0.7, 0.5, "sqrt")  # conf/tune/random_forest.yaml


@pytest.fixture
def server() -> Iterator[FakeClearMLServer]:
    """The strict fake; its stand-in agent completes every enqueued task at once."""
    with FakeClearMLServer(queues=("default", "gpu"), agent_completes=True) as fake:
        yield fake


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_scratch_repo(tmp_path / "repo", defaults={"tracking": "clearml"})


def _tune(root: Path, server: FakeClearMLServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_", "HOUSING_"))
    }
    env.update(server.env())
    env["HOME"] = str(root.parent)  # no ~/clearml.conf of the developer
    return subprocess.run(
        [sys.executable, "scripts/tune.py", *args, *REMOTE, "clearml.mode=online"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _train_step(server: FakeClearMLServer, model: str) -> dict[str, Any]:
    """The train step task as the pipeline leaves it (its function kwargs as parameters)."""
    kwargs = {
        name: {"section": "kwargs", "name": name, "value": value, "type": "str"}
        for name, value in {"stage": "train", "step_name": f"train_{model}"}.items()
    }
    return server.add_task(
        name=f"housing:train_{model}",
        project_name="housing",
        status="completed",
        hyperparams={"kwargs": kwargs},
    )


def test_trials_are_clones_of_the_train_step_enqueued_with_overrides(
    server: FakeClearMLServer, repo: Path
) -> None:
    _train_step(server, "ridge")  # another model's step: not the base
    base = _train_step(server, "random_forest")

    def objective(task: dict[str, Any]) -> dict[tuple[str, str], float]:
        """What the train step on an agent would report: a score of the trial's values."""
        values = {k: float(p["value"]) for k, p in task["hyperparams"][SECTION].items()
                  if k in SPACE}  # fmt: skip
        return {OBJECTIVE: values["max_depth"] + values["n_estimators"] / 1000}

    server.agent_reports = objective
    args = ["model=random_forest", "tune.n_trials=3", "tune.n_jobs=2"]
    proc = _tune(repo, server, *args, "clearml.pipeline.execution_queue=gpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"3 trial(s) cloned from task {base['id']}, enqueued on 'gpu'" in proc.stdout
    # the optimizer read each trial's objective (none pruned for lack of one), and the
    # command names the lowest
    assert "reported no objective metric" not in proc.stdout + proc.stderr
    scores = {c["task"]: objective(server.tasks[c["task"]])[OBJECTIVE] for c in
              server.calls_to("tasks.enqueue")}  # fmt: skip
    best = min(scores, key=scores.__getitem__)
    assert f"best: trial {best}  Summary/cv/rmse_mean {scores[best]:.4f}" in proc.stdout
    for task_id, score in scores.items():
        assert f"{task_id}: Summary/cv/rmse_mean {score:.4f}" in proc.stdout

    clones = server.calls_to("tasks.clone")
    assert [c["task"] for c in clones] == [base["id"]] * 3
    enqueued = server.calls_to("tasks.enqueue")
    trials = [server.tasks[c["task"]] for c in enqueued]
    assert {c["queue"] for c in enqueued} == {"q-gpu"} and len(trials) == 3
    seen = set()
    for trial in trials:
        assert trial["parent"] == base["id"] and trial["status"] == "completed"
        kwargs = {k: p["value"] for k, p in trial["hyperparams"]["kwargs"].items()}
        assert kwargs == {"stage": "train", "step_name": "train_random_forest"}  # the step's own
        values = {k: p["value"] for k, p in trial["hyperparams"][SECTION].items()}
        assert set(values) == {*SPACE, "max_features"}
        for name, (low, high) in SPACE.items():
            assert low <= int(values[name]) <= high, (name, values)
        # what the train step on the agent composes from them (execute_step)
        overrides = trial_overrides({SECTION: values})
        settings = load_settings(["model=random_forest", *overrides], root=repo)
        params = settings.model.params
        assert params["max_features"] in CHOICES, params
        assert {k: params[k] for k in SPACE} == {k: int(values[k]) for k in SPACE}
        seen.add(tuple(sorted(values.items())))
    assert len(seen) == 3  # three distinct points of the space
    assert server.calls_to("tasks.create") == []  # no task but the clones


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=ridge"], "no task housing:train_ridge in project housing to clone trials from"),
        (
            ["model=random_forest", "clearml.pipeline.execution_queue=nope"],
            "has no queue 'nope' (clearml.pipeline.execution_queue)",
        ),
    ],
)
def test_a_missing_base_task_or_queue_is_one_line(
    server: FakeClearMLServer, repo: Path, args: list[str], message: str
) -> None:
    _train_step(server, "random_forest")
    proc = _tune(repo, server, *args)
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert server.calls_to("tasks.clone") == [] and server.calls_to("tasks.enqueue") == []


def test_apply_is_refused_when_trials_run_on_agents(server: FakeClearMLServer, repo: Path) -> None:
    _train_step(server, "ridge")
    tuned = repo / "conf/tuned/ridge.yaml"
    before = tuned.read_text()
    proc = _tune(repo, server, "model=ridge", "--apply")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "tune --apply: trials run on ClearML agents" in proc.stderr
    assert "Traceback" not in proc.stderr and server.calls_to("tasks.clone") == []
    assert tuned.read_text() == before
