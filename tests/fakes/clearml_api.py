"""A thin recording fake of the ClearML server API (and its file server) for tests.

It runs ``http.server`` on 127.0.0.1 in a thread, answers the endpoints the ClearML SDK
uses to import an offline session or query tasks/models, in the server's JSON envelope
``{"meta": {...}, "data": {...}}``, and records every call for assertions::

    with FakeClearMLServer() as server:
        env = server.env(access_key="k", secret_key="s")   # CLEARML_API_HOST & co.
        ...                                                # run the SDK against it
        assert server.calls_to("tasks.create")[0]["name"] == "housing:train_ridge"

Requests arrive as ``/<service>.<action>`` or ``/v<major.minor>/<service>.<action>`` (GET or
POST with a JSON body; ``events.add_batch`` sends one JSON event per line, recorded as a
list). Uploads to the file server (``files_host`` = ``<url>/files``) are multipart POSTs,
recorded as ``files.upload`` and kept in ``uploads`` (path -> bytes). Tasks always carry
``"output": {}`` (the SDK needs it).

**Strict, with no switch to loosen it.** A call is checked against the schema of the version
in its path, as the server resolves it (:meth:`FakeClearMLServer.resolve_version`): the
SDK's services module of the newest version not above it, or the fake's negotiated version
(``server.schema_version``) when the path has none. The request must fit the SDK's request
schema, and every answer its response schema and class (:mod:`tests.fakes.clearml_schema`).
An unknown endpoint, one missing at the version asked for (404, as the server answers), an
endpoint the fake does not implement, a path that is no API path, or a schema violation is
recorded in ``server.violations``; ``stop()`` / leaving the ``with`` block then raises
``AssertionError`` naming each endpoint and field, so the test fails even when the SDK
swallows the error.

**Credentials as the server checks them.** Every endpoint but ``debug.ping``,
``server.info`` and ``auth.fixed_users_mode`` answers 401 without credentials (subcode 20),
with HTTP basic keys other than ``access_key``/``secret_key`` when those are given (22,
"invalid credentials"), or with a bearer token this fake did not issue (30).

**Like clearml-server 2.0.0** (its sources named at each rule): task status changes follow
the server's state machine (``force`` skips it) and stamp ``status_changed``,
``last_update``, ``last_change`` and ``started`` / ``completed`` / ``published`` at the
transition; a client cannot set those times (tasks.create / tasks.edit keep only the
server's ``create_fields``; tasks.edit needs a ``created`` task unless ``force``);
``models.set_ready`` on a ready model answers 400 ``model_is_ready``; objects with the
``hidden`` system tag (``projects.update`` sets it) are left out of projects/tasks
``get_all`` unless ``search_hidden`` or ids are given; ``get_all`` pages default to page 0
of :data:`MAX_PAGE_SIZE` and are capped there; ``only_fields`` projects.

``fail(endpoint, times, status, message)`` injects error answers (a server fault, or a
server that echoes what it got; not a loosening: the call is still validated first).
``workers={"agent-id": ["queue"]}`` / ``add_worker`` register agents for
``workers.get_all``; ``add_queue(name, pending=[task ids])`` fills a queue. The server only
queues an enqueued task; ``agent_completes=True`` (or the attribute) stands in for an agent
that takes it at once and runs it to ``completed`` through the state machine, with its
``started`` / ``completed`` times; ``agent_reports`` (a function of the task giving
``{(title, series): value}``) makes that agent report those scalars, at iteration 0, as the
task's events (``events.scalar_metrics_iter_histogram`` answers them) and ``last_metrics``.
Tasks, models and projects can be preloaded (constructor or ``add_task`` / ``add_model`` /
``add_project``; ``project_name=`` becomes a project id) for compare-style tests;
``tasks.get_all`` / ``models.get_all`` filter on ``id``, ``name`` (a regex, as the server
does), ``project``, ``status``, ``task``, ``ready``, ``tags`` / ``system_tags`` (OR,
``__$all`` for AND, ``-tag`` to exclude), ``_all_`` / ``_any_`` (``{fields, pattern}``: a
regex in all / any of the dotted fields, how ``PipelineController`` finds cached steps),
sort with ``order_by`` and project with ``only_fields`` (the named fields only, dotted paths
such as ``metadata.k`` included, plus ``id``).
"""

from __future__ import annotations

import base64
import copy
import email.parser
import email.policy
import hashlib
import hmac
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote

from tests.fakes import clearml_schema

API_VERSION = "2.30"
SERVER_VERSION = "2.0.0"
MAX_PAGE_SIZE = 500  # clearml-server 2.0.0: get_all pages default to and are capped at 500

# service_repo.py ``_endpoint_exp``: an optional ``v<major>.<minor>/`` and a trailing slash
_ENDPOINT = re.compile(r"^/(?:v(?P<version>\d+\.\d+)/)?(?P<endpoint>[a-z_]+\.[a-z_]+)/?$")

Handler = Callable[["FakeClearMLServer", dict[str, Any]], dict[str, Any]]


