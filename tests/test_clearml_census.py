"""Which ClearML endpoints a server-mode run calls, each checked against the SDK's schema.

The strict fake validates every call (it fails the test on an unknown endpoint or a schema
violation); this test runs the project's server paths against one fake and pins the
endpoints each one calls, so a new endpoint shows up here, named. Each phase prints what it
called and the schema version it was checked against (``pytest -s`` lists them). The
scheduler install, the controller run by an agent and compare are censused by
``tests/test_orchestration_server.py::test_a_scheduled_run_leaves_the_project_visible``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import clearml_schema
from tests.fakes.clearml_api import API_VERSION, FakeClearMLServer
from tests.scratch import make_scratch_repo

pytestmark = [pytest.mark.slow, pytest.mark.integration]

_IMPORT = [  # an offline session imported, or an online task (the SDK's own calls)
    "auth.login",
    "projects.get_all",
    "projects.create",
    "tasks.create",
    "tasks.get_by_id",
    "tasks.edit",
    "tasks.started",
    "tasks.get_all",
    "tasks.set_requirements",
    "tasks.edit_hyper_params",
    "tasks.add_or_update_artifacts",
    "tasks.add_or_update_model",
    "tasks.ping",
    "tasks.completed",
    "tasks.stopped",
    "tasks.failed",
    "projects.get_by_id",
    "models.create",
    "models.get_by_id",
    "models.get_all",
    "models.edit",
    "models.add_or_update_metadata",
    "models.set_ready",
    "events.add_batch",
]
_FILES = "files.upload"  # the file server (artifacts, models), not an API endpoint
CENSUS: dict[str, frozenset[str]] = {
    "tracked stage (offline)": frozenset(),
    "tracked stages (online)": frozenset(["debug.ping", *_IMPORT, _FILES]),
    "clearml sync": frozenset(["debug.ping", *_IMPORT, _FILES]),
    "doctor": frozenset(["debug.ping", "auth.login", "queues.get_all", "workers.get_all"]),
    "scheduler install": frozenset(["debug.ping", *_IMPORT, _FILES, "queues.get_all"])
    | {"queues.get_by_id", "tasks.enqueue"},
    "controller (agent)": frozenset(["debug.ping", *_IMPORT, _FILES, "projects.update"])
    | {"queues.get_all", "queues.get_by_id", "tasks.enqueue"},
    "compare": frozenset(["debug.ping", "auth.login", "projects.get_all", "tasks.get_all"])
    | {"models.get_all", "models.get_by_id", "tasks.get_by_id"},
}


def check_census(phase: str, endpoints: list[str]) -> None:
    """Fail naming any endpoint ``phase`` called that :data:`CENSUS` does not list; print
    what it called and the schema it was checked against (``pytest -s`` shows it)."""
    extra = sorted(set(endpoints) - CENSUS[phase])
    assert not extra, f"{phase} called endpoints missing from the census: {extra}"
    version = clearml_schema.schema_version(API_VERSION)
    print(f"census: {phase} (SDK API {version} schema): {', '.join(sorted(endpoints)) or '-'}")


def test_every_censused_endpoint_is_in_the_sdk_schema_and_the_fake() -> None:
    version = clearml_schema.schema_version(API_VERSION)
    fake = FakeClearMLServer()
    known = set(clearml_schema.SERVER_ONLY) | {_FILES}
    for endpoint in sorted(set().union(*CENSUS.values()) - known):
        assert clearml_schema.classes(endpoint, version) is not None, endpoint
        assert endpoint in fake.handlers, f"{endpoint}: the fake does not answer it"


def _run(root: Path, server: FakeClearMLServer, *argv: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update(server.env())
    env["HOME"] = str(root.parent)  # no ~/clearml.conf of the developer
    hosts = [
        f"clearml.server.api_host={server.api_host}",
        f"clearml.server.web_host={server.web_host}",
        f"clearml.server.files_host={server.files_host}",
    ]
    server.reset_calls()
    proc = subprocess.run(
        [*argv, *hosts],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return server.endpoints()


def test_endpoint_census(tmp_path: Path) -> None:
    """A tracked stage offline, its sync, two tracked stages online (prepare, train: a
    model), and doctor, against one strict fake."""
    root = make_scratch_repo(tmp_path / "repo", defaults={"tracking": "clearml"})
    small = ["data=synthetic", "data.n_rows=200"]
    python = sys.executable
    with FakeClearMLServer(queues=["default", "services"]) as server:
        stage = _run(root, server, python, "scripts/prepare.py", *small, "clearml.mode=offline")
        sync = _run(root, server, python, "scripts/clearml_sync.py")
        prepare = _run(root, server, python, "scripts/prepare.py", *small, "clearml.mode=online")
        train = _run(root, server, python, "scripts/train.py", *small, "clearml.mode=online")
        doctor = _run(root, server, str(Path(python).with_name("housing")), "doctor")
    check_census("tracked stage (offline)", stage)
    check_census("clearml sync", sync)
    online = list(dict.fromkeys(prepare + train))
    check_census("tracked stages (online)", online)
    check_census("doctor", doctor)
    assert {"tasks.create", "events.add_batch", "tasks.completed"} <= set(sync)
    assert {"tasks.create", "tasks.completed"} <= set(prepare) & set(train)
    assert {"models.create", "files.upload"} <= set(train)  # train registered its model
    assert {"auth.login", "queues.get_all", "workers.get_all"} <= set(doctor)
