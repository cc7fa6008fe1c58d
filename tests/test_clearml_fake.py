"""The strict ClearML fake: held to the SDK's own API schemas, and behaving like the server
where the project depends on it (hidden projects, paging, task status, set_ready)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.fakes import clearml_schema
from tests.fakes.clearml_api import (
    API_VERSION,
    INVALID_TASK_STATUS,
    MAX_PAGE_SIZE,
    MODEL_IS_READY,
    FakeClearMLServer,
)


def _call(server: FakeClearMLServer, endpoint: str, body: Any = None) -> tuple[int, Any]:
    """POST ``body`` to ``endpoint``; (HTTP status, the envelope)."""
    request = urllib.request.Request(
        f"{server.url}/v{server.schema_version}/{endpoint}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_schema_version_is_the_one_the_sdk_negotiates() -> None:
    # the SDK uses the newest services module not above the token's api_version
    versions = clearml_schema.available_versions()
    assert clearml_schema.schema_version(API_VERSION) == "2.23" == versions[-1]
    assert clearml_schema.schema_version("2.21") == "2.20"


def test_unknown_endpoint_and_bad_field_fail_the_test_naming_them() -> None:
    server = FakeClearMLServer().start()
    status, reply = _call(server, "tasks.no_such_action")
    assert status == 400 and "tasks.no_such_action" in reply["meta"]["result_msg"]
    status, _ = _call(server, "tasks.get_all", {"page_size": "ten", "page": 0})
    assert status == 400
    with pytest.raises(AssertionError) as caught:
        server.stop()
    text = str(caught.value)
    assert "tasks.no_such_action: unknown endpoint in the SDK's API 2.23 schema" in text
    assert "tasks.get_all: request field page_size: 'ten' is not of type" in text


def test_a_response_that_breaks_the_sdk_schema_is_reported() -> None:
    server = FakeClearMLServer(strict=False).start()
    server.handlers["projects.get_all"] = lambda _s, _b: {"projects": [{"name": 3}]}
    status, _ = _call(server, "projects.get_all")
    server.stop()  # not strict: records only
    assert status == 200
    assert server.violations == [
        "projects.get_all: response field projects.0.name: 3 is not of type 'string', 'null'",
        "projects.get_all: response does not parse: TypeError: Expected name of type"
        " (<class 'str'>,), got int",
    ]


def test_hidden_projects_and_tasks_need_search_hidden() -> None:
    with FakeClearMLServer() as server:
        project = server.add_project("housing")
        server.add_task(name="t", project=project["id"], system_tags=["hidden"])
        assert _call(server, "projects.update", {"project": project["id"], "bogus": 1})[0] == 200
        update = {"project": project["id"], "system_tags": ["hidden", "pipeline"]}
        assert _call(server, "projects.update", update)[0] == 200
        by_name = {"name": "^housing$"}
        assert _call(server, "projects.get_all", by_name)[1]["data"]["projects"] == []
        found = _call(server, "projects.get_all", {**by_name, "search_hidden": True})
        assert [p["id"] for p in found[1]["data"]["projects"]] == [project["id"]]
        assert _call(server, "tasks.get_all", {})[1]["data"]["tasks"] == []
        assert len(_call(server, "tasks.get_all", {"search_hidden": True})[1]["data"]["tasks"]) == 1


def test_pages_default_to_and_are_capped_at_500() -> None:
    with FakeClearMLServer() as server:
        for index in range(MAX_PAGE_SIZE + 3):
            server.add_model(name=f"m{index}")
        first = _call(server, "models.get_all", {"only_fields": ["name"]})[1]["data"]["models"]
        assert len(first) == MAX_PAGE_SIZE and set(first[0]) == {"id", "name"}
        second = _call(server, "models.get_all", {"page": 1, "page_size": 10_000})
        assert len(second[1]["data"]["models"]) == 3


def test_task_status_machine_and_timestamps() -> None:
    with FakeClearMLServer() as server:
        task_id = _call(server, "tasks.create", {"name": "t", "type": "training"})[1]["data"]["id"]
        task = server.tasks[task_id]
        assert task["created"] and "started" not in task
        # a client cannot set the times: create/edit keep only the server's create_fields
        edit = {"task": task_id, "comment": "c", "started": "2001-01-01T00:00:00+00:00"}
        assert _call(server, "tasks.edit", edit)[0] == 200
        assert "started" not in task and task["comment"] == "c"
        status, reply = _call(server, "tasks.completed", {"task": task_id})
        assert (status, reply["meta"]["result_subcode"]) == (400, INVALID_TASK_STATUS)
        assert _call(server, "tasks.started", {"task": task_id})[0] == 200
        started = task["started"]
        assert task["status"] == "in_progress" and task["status_changed"] >= task["created"]
        status, _ = _call(server, "tasks.edit", {"task": task_id, "comment": "d"})
        assert status == 400  # not created any more, and no force
        assert (
            _call(server, "tasks.edit", {"task": task_id, "comment": "d", "force": True})[0] == 200
        )
        assert _call(server, "tasks.completed", {"task": task_id})[0] == 200
        assert task["status"] == "completed" and task["completed"] >= started
        assert _call(server, "tasks.started", {"task": task_id})[0] == 200  # completed -> run
        assert task["started"] == started  # an earlier start is kept
        forced = {"task": task_id, "force": True}
        assert _call(server, "tasks.publish", forced)[0] == 200 and task["published"]
        assert _call(server, "tasks.started", {"task": task_id})[0] == 400  # published is final


def test_set_ready_on_a_ready_model_is_refused() -> None:
    with FakeClearMLServer() as server:
        model = server.add_model(name="m")
        assert _call(server, "models.set_ready", {"model": model["id"]})[0] == 200
        status, reply = _call(server, "models.set_ready", {"model": model["id"]})
        assert (status, reply["meta"]["result_subcode"]) == (400, MODEL_IS_READY)
