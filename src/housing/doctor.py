"""Diagnose the tracking setup: backends, ClearML mode, server, credentials, queues, agents.

``diagnose`` looks at the environment mapping and the ClearML settings it is given, talks to the
ClearML API server over plain HTTP (requests, not the ClearML SDK) and returns a list of
:class:`Check`; ``render`` turns them into text (``housing doctor``).

Guarantees:

* bounded time: a request waits at most ``timeout`` seconds to connect (two tries of
  half of it) and ``timeout`` for the answer, no request starts after ``2 * timeout``
  and later ones get only what is left, so a diagnosis takes at most ``2.5 * timeout``;
* no secret in the output: the secret key and session tokens never appear, the access
  key only as its first four characters (``ABCD…``), URLs without their user info;
* importing this module imports only the standard library (requests comes with the
  first diagnosis).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from housing import http
from housing.config import FROM_CONF, read_clearml_conf
from housing.tracking.stores import clearml_store_problem, mlflow_store_problem

if TYPE_CHECKING:
    from housing.config import ClearMLSettings

Status = Literal["ok", "warn", "fail"]

_START_SERVER = (
    "start the server: cd infra/clearml && cp -n .env.example .env && docker compose up -d"
)
_START_AGENT = "cd infra/clearml && docker compose --profile agent up -d clearml-agent"
_CONFIG_TEMPLATE = "conf/clearml/clearml.conf.example"
_MAX_BODY = 2_000_000
_TRUE = {"1", "true", "yes", "on", "y", "t"}


@dataclass(frozen=True)
class Check:
    """One line of the diagnosis: what was looked at, how it went and what to do next."""

    name: str
    status: Status
    detail: str
    next_step: str = ""


# --------------------------------------------------------------------------- helpers


def mask_key(key: str) -> str:
    """Show only the first four characters of an access key (nothing of a short one)."""
    return f"{key[:4]}…" if len(key) > 4 else "…"


def display_url(url: str) -> str:
    """The URL without user info, query or fragment, safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid URL>"
    if not parts.scheme or not parts.netloc:
        return url if "@" not in url else "<URL with credentials>"
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in _TRUE


@dataclass(frozen=True)
class _Reply:
    status: int | None  # HTTP status; None when no HTTP answer arrived
    payload: Any  # decoded JSON body, or None
    error: str  # why there was no HTTP answer ("" when there was one)

    @property
    def why(self) -> str:
        """Why the request did not succeed, for a check's detail."""
        return self.error or f"HTTP {self.status}"

    def section(self, name: str) -> dict[str, Any]:
        """``payload[name]`` of a ClearML answer (``meta`` or ``data``), ``{}`` if not a dict."""
        section = self.payload.get(name) if isinstance(self.payload, dict) else None
        return section if isinstance(section, dict) else {}


class _Client:
    """One requests Session and the time budget shared by all requests of a diagnosis.

    The session ignores ``os.environ`` and ~/.netrc: proxies come from ``env``. A refused
    or timed-out connection is tried again once; a slow answer is not.
    """

    def __init__(self, env: Mapping[str, str], timeout: float) -> None:
        self.env = env
        self.timeout = max(timeout, 0.05)
        self.deadline = time.monotonic() + 2 * self.timeout
        self.session = http.session(trust_env=False, total=1, connect=1, read=False, other=0)

    def request(self, url: str, auth: str = "") -> _Reply:
        """GET ``url``, or POST ``{}`` to it with the ``Authorization`` header ``auth``."""
        import urllib3

        timeout = min(self.timeout, self.deadline - time.monotonic())
        if timeout < 0.05:
            return _Reply(None, None, "not tried: time budget spent")
        headers = {"Accept": "application/json"} | ({"Authorization": auth} if auth else {})
        try:
            with self.session.request(
                "POST" if auth else "GET",
                url,
                json={} if auth else None,
                headers=headers,
                timeout=(timeout / 2, timeout),
                proxies=_proxies(self.env, url),
                stream=True,
            ) as response:
                raw = response.raw.read(_MAX_BODY, decode_content=True)
                try:
                    payload = json.loads(raw)
                except ValueError:  # not JSON, not UTF-8
                    payload = None
                return _Reply(response.status_code, payload, "")
        except (OSError, ValueError, urllib3.exceptions.HTTPError) as exc:
            return _Reply(None, None, _reason(http.root_cause(exc), timeout))