@dataclass
class Call:
    """One recorded request."""

    endpoint: str  # "tasks.create"; "files.upload" for a file-server upload
    body: Any  # the parsed JSON body ({} when empty; a list of events for add_batch)
    method: str = "POST"
    version: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_TOKEN_KEY = b"fake-clearml"


def make_token(payload: Mapping[str, Any], key: bytes = _TOKEN_KEY) -> str:
    """An HS256 JWT the SDK can decode (it reads ``api_version`` and ``exp`` unverified)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(dict(payload)).encode())
    signature = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64(signature)}"


def token_is_valid(token: str) -> bool:
    """A token :func:`make_token` signed with this fake's key, not expired."""
    header, _, rest = token.partition(".")
    body, _, signature = rest.partition(".")
    expected = hmac.new(_TOKEN_KEY, f"{header}.{body}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(_b64(expected), signature):
        return False
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except ValueError:
        return False
    return isinstance(payload, dict) and float(payload.get("exp") or 0) > time.time()


class FakeClearMLServer:
    """The fake server: start/stop it, or use it as a context manager."""

    def __init__(
        self,
        *,
        tasks: Iterable[Mapping[str, Any]] = (),
        models: Iterable[Mapping[str, Any]] = (),
        projects: Iterable[Mapping[str, Any]] = (),
        queues: Iterable[str] = (),
        workers: Mapping[str, Iterable[str]] | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        agent_completes: bool = False,
    ) -> None:
        self.calls: list[Call] = []
        self.tasks: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.projects: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.workers: dict[str, list[str]] = {}
        self.agent_completes = agent_completes
        # The stand-in agent's scalars per task: {(title, series): value} (None: none).
        self.agent_reports: Callable[[dict[str, Any]], Mapping[tuple[str, str], float]] | None = (
            None
        )
        self.agent_events: list[dict[str, Any]] = []  # the events that agent reported
        self.uploads: dict[str, bytes] = {}
        self.handlers: Mapping[str, Handler] = MappingProxyType(_HANDLERS)  # not patchable
        self._failures: dict[str, list[tuple[int, str]]] = {}
        self.violations: list[str] = []
        self.schema_version = clearml_schema.schema_version(API_VERSION)
        self.access_key = access_key
        self.secret_key = secret_key
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for project in projects:
            self.add_project(**project)
        for queue in queues:
            self.add_queue(queue)
        for worker, listens_on in (workers or {}).items():
            self.add_worker(worker, listens_on)
        for task in tasks:
            self.add_task(**task)
        for model in models:
            self.add_model(**model)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeClearMLServer:
        """Listen on a free 127.0.0.1 port in a daemon thread."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_request_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening, then fail if any call broke the SDK's schema."""
        self._shutdown()
        self.assert_schema_clean()

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def assert_schema_clean(self) -> None:
        """Raise ``AssertionError`` listing every schema violation."""
        with self._lock:
            problems = list(dict.fromkeys(self.violations))
        if problems:
            raise AssertionError(
                f"ClearML fake: {len(problems)} call(s) broke the SDK's API "
                f"{self.schema_version} schema:\n  " + "\n  ".join(problems)
            )

    def __enter__(self) -> FakeClearMLServer:
        return self.start()

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._shutdown()
        if exc_type is None:  # a failing test keeps its own error
            self.assert_schema_clean()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the API host."""
        if self._server is None:
            raise RuntimeError("FakeClearMLServer is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def api_host(self) -> str:
        return self.url

    @property
    def files_host(self) -> str:
        return f"{self.url}/files"

    @property
    def web_host(self) -> str:
        return f"{self.url}/web"

    def env(
        self, access_key: str = "fake-access", secret_key: str = "fake-secret"
    ) -> dict[str, str]:
        """Environment variables pointing the ClearML SDK at this fake."""
        return {
            "CLEARML_API_HOST": self.api_host,
            "CLEARML_WEB_HOST": self.web_host,
            "CLEARML_FILES_HOST": self.files_host,
            "CLEARML_API_ACCESS_KEY": access_key,
            "CLEARML_API_SECRET_KEY": secret_key,
        }

    # ------------------------------------------------------------------ records

    def calls_to(self, endpoint: str) -> list[Any]:
        """Bodies of every call to ``endpoint`` (``"tasks.create"``), in order."""
        with self._lock:
            return [c.body for c in self.calls if c.endpoint == endpoint]

    def endpoints(self) -> list[str]:
        """Every endpoint called, first-call order, without repeats."""
        with self._lock:
            return list(dict.fromkeys(c.endpoint for c in self.calls))

    def events(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """Every event sent with ``events.add_batch`` (optionally of one task)."""
        out: list[dict[str, Any]] = []
        for batch in self.calls_to("events.add_batch"):
            out.extend(e for e in batch if task_id is None or e.get("task") == task_id)
        return out

    def fail(self, endpoint: str, times: int = 1, status: int = 400, message: str = "") -> None:
        """Answer the next ``times`` calls to ``endpoint`` with an error ``status``."""
        with self._lock:
            self._failures.setdefault(endpoint, []).extend(
                [(status, message or f"injected failure of {endpoint}")] * times
            )

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    # ------------------------------------------------------------------ preloading

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._counter):04d}{uuid.uuid4().hex[:24]}"

    def add_project(self, name: str, id: str | None = None, **extra: Any) -> dict[str, Any]:
        project = {
            "id": id or self.new_id("p"),
            "name": name,
            "tags": [],
            "system_tags": [],
            "created": _now(),
            **extra,
        }
        self.projects[project["id"]] = project
        return project

    def add_queue(self, name: str, pending: Iterable[str] = ()) -> dict[str, Any]:
        """A queue ``name`` (id ``q-<name>``) holding the task ids ``pending``."""
        entries = [{"task": task_id, "added": _now()} for task_id in pending]
        queue: dict[str, Any] = {"id": f"q-{name}", "name": name, "entries": entries}
        queue["created"] = _now()
        self.queues[f"q-{name}"] = queue
        return queue

    def add_worker(self, worker_id: str, queues: Iterable[str] = ()) -> None:
        """An agent ``worker_id`` listening on the queues named ``queues`` (added if missing)."""
        for name in queues:
            if f"q-{name}" not in self.queues:
                self.add_queue(name)
        self.workers[worker_id] = [f"q-{name}" for name in queues]

    def project_id(self, name: str) -> str:
        """The id of project ``name``, created if missing."""
        for project in self.projects.values():
            if project["name"] == name:
                return str(project["id"])
        return str(self.add_project(name)["id"])

    def add_task(self, **fields: Any) -> dict[str, Any]:
        """Store a task; ``project_name=`` is turned into a project id."""
        project_name = fields.pop("project_name", None)
        if project_name is not None:
            fields["project"] = self.project_id(project_name)
        task: dict[str, Any] = {
            "id": fields.pop("id", None) or self.new_id("t"),
            "name": "",
            "type": "training",
            "status": "created",
            "tags": [],
            "system_tags": [],
            "created": _now(),
            "last_update": _now(),
            "output": {},
            "execution": {},
            "hyperparams": {},
            "configuration": {},
            "runtime": {},
            "last_metrics": {},
            **fields,
        }
        task.setdefault("output", {})
        self.tasks[task["id"]] = task
        return task

    def add_model(self, **fields: Any) -> dict[str, Any]:
        """Store a model; ``project_name=`` is turned into a project id."""
        project_name = fields.pop("project_name", None)
        if project_name is not None:
            fields["project"] = self.project_id(project_name)
        model: dict[str, Any] = {
            "id": fields.pop("id", None) or self.new_id("m"),
            "name": "",
            "tags": [],
            "system_tags": [],
            "framework": "",
            "uri": "",
            "comment": "",
            "ready": False,
            "created": _now(),
            "last_update": _now(),
            "metadata": {},
            "design": {},
            "labels": {},
            **fields,
        }
        self.models[model["id"]] = model
        return model

    # ------------------------------------------------------------------ dispatch

    def resolve_version(self, endpoint: str, version: str | None) -> tuple[str, list[str]]:
        """The SDK schema version a call to ``/v<version>/<endpoint>`` is checked against, or
        why the server has no such endpoint (answered 404, as it does).

        The server serves the newest version of an endpoint not above the one asked for (its
        newest when the path has none; a version above its own is allowed:
        ``check_max_version`` is off by default); the SDK ships one services module per API
        version, so the newest module not above ``version`` is the schema of that call."""
        if version is None or endpoint in clearml_schema.SERVER_ONLY:
            return self.schema_version, []
        try:
            chosen = clearml_schema.schema_version(version)
        except ValueError:
            chosen = ""
        known = clearml_schema.classes(endpoint, self.schema_version) is not None
        if known and (not chosen or clearml_schema.classes(endpoint, chosen) is None):
            return chosen, [f"{endpoint}: no endpoint for name {endpoint} and version {version}"]
        return chosen or self.schema_version, []

    def refusal(self, endpoint: str, authorization: str) -> tuple[int, str] | None:
        """Why the server answers 401 (subcode, message), or None: every endpoint but
        ``debug.ping``, ``server.info`` and ``auth.fixed_users_mode`` needs HTTP basic
        credentials (checked against ``access_key``/``secret_key`` when given) or a bearer
        token this fake issued (service_repo/validators.py ``validate_auth``)."""
        if endpoint in OPEN_ENDPOINTS:
            return None
        scheme, _, data = authorization.partition(" ")
        if not authorization:
            return NO_CREDENTIALS, "Unauthorized (missing credentials)"
        if scheme == "Basic":
            if self.access_key is None and self.secret_key is None:
                return None
            expected = base64.b64encode(f"{self.access_key}:{self.secret_key}".encode())
            if data == expected.decode():
                return None
            message = "Unauthorized (invalid credentials) (failed to locate provided credentials)"
            return INVALID_CREDENTIALS, message
        if scheme == "Bearer":
            return None if token_is_valid(data) else (INVALID_TOKEN, "Invalid token")
        return BAD_AUTH_TYPE, "Unauthorized (bad authentication header type)"

    def handle(
        self, endpoint: str, body: Any, version: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Answer one call: the request is checked against the SDK's schema of the version
        asked for (a violation is recorded and answered 400, an endpoint missing at that
        version 404, as the server would), then handled, then the answer is checked against
        the SDK's response schema and class."""
        schema_version, missing = self.resolve_version(endpoint, version)
        if missing:
            with self._lock:
                self.violations.extend(missing)
            return 404, {"_error": missing[0]}
        problems = clearml_schema.request_problems(endpoint, body, schema_version)
        handler = self.handlers.get(endpoint)
        if not problems and handler is None:
            problems = [f"{endpoint}: not implemented by the fake (add a handler)"]
        if problems:
            with self._lock:
                self.violations.extend(problems)
            unknown = clearml_schema.classes(endpoint, schema_version) is None
            status = 404 if unknown and endpoint not in clearml_schema.SERVER_ONLY else 400
            return status, {"_error": problems[0], "_subcode": VALIDATION_ERROR}
        with self._lock:
            pending = self._failures.get(endpoint)
            if pending:
                status, message = pending.pop(0)
                return status, {"_error": message}
        assert handler is not None
        handler_body = body if isinstance(body, dict) else {"_events": body}
        try:
            with self._lock:
                data = handler(self, handler_body)
        except ApiError as exc:
            return exc.status, {"_error": str(exc), "_subcode": exc.subcode}
        except Exception as exc:  # a fake's bug: answered 500, as the server would, and failed
            problem = f"{endpoint}: the fake's handler raised {type(exc).__name__}: {exc}"
            with self._lock:
                self.violations.append(problem)
            return 500, {"_error": problem}
        problems = clearml_schema.response_problems(endpoint, data, schema_version)
        if problems:
            with self._lock:
                self.violations.extend(problems)
        return 200, data


class ApiError(Exception):
    """An error answer: HTTP ``status``, the server's ``subcode`` and message."""

    def __init__(self, message: str, status: int = 400, subcode: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.subcode = subcode


# clearml-server 2.0.0 apierrors/errors.conf (bad_request: 400)
INVALID_TASK_ID = 101
INVALID_TASK_STATUS = 110
INVALID_MODEL_ID = 201
MODEL_IS_READY = 203
INVALID_PROJECT_ID = 401
INVALID_QUEUE_ID = 701
VALIDATION_ERROR = 12
# 401 subcodes
BAD_AUTH_TYPE = 10
NO_CREDENTIALS = 20
INVALID_CREDENTIALS = 22
INVALID_TOKEN = 30
# schema/services/*.conf ``authorize: false``: the endpoints that need no credentials
OPEN_ENDPOINTS = frozenset({"debug.ping", "server.info", "auth.fixed_users_mode"})


def _not_found(kind: str, item_id: Any, subcode: int) -> ApiError:
    return ApiError(f"Invalid {kind} id: {kind}={item_id}", 400, subcode)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime())


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _tags_match(tags: Iterable[str], query: Any) -> bool:
    """Server tag filter: OR by default, ``__$all`` for AND, ``-tag`` / ``__$not`` exclude."""
    have = set(tags)
    wanted: list[str] = []
    excluded: list[str] = []
    mode_all = False
    negate = False
    for token in (str(t) for t in _as_list(query)):
        if token in ("__$all", "__$and"):
            mode_all = True
        elif token == "__$or":
            mode_all = False
        elif token == "__$not":
            negate = True
        elif token.startswith("-") or negate:
            excluded.append(token[1:] if token.startswith("-") else token)
            negate = False
        else:
            wanted.append(token)
    if any(t in have for t in excluded):
        return False
    if not wanted:
        return True
    return all(t in have for t in wanted) if mode_all else any(t in have for t in wanted)


def _matches(item: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    ids = _as_list(body.get("id"))
    if ids and item.get("id") not in ids:
        return False
    name = body.get("name")
    if name and not re.search(str(name), str(item.get("name", ""))):
        return False
    for key in ("project", "status", "task", "type"):
        wanted = _as_list(body.get(key))
        if wanted and item.get(key) not in wanted:
            return False
    if body.get("ready") is not None and bool(item.get("ready")) != bool(body["ready"]):
        return False
    if not _field_pattern(item, body.get("_all_"), all) or not _field_pattern(
        item, body.get("_any_"), any
    ):
        return False
    if not _tags_match(item.get("tags") or [], body.get("tags")):
        return False
    return _tags_match(item.get("system_tags") or [], body.get("system_tags"))


def _field_pattern(
    item: Mapping[str, Any], query: Any, combine: Callable[[Iterable[bool]], bool]
) -> bool:
    """The server's ``_all_`` / ``_any_`` filter: ``{fields, pattern}``, the pattern a regex
    searched in every (``all``) or some (``any``) of the dotted fields."""
    if not isinstance(query, Mapping):
        return True
    pattern = re.compile(str(query.get("pattern") or ""))

    def value(dotted: str) -> str:
        found: Any = item
        for part in dotted.split("."):
            found = found.get(part) if isinstance(found, Mapping) else None
        return "" if found is None else str(found)

    return combine(pattern.search(value(str(f))) is not None for f in _as_list(query.get("fields")))


def _field_key(name: str) -> Callable[[Mapping[str, Any]], str]:
    def key(item: Mapping[str, Any]) -> str:
        return str(item.get(name, ""))

    return key


def _page(items: list[dict[str, Any]], body: Mapping[str, Any]) -> list[dict[str, Any]]:
    order = _as_list(body.get("order_by"))
    for spec in (str(o) for o in reversed(order)):
        name = spec.lstrip("-+")
        items = sorted(items, key=_field_key(name), reverse=spec.startswith("-"))
    # database/model/base.py validate_paging: page 0 and page_size 500 unless sent; capped
    size = int(body.get("page_size") or MAX_PAGE_SIZE) if "page_size" in body else MAX_PAGE_SIZE
    page = int(body.get("page") or 0)
    if size < 1 or page < 0:
        raise ApiError("page must be >=0 and page_size >0", 400, VALIDATION_ERROR)
    size = min(size, MAX_PAGE_SIZE)
    items = items[page * size : (page + 1) * size]
    fields = _as_list(body.get("only_fields"))
    return [_only(item, fields) for item in items] if fields else items


def _only(item: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """``item`` with only ``fields`` (dotted paths into nested objects) and ``id``."""
    out: dict[str, Any] = {"id": item.get("id")}
    for path in fields:
        *parents, last = str(path).split(".")
        source: Any = item
        for key in parents:
            source = source.get(key) if isinstance(source, Mapping) else None
        if isinstance(source, Mapping) and last in source:
            target = out
            for key in parents:
                target = target.setdefault(key, {})
            target[last] = source[last]
    return out


def _login(server: FakeClearMLServer, _body: dict[str, Any]) -> dict[str, Any]:
    payload = {
        "api_version": API_VERSION,
        "server_version": SERVER_VERSION,
        "env": "test",
        "identity": {"user": "fake-user", "company": "fake-company", "role": "user"},
        "exp": int(time.time()) + 24 * 3600,
    }
    return {"token": make_token(payload)}


def _ping(_server: FakeClearMLServer, _body: dict[str, Any]) -> dict[str, Any]:
    return {"msg": "ClearML server (fake)"}


HIDDEN = "hidden"  # the system tag the server hides projects and tasks by


def _visible(item: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """services/{projects,tasks}.py ``_hidden_query``: hidden objects are left out unless
    ``search_hidden`` is set or ids are asked for."""
    if body.get("search_hidden") or body.get("id"):
        return True
    return HIDDEN not in (item.get("system_tags") or [])


def _projects_get_all(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    items = [p for p in server.projects.values() if _visible(p, body) and _matches(p, body)]
    return {"projects": _page(items, body)}


_PROJECT_FIELDS = ("name", "description", "tags", "system_tags", "default_output_destination")


def _projects_create(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    fields = {k: body[k] for k in _PROJECT_FIELDS if body.get(k) is not None}
    project = server.add_project(**fields)
    return {"id": project["id"]}


def _projects_update(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    """What ``PipelineController`` sends to mark its project ``[hidden, pipeline]``."""
    project_id = body.get("project")
    if project_id not in server.projects:
        raise _not_found("project", project_id, INVALID_PROJECT_ID)
    fields = {k: body[k] for k in _PROJECT_FIELDS if body.get(k) is not None}
    server.projects[str(project_id)].update(fields, last_update=_now())
    return {"updated": 1, "fields": fields}


# clearml-server 2.0.0 services/tasks.py ``create_fields``: what tasks.create / tasks.edit
# store; anything else in the body (``started``, ``completed``, ``created``...) is ignored.
TASK_CREATE_FIELDS = frozenset(
    [
        "name",
        "tags",
        "system_tags",
        "type",
        "error",
        "comment",
        "parent",
        "project",
        "input",
        "models",
        "container",
        "output_dest",
        "execution",
        "hyperparams",
        "configuration",
        "script",
        "runtime",
    ]
)
# database/model/task/task.py: editing only these does not touch ``last_update``
_TASK_USER_SET = frozenset(
    ["name", "comment", "project", "tags", "system_tags", "status_message", "created"]
)

# bll/task/utils.py ``state_machine``: allowed status changes (unless ``force``)
TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    "created": frozenset({"queued", "in_progress"}),
    "queued": frozenset({"created", "in_progress", "stopped"}),
    "in_progress": frozenset({"stopped", "failed", "created", "completed"}),
    "stopped": frozenset(
        {"closed", "created", "failed", "queued", "in_progress", "published", "publishing"}
        | {"completed"}
    ),
    "closed": frozenset({"created", "failed", "published", "publishing", "stopped"}),
    "failed": frozenset({"created", "stopped", "published", "queued"}),
    "publishing": frozenset({"published"}),
    "published": frozenset(),
    "completed": frozenset({"published", "in_progress", "created"}),
}


def _task_fields(body: Mapping[str, Any], allowed: Iterable[str]) -> dict[str, Any]:
    """The body's fields the server stores (``output_dest`` -> ``output.destination``)."""
    fields = {k: v for k, v in body.items() if k in allowed and v is not None}
    if "output_dest" in fields:
        fields["output"] = {"destination": fields.pop("output_dest")}
    return fields


def _tasks_create(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    now = _now()
    fields = _task_fields(body, TASK_CREATE_FIELDS)
    task = server.add_task(**fields, created=now, last_update=now, last_change=now)
    return {"id": task["id"]}


def _tasks_clone(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    """A ``created`` copy of ``task`` (bll/task ``clone_task``): the ``new_task_*`` fields
    replace the source's; no outputs, metrics or status history are copied."""
    source = _task(server, body)
    now = _now()
    keep = ("type", "project", "script", "hyperparams", "configuration", "tags", "container")
    fields = {k: copy.deepcopy(source[k]) for k in keep if k in source}
    for key in ("name", "comment", "tags", "system_tags", "parent", "project", "hyperparams"):
        if body.get(f"new_task_{key}") is not None:
            fields[key] = copy.deepcopy(body[f"new_task_{key}"])
    fields.setdefault("name", source.get("name", ""))
    task = server.add_task(**fields, created=now, last_update=now, last_change=now)
    return {"id": task["id"]}


def _task(server: FakeClearMLServer, body: Mapping[str, Any]) -> dict[str, Any]:
    task_id = body.get("task")
    if task_id not in server.tasks:
        raise _not_found("task", task_id, INVALID_TASK_ID)
    return server.tasks[str(task_id)]


def _tasks_edit(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    """As the server: only a ``created`` task unless ``force``; only ``create_fields`` + status."""
    task = _task(server, body)
    if not body.get("force") and task.get("status") != "created":
        raise ApiError(
            f"Invalid task status: expected=created, status={task.get('status')}",
            400,
            INVALID_TASK_STATUS,
        )
    fields = _task_fields(body, TASK_CREATE_FIELDS | {"status"})
    task.update(fields)
    if fields:
        now = _now()
        task["last_change"] = now
        if not set(fields) <= _TASK_USER_SET:
            task["last_update"] = now
    return {"updated": 1, "fields": fields}


def set_task_status(
    task: dict[str, Any], status: str, body: Mapping[str, Any], **stamps: str
) -> dict[str, Any]:
    """One status change as ``ChangeStatusRequest.execute`` does it: the state machine
    (skipped with ``force``; the same status is allowed), then ``status_changed``,
    ``last_update``, ``last_change`` and the given ``stamps`` set to now."""
    current = str(task.get("status") or "created")
    if not body.get("force") and status != current and status not in TASK_TRANSITIONS[current]:
        raise ApiError(
            f"Invalid status change: current_status={current}, new_status={status}",
            400,
            INVALID_TASK_STATUS,
        )
    now = _now()
    fields: dict[str, Any] = {
        "status": status,
        "status_reason": body.get("status_reason") or "",
        "status_message": body.get("status_message") or "",
        "status_changed": now,
        "last_update": now,
        "last_change": now,
        **stamps,
    }
    task.update(fields)
    return fields


def _status_setter(status: str, stamp: str | None = None) -> Handler:
    """tasks.<status>: ``stamp`` (``completed``, ``published``) is set to now as well."""

    def handler(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
        task = _task(server, body)
        stamps = {stamp: _now()} if stamp else {}
        return {"updated": 1, "fields": set_task_status(task, status, body, **stamps)}

    return handler


def _tasks_started(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    """``started`` is now, or kept when an earlier start is recorded (server's ``min__``)."""
    task = _task(server, body)
    now = _now()
    started = min(str(task["started"]), now) if task.get("started") else now
    fields = set_task_status(task, "in_progress", body, started=started)
    return {"updated": 1, "started": 1, "fields": fields}


def _tasks_completed(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    task = _task(server, body)
    fields = set_task_status(task, "completed", body, completed=_now())
    if not body.get("publish"):
        return {"updated": 1, "fields": fields}
    published = set_task_status(task, "published", body, published=_now())
    return {"updated": 1, "published": 1, "fields": {**fields, **published}}


def _tasks_ping(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    _task(server, body)["last_update"] = _now()  # a running task's keep-alive
    return {}


def _tasks_get_all(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    items = [t for t in server.tasks.values() if _visible(t, body) and _matches(t, body)]
    return {"tasks": _page(items, body)}


def _tasks_get_by_id(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    return {"task": _task(server, body)}


def _tasks_edit_hyper_params(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    task = _task(server, body)
    if body.get("replace_hyperparams") == "all":
        task["hyperparams"] = {}
    params = task.setdefault("hyperparams", {})
    for item in _as_list(body.get("hyperparams")):
        params.setdefault(item.get("section", "General"), {})[item.get("name", "")] = item
    return {"updated": 1}


def _tasks_add_or_update_artifacts(
    server: FakeClearMLServer, body: dict[str, Any]
) -> dict[str, Any]:
    task = _task(server, body)
    artifacts = task.setdefault("execution", {}).setdefault("artifacts", [])
    for item in _as_list(body.get("artifacts")):
        artifacts[:] = [a for a in artifacts if a.get("key") != item.get("key")] + [item]
    return {"updated": 1}


def _tasks_add_or_update_model(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    task = _task(server, body)
    kind = body.get("type", "output")
    entries = task.setdefault("models", {}).setdefault(kind, [])
    entry = {"name": body.get("name"), "model": body.get("model")}
    entries[:] = [e for e in entries if e.get("name") != entry["name"]] + [entry]
    return {"updated": 1}


def _tasks_set_requirements(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    task = _task(server, body)
    task.setdefault("script", {})["requirements"] = body.get("requirements") or {}
    return {"updated": 1}


def _projects_get_by_id(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    project_id = body.get("project")
    if project_id not in server.projects:
        raise _not_found("project", project_id, INVALID_PROJECT_ID)
    return {"project": server.projects[str(project_id)]}


def _model(server: FakeClearMLServer, model_id: Any) -> dict[str, Any]:
    if model_id not in server.models:
        raise _not_found("model", model_id, INVALID_MODEL_ID)
    return server.models[str(model_id)]


def _models_create(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    model = server.add_model(**{k: v for k, v in body.items() if k != "id"})
    return {"id": model["id"], "created": True}


def _models_edit(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    model = _model(server, body.get("model"))
    fields = {k: v for k, v in body.items() if k != "model"}
    model.update(fields)
    model["last_update"] = _now()
    return {"updated": 1, "fields": fields}


def _models_metadata(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    model = _model(server, body.get("model"))
    for item in _as_list(body.get("metadata")):
        model.setdefault("metadata", {})[item.get("key", "")] = item
    return {"updated": 1}


def _models_get_all(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    items = [m for m in server.models.values() if _matches(m, body)]
    return {"models": _page(items, body)}


def _models_get_by_id(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    return {"model": _model(server, body.get("model"))}


def _models_publish(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    model = _model(server, body.get("model"))
    if model.get("ready"):
        raise ApiError(f"Model is ready: model={model['id']}", 400, MODEL_IS_READY)
    model["ready"] = True
    return {"updated": 1, "published_task": {}}


def _queues_get_all(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    items = [q for q in server.queues.values() if _matches(q, body)]
    return {"queues": _page(items, body)}


def _queues_get_by_id(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    queue_id = body.get("queue")
    if queue_id not in server.queues:
        raise ApiError(f"Invalid queue id: queue={queue_id}", 400, INVALID_QUEUE_ID)
    return {"queue": server.queues[str(queue_id)]}


def _md5(text: str) -> str:
    """A ``last_metrics`` key: the server keys metrics and variants by their md5."""
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def _tasks_enqueue(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    """Queue a task (``queue`` id, else ``queue_name``): status ``queued``, as the server."""
    task = _task(server, body)
    queue_id = body.get("queue") or f"q-{body.get('queue_name') or 'default'}"
    if queue_id not in server.queues:
        raise ApiError(f"Invalid queue id: queue={queue_id}", 400, INVALID_QUEUE_ID)
    fields = set_task_status(task, "queued", body)
    task.setdefault("execution", {})["queue"] = queue_id
    if server.agent_completes:  # an agent takes it at once and completes it
        set_task_status(task, "in_progress", {}, started=_now())
        reported = server.agent_reports(task) if server.agent_reports else {}
        for (title, series), value in reported.items():
            last = {"metric": title, "variant": series, "value": value}
            task.setdefault("last_metrics", {}).setdefault(_md5(title), {})[_md5(series)] = {
                **last,
                "min_value": value,
                "max_value": value,
            }
            server.agent_events.append(
                {
                    "task": task["id"],
                    "type": "training_stats_scalar",
                    "metric": title,
                    "variant": series,
                    "iter": 0,
                    "value": value,
                }
            )
        set_task_status(task, "completed", {}, completed=_now())
    else:
        server.queues[queue_id]["entries"].append({"task": task["id"], "added": _now()})
    return {"queued": 1, "updated": 1, "fields": fields}


def _workers_get_all(server: FakeClearMLServer, _body: dict[str, Any]) -> dict[str, Any]:
    """The registered agents, each queue as ``{id, name}`` (bll/workers ``get_all``)."""
    workers = [
        {
            "id": worker_id,
            "queues": [{"id": q, "name": server.queues[q]["name"]} for q in queue_ids],
        }
        for worker_id, queue_ids in server.workers.items()
    ]
    return {"workers": workers}


def _events_scalar_histogram(server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    """A task's scalars as ``{title: {series: {name, x, y}}}`` by iteration (bll/event
    ``get_scalar_metrics_and_x_axis``, ``key: iter``)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    batches = [c.body for c in server.calls if c.endpoint == "events.add_batch"]  # lock held
    for event in [*(e for batch in batches for e in batch), *server.agent_events]:
        if event.get("task") != body.get("task") or event.get("type") != "training_stats_scalar":
            continue
        series = out.setdefault(event.get("metric", ""), {}).setdefault(
            event.get("variant", ""), {"name": event.get("variant", ""), "x": [], "y": []}
        )
        series["x"].append(event.get("iter", 0))
        series["y"].append(event.get("value"))
    return out


def _events_add_batch(_server: FakeClearMLServer, body: dict[str, Any]) -> dict[str, Any]:
    return {"added": len(body.get("_events", [])), "errors": 0}


_HANDLERS: dict[str, Handler] = {
    "auth.login": _login,
    "debug.ping": _ping,
    "projects.get_all": _projects_get_all,
    "projects.create": _projects_create,
    "projects.update": _projects_update,
    "tasks.create": _tasks_create,
    "tasks.edit": _tasks_edit,
    "tasks.clone": _tasks_clone,
    "tasks.started": _tasks_started,
    "tasks.completed": _tasks_completed,
    "tasks.stopped": _status_setter("stopped", "completed"),
    "tasks.failed": _status_setter("failed"),
    "tasks.ping": _tasks_ping,
    "tasks.get_all": _tasks_get_all,
    "tasks.get_by_id": _tasks_get_by_id,
    "tasks.edit_hyper_params": _tasks_edit_hyper_params,
    "tasks.add_or_update_artifacts": _tasks_add_or_update_artifacts,
    "tasks.add_or_update_model": _tasks_add_or_update_model,
    "tasks.set_requirements": _tasks_set_requirements,
    "projects.get_by_id": _projects_get_by_id,
    "models.create": _models_create,
    "models.edit": _models_edit,
    "models.add_or_update_metadata": _models_metadata,
    "models.get_all": _models_get_all,
    "models.get_by_id": _models_get_by_id,
    "models.set_ready": _models_publish,
    "events.add_batch": _events_add_batch,
    "events.scalar_metrics_iter_histogram": _events_scalar_histogram,
    "queues.get_all": _queues_get_all,
    "queues.get_by_id": _queues_get_by_id,
    "tasks.enqueue": _tasks_enqueue,
    "workers.get_all": _workers_get_all,
}


def _parse_body(raw: bytes, endpoint: str) -> Any:
    """The JSON body; ``events.add_batch`` sends JSON lines, split on the bytes' line ends as
    the server splits them (``str.splitlines`` would also split inside a string holding
    U+0085 or U+2028). Raises ``ValueError`` naming what is not JSON."""
    if not raw.strip():
        return {}
    if endpoint == "events.add_batch":
        items = []
        for index, line in enumerate(raw.splitlines()):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"{endpoint}: batch item #{index} is not JSON: {exc}") from exc
        return items
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"_raw": text}


def _parse_multipart(content_type: str, raw: bytes) -> dict[str, bytes]:
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    parts: dict[str, bytes] = {}
    if message.is_multipart():
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition") or part.get_filename()
            payload = part.get_payload(decode=True)
            parts[str(name)] = payload if isinstance(payload, bytes) else b""
    return parts


def _make_request_handler(server: FakeClearMLServer) -> type[BaseHTTPRequestHandler]:
    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

        def _read(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _reply(self, status: int, payload: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _dispatch(self) -> None:
            raw = self._read()
            path = self.path.split("?", 1)[0]
            if path.startswith("/files/") or path == "/files":
                self._files(path[len("/files") :].lstrip("/"), raw)
                return
            match = _ENDPOINT.match(path)
            if not match:
                with server._lock:
                    server.violations.append(f"{self.command} {path}: not an API path")
                self._reply(404, b'{"meta": {"result_code": 404, "result_msg": "not found"}}')
                return
            endpoint = match["endpoint"]
            try:
                body = _parse_body(raw, endpoint)
            except ValueError as exc:  # the server answers 400 (request_handlers.py)
                with server._lock:
                    server.violations.append(str(exc))
                self._envelope(endpoint, 400, {}, str(exc), VALIDATION_ERROR)
                return
            with server._lock:
                server.calls.append(
                    Call(endpoint, body, self.command, match["version"], dict(self.headers))
                )
            refused = server.refusal(endpoint, self.headers.get("Authorization", ""))
            if refused is not None:
                self._envelope(endpoint, 401, {}, refused[1], refused[0])
                return
            status, data = server.handle(endpoint, body, match["version"])
            message = str(data.pop("_error", "OK"))
            subcode = int(data.pop("_subcode", 0))
            self._envelope(endpoint, status, data, message, subcode, version=match["version"])

        def _envelope(
            self,
            endpoint: str,
            status: int,
            data: dict[str, Any],
            msg: str,
            subcode: int = 0,
            *,
            version: str | None = None,
        ) -> None:
            meta = {
                "id": uuid.uuid4().hex,
                "trx": uuid.uuid4().hex,
                "endpoint": {"name": endpoint, "requested_version": version or API_VERSION},
                "result_code": status,
                "result_subcode": subcode,
                "result_msg": msg,
                "error_stack": None,
            }
            payload = json.dumps({"meta": meta, "data": data}).encode()
            self._reply(status, payload)

        def _files(self, path: str, raw: bytes) -> None:
            if self.command == "POST":
                parts = _parse_multipart(self.headers.get("Content-Type", ""), raw)
                with server._lock:
                    server.calls.append(Call("files.upload", sorted(parts), "POST"))
                    for name, content in parts.items():
                        key = "/".join(p.strip("/") for p in (path, name) if p.strip("/"))
                        server.uploads[key] = content
                self._reply(200, b"{}")
                return
            stored = server.uploads.get(unquote(path))  # a file server serves the unquoted path
            if stored is None:
                self._reply(404, b"")
            else:
                self._reply(200, stored, "application/octet-stream")

        def do_GET(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        def do_PUT(self) -> None:
            self._dispatch()

    return RequestHandler
