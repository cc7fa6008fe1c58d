"""The strict ClearML fake: held to the SDK's own API schemas, and behaving like the server
where the project depends on it (hidden projects, paging, task status, set_ready)."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.fakes import clearml_schema
from tests.fakes.clearml_api import (
    API_VERSION,
    INVALID_CREDENTIALS,
    INVALID_TASK_STATUS,
    INVALID_TOKEN,
    MAX_PAGE_SIZE,
    MODEL_IS_READY,
    NO_CREDENTIALS,
    FakeClearMLServer,
)

_KEYS = "Basic " + base64.b64encode(b"k:s").decode()


def _call(
    server: FakeClearMLServer,
    endpoint: str,
    body: Any = None,
    *,
    version: str | None = "",
    auth: str = _KEYS,
) -> tuple[int, Any]:
    """POST ``body`` to ``endpoint`` at ``/v<version>/`` (the negotiated one when "", none
    when None) with the ``Authorization`` header ``auth``; (HTTP status, the envelope)."""
    prefix = "" if version is None else f"/v{version or server.schema_version}"
    request = urllib.request.Request(
        f"{server.url}{prefix}/{endpoint}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {}),
        method="POST",
    )
    return _reply(request)


def test_schema_version_is_the_one_the_sdk_negotiates() -> None:
    # the SDK uses the newest services module not above the token's api_version
    versions = clearml_schema.available_versions()
    assert clearml_schema.schema_version(API_VERSION) == "2.23" == versions[-1]
    assert clearml_schema.schema_version("2.21") == "2.20"


def test_unknown_endpoint_and_bad_field_fail_the_test_naming_them() -> None:
    server = FakeClearMLServer().start()
    status, reply = _call(server, "tasks.no_such_action")
    assert status == 404 and "tasks.no_such_action" in reply["meta"]["result_msg"]
    status, _ = _call(server, "tasks.get_all", {"page_size": "ten", "page": 0})
    assert status == 400
    with pytest.raises(AssertionError) as caught:
        server.stop()
    text = str(caught.value)
    assert "tasks.no_such_action: unknown endpoint in the SDK's API 2.23 schema" in text
    assert "tasks.get_all: request field page_size: 'ten' is not of type" in text


def test_a_response_that_breaks_the_sdk_schema_is_reported() -> None:
    server = FakeClearMLServer(projects=[{"name": 3}]).start()  # stored data the SDK rejects
    status, _ = _call(server, "projects.get_all")
    assert status == 200  # the answer goes out; the test fails on leaving
    with pytest.raises(AssertionError) as caught:
        server.stop()
    assert "projects.get_all: response field projects.0.name: 3 is not of type" in str(caught.value)
    assert "projects.get_all: response does not parse: TypeError" in str(caught.value)


def test_the_version_in_the_path_picks_the_schema_as_the_server_does() -> None:
    server = FakeClearMLServer().start()
    page = {"page": 0, "page_size": 5}
    assert _call(server, "tasks.get_all", page, version=None)[0] == 200
    assert _call(server, "tasks.get_all", page, version="2.31")[0] == 200  # above: the newest
    assert _call(server, "tasks.get_all", page, version="2.21")[0] == 200  # 2.20's schema
    metadata = {"model": "m", "metadata": []}  # models.add_or_update_metadata came in 2.13
    status, reply = _call(server, "models.add_or_update_metadata", metadata, version="2.9")
    assert status == 404 and "version 2.9" in reply["meta"]["result_msg"]
    assert _call(server, "tasks.get_all", {}, version="1.5")[0] == 404  # the SDK has no 1.x
    assert server.calls[1].version == "2.31"
    with pytest.raises(AssertionError) as caught:
        server.stop()
    text = str(caught.value)
    assert "models.add_or_update_metadata: no endpoint for name" in text
    assert "tasks.get_all: no endpoint for name tasks.get_all and version 1.5" in text
    assert "2 call(s)" in text  # the 2.31, 2.21 and unversioned calls were fine


def test_credentials_are_checked_as_the_server_does() -> None:
    with FakeClearMLServer(access_key="k", secret_key="s") as server:
        assert _call(server, "debug.ping", auth="")[0] == 200  # needs no credentials
        status, reply = _call(server, "queues.get_all", auth="")
        assert (status, reply["meta"]["result_subcode"]) == (401, NO_CREDENTIALS)
        wrong = "Basic " + base64.b64encode(b"k:other").decode()
        status, reply = _call(server, "auth.login", auth=wrong)
        assert (status, reply["meta"]["result_subcode"]) == (401, INVALID_CREDENTIALS)
        assert "invalid credentials" in reply["meta"]["result_msg"]
        status, reply = _call(server, "auth.login")
        token = reply["data"]["token"]
        assert _call(server, "queues.get_all", auth=f"Bearer {token}")[0] == 200
        forged = f"Bearer {token[:-4]}AAAA"
        status, reply = _call(server, "queues.get_all", auth=forged)
        assert (status, reply["meta"]["result_subcode"]) == (401, INVALID_TOKEN)


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
        published = {"task": task_id, "force": True, "publish": True}
        assert _call(server, "tasks.completed", published)[0] == 200 and task["published"]
        assert _call(server, "tasks.started", {"task": task_id})[0] == 400  # published is final


def test_set_ready_on_a_ready_model_is_refused() -> None:
    with FakeClearMLServer() as server:
        model = server.add_model(name="m")
        assert _call(server, "models.set_ready", {"model": model["id"]})[0] == 200
        status, reply = _call(server, "models.set_ready", {"model": model["id"]})
        assert (status, reply["meta"]["result_subcode"]) == (400, MODEL_IS_READY)


def _reply(request: urllib.request.Request) -> tuple[int, Any]:
    """Send ``request`` to the fake; (HTTP status, the JSON it answered), errors included."""
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post_lines(server: FakeClearMLServer, lines: list[str]) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{server.url}/v{server.schema_version}/events.add_batch",
        data="\n".join(lines).encode(),
        headers={"Content-Type": "application/json-lines", "Authorization": _KEYS},
        method="POST",
    )
    return _reply(request)


def test_event_batches_split_on_line_ends_only_and_a_bad_line_is_a_400() -> None:
    server = FakeClearMLServer().start()
    event = {"task": "t1", "type": "log", "timestamp": 1, "msg": "a\u2028b\x85c"}
    status, reply = _post_lines(server, [json.dumps(event, ensure_ascii=False)] * 2)
    assert (status, reply["data"]["added"]) == (200, 2)
    assert server.events("t1")[0]["msg"] == "a\u2028b\x85c"
    status, reply = _post_lines(server, [json.dumps(event), "{not json"])
    assert status == 400 and "batch item #1" in reply["meta"]["result_msg"]
    with pytest.raises(AssertionError, match=r"events.add_batch: batch item #1 is not JSON"):
        server.stop()