def _proxies(env: Mapping[str, str], url: str) -> dict[str, str]:
    """``*_proxy`` variables of ``env`` (lower case wins); loopback, no_proxy hosts go direct."""
    from requests.utils import should_bypass_proxies

    found = {
        name.lower().removesuffix("_proxy"): value
        for name, value in sorted(env.items(), key=lambda item: item[0].islower())
        if name.lower().endswith("_proxy") and value
    }
    no_proxy = found.pop("no", "")
    host = (urlsplit(url).hostname or "").lower()
    if host in {"localhost", "::1"} or host.startswith("127."):
        return {}
    return {} if should_bypass_proxies(url, no_proxy=no_proxy) else found


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:.1f} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "host name not found"
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror).lower()
    return str(exc) or type(exc).__name__


_URI_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://")
# --------------------------------------------------------------------------- checks


def _config_file_check(
    env: Mapping[str, str], config_file: str | None
) -> tuple[Check, Path | None]:
    check = partial(Check, "clearml config")
    if config_file or env.get("CLEARML_CONFIG_FILE"):
        source = "given setting" if config_file else "CLEARML_CONFIG_FILE"
        path = Path(config_file or env["CLEARML_CONFIG_FILE"]).expanduser()
        if path.is_file():
            return check("ok", f"{path} (from {source})"), path
        return check(
            "fail",
            f"{path} (from {source}) does not exist",
            f"cp {_CONFIG_TEMPLATE} {path}, or point CLEARML_CONFIG_FILE at an existing file",
        ), None
    home = Path(env["HOME"]) if env.get("HOME") else Path("~").expanduser()
    path = home / "clearml.conf"
    if path.is_file():
        return check("ok", f"{path} (SDK default location)"), path
    return check(
        "warn",
        f"no config file: CLEARML_CONFIG_FILE is not set and {path} does not exist;"
        " the SDK then runs on its defaults (slow close, 240 connection retries)",
        f"cp {_CONFIG_TEMPLATE} clearml.conf && export CLEARML_CONFIG_FILE=$PWD/clearml.conf",
    ), None


