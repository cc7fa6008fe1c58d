"""The ClearML server paths (PipelineController, TaskScheduler) against the recording fake.

The SDK keeps process-global state, so each run happens in a subprocess pointed at the
fake with CLEARML_API_HOST/WEB/FILES and keys. The fake's stand-in agent completes enqueued
tasks at once (``agent_completes``), or, switched off, leaves them queued as a server with
no agent does.
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

import pytest

from tests.fakes.clearml_api import FakeClearMLServer
from tests.scratch import make_scratch_repo
from tests.test_clearml_census import check_census

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ORIGIN = "https://git.example.invalid/team/housing.git"
QUEUES = ("default", "services")


@pytest.fixture
def server() -> Iterator[FakeClearMLServer]:
    """The strict fake with an agent that runs every enqueued task to completion at once."""
    with FakeClearMLServer(queues=QUEUES, agent_completes=True) as fake:
        yield fake


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git checkout of the project with an ``origin`` remote (what agents clone)."""
    root = make_scratch_repo(tmp_path / "repo", defaults={"tracking": "clearml"})
    subprocess.run(["git", "remote", "add", "origin", ORIGIN], cwd=root, check=True)
    return root


def _env(
    root: Path, server: FakeClearMLServer, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_", "HOUSING_"))
    }
    env.update(server.env())
    env.update(extra or {})
    env["HOME"] = str(root.parent)  # no ~/clearml.conf of the developer
    return env


def _run(
    script: str,
    args: list[str],
    root: Path,
    server: FakeClearMLServer,
    *,
    timeout: float = 150,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args, "clearml.mode=online"],
        cwd=root,
        env=_env(root, server, extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _tasks(server: FakeClearMLServer, name: str) -> list[dict[str, Any]]:
    return [t for t in server.tasks.values() if t["name"] == name]


def _head(root: Path) -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


STEPS = ["prepare", "train_linear_regression", "train_ridge", "select_best", "evaluate"]
CANDIDATES = "selection.candidates=[linear_regression,ridge]"


def test_steps_are_enqueued_on_the_execution_queue(server: FakeClearMLServer, repo: Path) -> None:
    args = [CANDIDATES, "clearml.pipeline.run_locally=false"]
    args += ["++clearml.pipeline.controller_queue=null", "++clearml.pipeline.poll_sec=0.2"]
    proc = _run("clearml_pipeline.py", args, repo, server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and "clearml-queue" in proc.stdout

    (controller,) = _tasks(server, "housing:pipeline")
    assert controller["type"] == "controller"
    steps = {name: _tasks(server, f"housing:{name}") for name in STEPS}
    assert all(len(found) == 1 for found in steps.values()), steps
    ids = {name: found[0]["id"] for name, found in steps.items()}
    for name, (task,) in steps.items():
        script = task["script"]
        assert script["repository"] == ORIGIN
        assert script["version_num"] == _head(repo)
        assert script["entry_point"].endswith(".py") and script["working_dir"] == "."
        assert "scikit-learn==" in str(script.get("requirements"))
        params = {
            p["name"]: p["value"]
            for p in (task["hyperparams"].get("kwargs") or {}).values()
            if isinstance(p, dict)
        }
        assert params["stage"] == ("train" if name.startswith("train_") else name)
        upstream = json.loads(params["upstream_json"])
        # the ancestors' references were resolved to their task ids
        assert set(upstream.values()) <= set(ids.values())
    assert json.loads(_kwargs(steps["evaluate"][0])["upstream_json"]) == {
        n: ids[n] for n in STEPS[:-1]
    }

    enqueued = [c["task"] for c in server.calls_to("tasks.enqueue")]
    queues = {c["queue"] for c in server.calls_to("tasks.enqueue")}
    assert queues <= {"default", "q-default"}
    order = {task_id: i for i, task_id in enumerate(enqueued)}
    assert sorted(order) == sorted(ids.values())
    assert order[ids["prepare"]] == 0 and order[ids["evaluate"]] == len(STEPS) - 1
    assert order[ids["select_best"]] > max(order[ids[s]] for s in STEPS[1:3])
    assert controller["id"] not in order  # the controller itself ran here


def _kwargs(task: dict[str, Any]) -> dict[str, str]:
    section = task["hyperparams"].get("kwargs") or {}
    return {p["name"]: p["value"] for p in section.values() if isinstance(p, dict)}


def test_controller_goes_to_the_services_queue(server: FakeClearMLServer, repo: Path) -> None:
    proc = _run(
        "clearml_pipeline.py", [CANDIDATES, "clearml.pipeline.run_locally=false"], repo, server
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # the SDK ended the process
    (controller,) = _tasks(server, "housing:pipeline")
    enqueued = server.calls_to("tasks.enqueue")
    assert [(c["task"], c["queue"]) for c in enqueued] in (
        [(controller["id"], "services")],
        [(controller["id"], "q-services")],
    )
    assert not any(_tasks(server, f"housing:{name}") for name in STEPS)  # the agent makes them
    dag = json.loads(controller["configuration"]["Pipeline"]["value"])
    assert sorted(dag) == sorted(STEPS)
    assert dag["select_best"]["parents"] and set(dag["select_best"]["parents"]) >= {
        "train_linear_regression",
        "train_ridge",
    }
    assert all(dag[name]["queue"] == "default" for name in STEPS)


def test_steps_run_locally_as_clearml_tasks(server: FakeClearMLServer, repo: Path) -> None:
    args = ["selection.candidates=[linear_regression]", "++clearml.pipeline.poll_sec=0.2"]
    proc = _run("clearml_pipeline.py", args, repo, server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clearml-local" in proc.stdout and "best_model=linear_regression" in proc.stdout
    assert server.calls_to("tasks.enqueue") == []
    steps = ["prepare", "train_linear_regression", "select_best", "evaluate"]
    for name in steps:
        (task,) = _tasks(server, f"housing:{name}")
        assert task["status"] == "completed", (name, task["status"])
        artifacts = {a["key"]: a for a in task["execution"].get("artifacts", [])}
        assert artifacts, name
        for key, artifact in artifacts.items():
            sha = dict(artifact.get("display_data") or []).get("housing_sha256")
            assert sha, (name, key)
    record = json.loads((repo / "metrics" / "test_metrics.meta.json").read_text())
    assert record["model"] == "linear_regression"
    events = [
        json.loads(line)
        for line in (repo / "metrics" / "pipeline_events.jsonl").read_text().splitlines()
    ]
    summary = [e for e in events if e["stage"] == "pipeline"][-1]
    assert summary["status"] == "succeeded" and summary["executor"] == "clearml-local"
    run_ids = {e["run_id"] for e in events}
    assert len(run_ids) == 1  # the steps shared the controller's run id


def test_scheduler_is_registered_once(server: FakeClearMLServer, repo: Path) -> None:
    server.agent_completes = False  # no services agent: the scheduler stays queued
    dry = _run("clearml_schedule.py", [], repo, server)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "add_task(minute=0, hour=6, day=1)" in dry.stdout
    assert server.calls_to("tasks.create") == []
    text = (repo / "metrics" / "clearml_pipeline_schedule.txt").read_text()
    assert "ClearML TaskScheduler on queue services" in text and "+00:00" in text

    first = _run("clearml_schedule.py", ["--install"], repo, server)
    assert first.returncode == 0, first.stderr[-3000:]
    (template,) = _tasks(server, "housing:pipeline")
    assert template["script"]["entry_point"] == "scripts/clearml_pipeline.py"
    assert template["script"]["repository"] == ORIGIN
    (scheduler,) = _tasks(server, "housing:pipeline-scheduler")
    jobs = json.loads(scheduler["configuration"]["schedule"]["value"])
    assert [(j["base_task_id"], j["queue"], j["minute"], j["hour"], j["day"]) for j in jobs] == [
        (template["id"], "default", 0, 6, 1)
    ]
    assert [c["task"] for c in server.calls_to("tasks.enqueue")] == [scheduler["id"]]
    assert scheduler["status"] == "queued"

    created = len(server.calls_to("tasks.create"))
    again = _run("clearml_schedule.py", ["--install"], repo, server)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already runs this schedule" in again.stdout
    assert len(server.calls_to("tasks.create")) == created


def test_a_scheduled_run_leaves_the_project_visible(server: FakeClearMLServer, repo: Path) -> None:
    """An agent runs a clone of the scheduler's template: ``PipelineController`` marks the
    project of the task it runs in ``[hidden, pipeline]``; the user's project must stay
    visible, or ``housing compare`` and model queries by project name find nothing."""
    server.agent_completes = False  # no services agent: the scheduler stays queued
    install = _run("clearml_schedule.py", ["--install"], repo, server)
    assert install.returncode == 0, install.stderr[-3000:]
    check_census("scheduler install", server.endpoints())
    (template,) = _tasks(server, "housing:pipeline")
    fields = {k: v for k, v in template.items() if k not in ("id", "status")}
    clone = server.add_task(**fields, status="queued")  # what the scheduler's Task.clone makes
    server.agent_completes = True  # the steps' agent
    server.reset_calls()
    args = [CANDIDATES, "clearml.pipeline.run_locally=false"]
    args += ["++clearml.pipeline.controller_queue=null", "++clearml.pipeline.poll_sec=0.2"]
    # The controller as an agent starts it; once it has hidden its project and launched a
    # step, what this test checks has happened: stop it (its whole group) there. (Run to
    # its end against the fake it took 30 s quiet and stalled past 120 s under CI load.)
    log = repo.parent / "agent.log"
    with log.open("w") as out:
        agent = subprocess.Popen(
            [sys.executable, "scripts/clearml_pipeline.py", *args, "clearml.mode=online"],
            cwd=repo,
            env=_env(repo, server, {"CLEARML_TASK_ID": clone["id"]}),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not (
                "Launching step" in log.read_text()
                and any("hidden" in p["system_tags"] for p in server.projects.values())
            ):
                assert agent.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)  # its whole group
            agent.wait(timeout=30)
    check_census("controller (agent)", server.endpoints())
    server.reset_calls()

    server.add_model(name="housing-ridge", project_name="housing", ready=True)
    hosts = [f"clearml.server.{k}_host={getattr(server, k + '_host')}" for k in ("api", "web")]
    compare = _run(
        "clearml_compare.py",
        [*hosts, f"clearml.server.files_host={server.files_host}"],
        repo,
        server,
    )
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "no project" not in compare.stdout + compare.stderr
    check_census("compare", server.endpoints())
    models = (repo / "metrics" / "clearml_models.csv").read_text()
    assert "housing-ridge" in models
    # the pipeline's own project is hidden, as ClearML hides pipelines; the user's is not
    hidden = {p["name"] for p in server.projects.values() if "hidden" in p["system_tags"]}
    assert hidden == {"housing/.pipelines", "housing/.pipelines/housing:pipeline"}


class _Task:
    """The controller's own task as the SDK reports it (no server here to run one)."""

    def __init__(self, status: str, local: bool) -> None:
        self.status, self._local = status, local

    def running_locally(self) -> bool:
        return self._local


class _Controller:
    def __init__(self, successful: bool, task: _Task) -> None:
        self._successful, self.task = successful, task

    def is_successful(self, fail_on_step_fail: bool = True) -> bool:
        return self._successful


@pytest.mark.parametrize(
    ("successful", "status", "local", "expected"),
    [
        (True, "completed", True, True),  # run here: the SDK completed its task
        (False, "in_progress", False, True),  # on an agent: the agent completes it after exit
        (False, "failed", False, False),  # on an agent, a step failed
        (False, "in_progress", True, False),  # run here and not completed: not a success
    ],
)
def test_a_controller_run_by_an_agent_ends_well_while_its_task_is_in_progress(
    successful: bool, status: str, local: bool, expected: bool
) -> None:
    """``is_successful`` is False for a controller an agent runs (its task is completed
    only after the process exits 0): before, that run exited 1 "step ? failed"."""
    from housing.orchestration.clearml_controller import controller_succeeded

    assert controller_succeeded(_Controller(successful, _Task(status, local))) is expected