def _clean_host(url: str) -> str:
    """The host URL without a trailing slash or user info (ClearML hosts never carry it)."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        url = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


@dataclass
class _ServerState:
    """What the ClearML checks found out, and what they share."""

    client: _Client
    mode: str
    api_host: str
    web_host: str
    key_names: tuple[str, str]
    api_source: str = FROM_CONF  # where api_host came from (housing.config.Settings.source)
    access: str = ""
    secret: str = ""
    offline_env: bool = False  # CLEARML_OFFLINE_MODE is set
    reachable: bool = False
    credentials_valid: bool | None = None  # None = not verified
    token: str = ""
    unreachable_reason: str = ""

    def get_all(self, kind: str) -> list[Any] | str:
        """``<kind>.get_all`` with the session token: the list, or why there is none."""
        reply = self.client.request(f"{self.api_host}/{kind}.get_all", f"Bearer {self.token}")
        items = reply.section("data").get(kind)
        if reply.status == 200 and isinstance(items, list):
            return items
        return f"{kind}.get_all failed ({reply.why})"


def _check_mlflow(
    env: Mapping[str, str],
    uri: str,
    enabled: bool,
    client: _Client,
    root: Path,
    *,
    uri_source: str = FROM_CONF,
) -> Check:
    check = partial(Check, "mlflow")
    if not enabled:
        return check("ok", "MLflow disabled (not among the tracking backends)")
    env_uri = env.get("MLFLOW_TRACKING_URI", "")
    note = f" (from {uri_source})"
    if env_uri and env_uri != uri:
        note += f"; MLFLOW_TRACKING_URI={display_url(env_uri)} is overridden"
    if not uri:
        return check(
            "warn",
            f"no tracking URI configured{note}",
            "set mlflow.tracking_uri (e.g. sqlite:///mlflow.db or http://host:5000)",
        )
    shown = display_url(uri)
    lowered = uri.lower()
    if lowered.startswith("databricks"):
        scheme = "databricks"
    elif _URI_SCHEME.match(lowered) or lowered.startswith("sqlite:"):
        scheme = urlsplit(uri).scheme.lower()
    else:
        scheme = ""  # a plain path
    if scheme in {"http", "https"}:
        reply = client.request(f"{uri.rstrip('/')}/health")
        if reply.status == 200:
            return check("ok", f"tracking server {shown} answers /health{note}")
        return check(
            "warn",
            f"tracking server {shown} did not answer /health ({reply.why}){note}",
            "start it (mlflow server --host 127.0.0.1 --port 5000 ...) or use a local"
            " store: mlflow.tracking_uri=sqlite:///mlflow.db",
        )
    if scheme == "sqlite":
        problem = mlflow_store_problem(uri, root)
        if problem is not None:
            return check("fail", problem, "nothing was changed; repair the store as it says")
        return check("ok", f"local SQLite store {shown}{note}")
    if scheme not in {"", "file"}:
        return check("ok", f"tracking URI {shown} (not probed){note}")
    if _truthy(env.get("MLFLOW_ALLOW_FILE_STORE")):
        return check("ok", f"file store {shown} (MLFLOW_ALLOW_FILE_STORE set){note}")
    return check(
        "warn",
        f"file store {shown}: MLflow 3 refuses it unless MLFLOW_ALLOW_FILE_STORE=true{note}",
        "use mlflow.tracking_uri=sqlite:///mlflow.db, or export MLFLOW_ALLOW_FILE_STORE=true",
    )


def _check_server(state: _ServerState, files_host: str) -> Check:
    check = partial(Check, "clearml server")
    # A server is configured when the mode is online, or auto with credentials set (and
    # no CLEARML_OFFLINE_MODE): then not reaching it is a failure. Otherwise only
    # `housing clearml sync` needs it.
    keys = bool(state.access and state.secret)
    configured = state.mode == "online" or (state.mode == "auto" and keys and not state.offline_env)
    severity: Status = "fail" if configured else "warn"
    shown = display_url(state.api_host)
    parts = urlsplit(state.api_host)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        state.unreachable_reason = "not an http(s) URL"
        return check(
            "fail",
            f"API host {shown!r} (from {state.api_source}) is not an http(s) URL",
            "set CLEARML_API_HOST=http://127.0.0.1:8008 (or api.api_server in the config file)",
        )
    reply = state.client.request(f"{state.api_host}/debug.ping")
    if reply.status == 200:
        state.reachable = True
        return check(
            "ok",
            f"API {shown} (from {state.api_source}) answers debug.ping; web UI"
            f" {display_url(state.web_host)}, files {display_url(files_host)}",
        )
    if reply.status is not None:
        state.unreachable_reason = f"HTTP {reply.status} on debug.ping"
        return check(
            severity,
            f"{shown} (from {state.api_source}) answered debug.ping with HTTP {reply.status}:"
            " not a ClearML API server?",
            "check the API URL: the API server listens on port 8008 (web UI 8080, files 8081)",
        )
    state.unreachable_reason = reply.error
    return check(
        severity,
        f"API {shown} (from {state.api_source}) unreachable: {reply.error}",
        f"{_START_SERVER}; or run offline with clearml.mode=offline",
    )


def _basic(state: _ServerState) -> str:
    return base64.b64encode(f"{state.access}:{state.secret}".encode()).decode("ascii")


def _check_credentials(state: _ServerState, source: str) -> Check:
    check = partial(Check, "clearml credentials")
    names = state.key_names
    create = (
        f"create credentials in the web UI ({display_url(state.web_host)}: Settings > Workspace >"
        f" Create new credentials), then export {names[0]} and {names[1]}"
    )
    if not (state.access and state.secret):
        # Missing keys are a choice outside online mode.
        missing = [n for n, v in zip(names, (state.access, state.secret), strict=True) if not v]
        severity: Status = "fail" if state.mode == "online" else "warn"
        return check(severity, f"missing: {', '.join(missing)}", create)
    who = f"access key {mask_key(state.access)} (from {source})"
    if not state.reachable:
        return check("warn", f"{who} present; not verified: the server is unreachable")
    reply = state.client.request(f"{state.api_host}/auth.login", f"Basic {_basic(state)}")
    token = reply.section("data").get("token")
    if reply.status == 200 and isinstance(token, str) and token:
        state.credentials_valid = True
        state.token = token
        return check("ok", f"{who} accepted by auth.login")
    if reply.status in {401, 403}:
        # Rejected keys are a mistake unless the run is offline on purpose.
        state.credentials_valid = False
        message = str(reply.section("meta").get("result_msg") or "")
        return check(
            "warn" if state.mode == "offline" else "fail",
            f"{who} rejected by auth.login (HTTP {reply.status}"
            + (f": {message})" if message else ")"),
            create,
        )
    # A server that answers debug.ping but not its API cannot be used: unless offline on
    # purpose, that is a failure (the stages would record offline).
    return check(
        "warn" if state.mode == "offline" else "fail",
        f"{who} present; auth.login did not confirm them ({reply.why})",
        "retry; check the API server log: docker compose logs apiserver",
    )


def _check_queues(state: _ServerState, expected: Sequence[str]) -> tuple[Check, dict[str, str]]:
    check = partial(Check, "clearml queues")
    queues = state.get_all("queues")
    if isinstance(queues, str):
        return check("warn", queues), {}
    names: dict[str, str] = {}
    described = []
    for queue in queues:
        if isinstance(queue, dict) and queue.get("id"):
            name = names[str(queue["id"])] = str(queue.get("name") or queue["id"])
            entries = queue.get("entries")
            pending = f" ({len(entries)} pending)" if isinstance(entries, list) and entries else ""
            described.append(f"{name}{pending}")
    if not names:
        next_step = f"start an agent (it creates its queue): {_START_AGENT}"
        return check("warn", "no queues on the server", next_step), names
    missing = [name for name in expected if name not in names.values()]
    detail = f"{len(names)} queue(s): {', '.join(described)}"
    if missing:
        return check(
            "warn",
            f"{detail}; missing: {', '.join(missing)}",
            "create it in the web UI (Orchestration > Queues) or start an agent on it"
            " with --create-queue (CLEARML_AGENT_QUEUES in infra/clearml/.env)",
        ), names
    return check("ok", detail), names


def _worker_queues(worker: Mapping[str, Any], names: Mapping[str, str]) -> list[str]:
    result = []
    for entry in worker.get("queues") or []:
        if isinstance(entry, dict):
            queue_id = str(entry.get("id") or "")
            result.append(str(entry.get("name") or names.get(queue_id, queue_id)))
        elif isinstance(entry, str):
            result.append(names.get(entry, entry))
    return [name for name in result if name]


def _check_agents(state: _ServerState, expected: Sequence[str], names: Mapping[str, str]) -> Check:
    check = partial(Check, "clearml agents")
    workers = state.get_all("workers")
    if isinstance(workers, str):
        return check("warn", workers)
    start_agent = (
        f"{_START_AGENT} (pipeline controllers: --profile services up -d clearml-agent-services)"
    )
    described = []
    listening: set[str] = set()
    for worker in filter(lambda worker: isinstance(worker, dict), workers):
        queues = _worker_queues(worker, names)
        listening.update(queues)
        described.append(f"{worker.get('id') or '?'} ({', '.join(queues) or 'no queue'})")
    if not described:
        return check("warn", "no agent is listening", start_agent)
    detail = f"{len(described)} agent(s): {'; '.join(described)}"
    idle = [name for name in expected if name not in listening]
    if idle:
        return check("warn", f"{detail}; no agent listens on: {', '.join(idle)}", start_agent)
    return check("ok", detail)


def _mode_check(env: Mapping[str, str], state: _ServerState, settings: ClearMLSettings) -> Check:
    """The tracker's own decision (:func:`housing.tracking.clearml.resolve_mode`), with
    this run's probe of the server as its answer for ``auto``; then, for online, what
    blocks it. ``clearml.mode=online`` wins over ``CLEARML_OFFLINE_MODE``."""
    from housing.tracking.clearml import resolve_mode

    check = partial(Check, "clearml mode")
    mode = state.mode
    shown = display_url(state.api_host)
    unreachable = f"server {shown} unreachable ({state.unreachable_reason or 'no answer'})"

    def problem() -> str | None:  # as server_problem, from this run's requests
        unset = [name for name in state.key_names if not env.get(name)]
        if unset:
            return f"{' and '.join(unset)} not set"
        if not state.reachable:
            return unreachable
        return "the credentials were rejected" if state.credentials_valid is False else None

    decided, reason = resolve_mode(settings, env, problem=problem)
    if decided == "offline" and (mode == "offline" or state.offline_env):
        return check(
            "ok",
            f"{mode} -> offline ({reason}): sessions are written locally;"
            " upload them later with `housing clearml sync`",
        )
    if decided == "offline":  # auto: keys unset or server unreachable is the normal case
        if reason != "the credentials were rejected":
            return check("ok", f"auto -> offline: {reason}; runs are recorded locally")
        return check(
            "fail",
            f"auto -> offline: {reason}; every stage warns and records locally",
            "fix the credentials (below), or use clearml.mode=offline",
        )
    online = "auto -> online" if mode == "auto" else "online"
    if mode == "online" and state.offline_env:
        online += " (clearml.mode=online wins over CLEARML_OFFLINE_MODE)"
    if state.reachable and state.credentials_valid:
        return check("ok", f"{online}: server {shown} answers, credentials accepted")
    # online: whatever blocks it is a failure.
    present = bool(state.access and state.secret)
    if state.reachable and present and state.credentials_valid is None:
        return check(
            "warn", f"{online}: server {shown} answers; the credentials could not be verified"
        )
    blocker = "the credentials were rejected"
    if not state.reachable:
        blocker = unreachable
    elif not present:
        blocker = "no API credentials"
    return check(
        "fail",
        f"{online}, but {blocker}: opening tasks will fail",
        "fix the checks below, or use clearml.mode=offline",
    )


def _scrub(checks: list[Check], secrets: Sequence[str]) -> list[Check]:
    """Last line of defence: no secret value may survive into the output."""
    hidden = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def scrub(text: str) -> str:
        for value in hidden:
            text = text.replace(value, "***")
        return text

    return [Check(c.name, c.status, scrub(c.detail), scrub(c.next_step)) for c in checks]


# --------------------------------------------------------------------------- API


def diagnose(
    env: Mapping[str, str],
    clearml: ClearMLSettings,
    *,
    tracking_backends: Sequence[str],
    mlflow_uri: str,
    config_file: str | None = None,
    root: Path | None = None,
    pending: str | None = None,
    sources: Mapping[str, str] | None = None,
) -> list[Check]:
    """Check the tracking setup and return one :class:`Check` per aspect.

    ``env`` is the process environment (or a test's stand-in). The hosts, the mode and
    the time budget (``connect_timeout_sec``) come from ``clearml``; the execution queue
    of a pipeline not run locally is reported when missing or when no agent listens on
    it. The API keys are read from the variables ``clearml.auth`` names, else from the
    ClearML config file (``config_file``, else ``CLEARML_CONFIG_FILE``, else
    ``~/clearml.conf``). A damaged local store (MLflow SQLite relative to ``root``,
    default the current directory; ClearML ledgers) is a failure. ``pending``: what waits
    for ``housing sync`` (:meth:`~housing.tracking.recorder.PendingSync.summary`), a
    warning.
    """
    from housing.tracking.clearml import offline_env_set

    root = Path.cwd() if root is None else root
    given = sources or {}
    pipeline = clearml.pipeline
    expected_queues = [] if pipeline.run_locally else [pipeline.execution_queue]
    client = _Client(env, clearml.connect_timeout_sec)
    backends = [b.strip().lower() for b in tracking_backends if b.strip()]
    if backends:
        checks = [Check("tracking backends", "ok", ", ".join(backends))]
    else:
        checks = [
            Check(
                "tracking backends",
                "warn",
                "none: runs are not tracked",
                "enable them, e.g. tracking=both (or tracking=mlflow / tracking=clearml)",
            )
        ]
    with client.session:
        mlflow_check = _check_mlflow(
            env,
            mlflow_uri,
            "mlflow" in backends,
            client,
            root,
            uri_source=given.get("mlflow.tracking_uri", FROM_CONF),
        )
        if "clearml" not in backends:
            disabled = "ClearML disabled (not among the tracking backends)"
            checks += [Check("clearml mode", "ok", disabled), mlflow_check]
            return [*checks, *pending_check(pending)]

        config_check, config_path = _config_file_check(env, config_file)
        literals = read_clearml_conf(config_path) if config_path else {}
        key_names = (clearml.auth.access_key_env, clearml.auth.secret_key_env)
        state = _ServerState(
            client=client,
            mode=clearml.mode,
            api_host=_clean_host(clearml.server.api_host),
            web_host=_clean_host(clearml.server.web_host),
            key_names=key_names,
            api_source=given.get("clearml.server.api_host", FROM_CONF),
            access=env.get(key_names[0], ""),
            secret=env.get(key_names[1], ""),
            offline_env=offline_env_set(env),
        )
        cred_source = "environment" if state.access and state.secret else ""
        if not cred_source and literals.get("access_key") and literals.get("secret_key"):
            state.access, state.secret = literals["access_key"], literals["secret_key"]
            cred_source = "config file"
        server_check = _check_server(state, _clean_host(clearml.server.files_host))
        cred_check = _check_credentials(state, cred_source)
        extra: list[Check] = []
        if state.token:
            queue_check, names = _check_queues(state, expected_queues)
            extra = [queue_check, _check_agents(state, expected_queues, names)]
        checks.append(_mode_check(env, state, clearml))
        ledger_problem = clearml_store_problem(clearml.offline_dir)
        if ledger_problem is not None:
            checks.append(Check("clearml store", "fail", ledger_problem, "nothing was changed"))
        checks.append(mlflow_check)
    checks.extend([config_check, server_check, cred_check, *extra, *pending_check(pending)])
    basic = _basic(state) if state.secret else ""
    access = state.access if len(state.access) > 4 else ""
    return _scrub(checks, [state.secret, basic, state.token, access])


def pending_check(summary: str | None) -> list[Check]:
    """Work not yet synced (:meth:`~housing.tracking.recorder.PendingSync.summary`): a
    warning, not a failure; nothing when nothing waits."""
    if summary is None:
        return []
    return [Check("pending sync", "warn", summary.removeprefix("pending sync: "), "housing sync")]


_LABELS: dict[str, str] = {"ok": " ok ", "warn": "warn", "fail": "FAIL"}


def render(checks: Sequence[Check]) -> str:
    """Plain-text report: one line per check, its next step indented below it."""
    lines = []
    width = max((len(check.name) for check in checks), default=0)
    for check in checks:
        lines.append(f"[{_LABELS[check.status]}] {check.name.ljust(width)}  {check.detail}")
        if check.next_step:
            lines.append(f"       {' ' * width}  next: {check.next_step}")
    lines.append(tally(checks))
    return "\n".join(lines) + "\n"


def tally(checks: Sequence[Check]) -> str:
    """The closing line: how many checks passed, warned and failed."""
    counts = {status: sum(1 for c in checks if c.status == status) for status in _LABELS}
    return f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failure(s)"
