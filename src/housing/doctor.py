"""Diagnose the tracking setup: backends, ClearML mode, server, credentials, queues, agents.

``diagnose`` looks at an environment mapping and the resolved settings it is given,
talks to the ClearML API server over plain HTTP (requests; the ClearML SDK is not
imported) and returns a list of :class:`Check`. ``render`` turns them into text.
The CLI wires both into ``housing doctor``.

Guarantees:

* bounded time: a request waits at most ``timeout`` seconds to connect (two tries of
  half of it) and ``timeout`` for the answer, no request starts after ``2 * timeout``
  and later ones get only what is left, so a diagnosis takes at most ``2.5 * timeout``;
* no secret in the output: the secret key and session tokens never appear, the access
  key only as its first four characters (``ABCD…``), URLs without their user info;
* importing this module does nothing but import the standard library (requests is
  imported when a diagnosis starts).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from housing import http

Status = Literal["ok", "warn", "fail"]

DEFAULT_API_HOST = "http://127.0.0.1:8008"
DEFAULT_WEB_HOST = "http://127.0.0.1:8080"
DEFAULT_FILES_HOST = "http://127.0.0.1:8081"
_DEFAULT_HOSTS = {"api": DEFAULT_API_HOST, "web": DEFAULT_WEB_HOST, "files": DEFAULT_FILES_HOST}

_START_SERVER = (
    "start the server: cd infra/clearml && cp -n .env.example .env && docker compose up -d"
)
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


class _Client:
    """One requests Session and the time budget shared by all requests of a diagnosis.

    The session ignores ``os.environ`` (and ~/.netrc): proxies come from the ``env``
    mapping the diagnosis was given. A refused or timed-out connection is tried again
    once; an answer that is slow to come is not.
    """

    def __init__(self, env: Mapping[str, str], timeout: float) -> None:
        self.env = env
        self.timeout = max(timeout, 0.05)
        self.deadline = time.monotonic() + 2 * self.timeout
        self.session = http.session(trust_env=False, total=1, connect=1, read=False, other=0)

    def request(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> _Reply:
        import urllib3

        timeout = min(self.timeout, self.deadline - time.monotonic())
        if timeout < 0.05:
            return _Reply(None, None, "not tried: time budget spent")
        try:
            with self.session.request(
                method,
                url,
                json=body,
                headers={"Accept": "application/json", **(headers or {})},
                timeout=(timeout / 2, timeout),
                proxies=_proxies(self.env, url),
                stream=True,
            ) as response:
                raw = response.raw.read(_MAX_BODY, decode_content=True)
                return _Reply(response.status_code, _decode(raw), "")
        except (OSError, ValueError, urllib3.exceptions.HTTPError) as exc:
            return _Reply(None, None, _reason(http.root_cause(exc), timeout))


def _is_loopback(host: str) -> bool:
    return host in {"localhost", "::1"} or host.startswith("127.")


def _proxies(env: Mapping[str, str], url: str) -> dict[str, str]:
    """``*_proxy`` variables of ``env`` (lower case wins); loopback, no_proxy hosts go direct."""
    found = {
        name.lower().removesuffix("_proxy"): value
        for name, value in sorted(env.items(), key=lambda item: item[0].islower())
        if name.lower().endswith("_proxy") and value
    }
    from requests.utils import should_bypass_proxies

    no_proxy = found.pop("no", "")
    if _is_loopback((urlsplit(url).hostname or "").lower()):
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


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # not JSON, not UTF-8
        return None


def _section(payload: Any, name: str) -> dict[str, Any]:
    """``payload[name]`` of a ClearML answer (``meta`` or ``data``), ``{}`` if not a dict."""
    section = payload.get(name) if isinstance(payload, dict) else None
    return section if isinstance(section, dict) else {}


_URI_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*://")
_CONF_VALUE = re.compile(
    r"""^\s*(?:api\s*\.\s*|credentials\s*\.\s*|api\.credentials\s*\.\s*)?
        "?(?P<key>api_server|web_server|files_server|access_key|secret_key)"?
        \s*[:=]\s*(?P<value>"[^"\n]*"|[^\s"#,}{]+)""",
    re.VERBOSE,
)


def _read_config_literals(path: Path) -> dict[str, str]:
    """Best-effort read of literal hosts/keys from a ClearML HOCON file.

    Only plain ``key: value`` lines are understood; substitutions (``${?VAR}``) are
    skipped because the environment is consulted first anyway. Later lines win,
    as in HOCON.
    """
    found: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        match = _CONF_VALUE.match(line)
        if not match:
            continue
        value = match.group("value").strip('"').strip()
        if value and not value.startswith("$"):
            found[match.group("key")] = value
    return found


# --------------------------------------------------------------------------- checks


def _config_file_check(
    env: Mapping[str, str], config_file: str | None
) -> tuple[Check, Path | None]:
    if config_file:
        source, raw = "given setting", config_file
    elif env.get("CLEARML_CONFIG_FILE"):
        source, raw = "CLEARML_CONFIG_FILE", env["CLEARML_CONFIG_FILE"]
    else:
        home = Path(env["HOME"]) if env.get("HOME") else Path("~").expanduser()
        default = home / "clearml.conf"
        if default.is_file():
            return Check("clearml config", "ok", f"{default} (SDK default location)"), default
        return (
            Check(
                "clearml config",
                "warn",
                f"no config file: CLEARML_CONFIG_FILE is not set and {default} does not exist;"
                " the SDK then runs on its defaults (slow close, 240 connection retries)",
                f"cp {_CONFIG_TEMPLATE} clearml.conf"
                " && export CLEARML_CONFIG_FILE=$PWD/clearml.conf",
            ),
            None,
        )
    path = Path(raw).expanduser()
    if path.is_file():
        return Check("clearml config", "ok", f"{path} (from {source})"), path
    return (
        Check(
            "clearml config",
            "fail",
            f"{path} (from {source}) does not exist",
            f"cp {_CONFIG_TEMPLATE} {path}, or point CLEARML_CONFIG_FILE at an existing file",
        ),
        None,
    )


def _resolve_host(
    kind: str, given: str | None, env: Mapping[str, str], literals: Mapping[str, str]
) -> tuple[str, str]:
    """The ``kind`` ("api", "web", "files") host and where it came from."""
    env_name = f"CLEARML_{kind.upper()}_HOST"
    for value, source in (
        (given, "given setting"),
        (env.get(env_name), env_name),
        (literals.get(f"{kind}_server"), "config file"),
    ):
        if value:
            return _clean_host(value), source
    return _DEFAULT_HOSTS[kind], "default"


def _clean_host(url: str) -> str:
    """Strip whitespace, a trailing slash and user info (ClearML hosts never carry it)."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[1]
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


@dataclass
class _ServerState:
    """What the ClearML checks found out, and what they share."""

    client: _Client
    api_host: str
    web_host: str
    reachable: bool = False
    credentials_present: bool = False
    credentials_valid: bool | None = None  # None = not verified
    token: str = ""
    unreachable_reason: str = ""


def _check_mlflow(env: Mapping[str, str], uri: str, enabled: bool, client: _Client) -> Check:
    if not enabled:
        return Check("mlflow", "ok", "MLflow disabled (not among the tracking backends)")
    env_uri = env.get("MLFLOW_TRACKING_URI", "")
    note = ""
    if env_uri and env_uri != uri:
        note = f"; note: MLFLOW_TRACKING_URI={display_url(env_uri)} is also set"
    if not uri:
        return Check(
            "mlflow",
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
            return Check("mlflow", "ok", f"tracking server {shown} answers /health{note}")
        return Check(
            "mlflow",
            "warn",
            f"tracking server {shown} did not answer /health ({reply.why}){note}",
            "start it (mlflow server --host 127.0.0.1 --port 5000 ...) or use a local"
            " store: mlflow.tracking_uri=sqlite:///mlflow.db",
        )
    if scheme == "sqlite":
        return Check("mlflow", "ok", f"local SQLite store {shown}{note}")
    if scheme in {"", "file"}:
        if _truthy(env.get("MLFLOW_ALLOW_FILE_STORE")):
            return Check("mlflow", "ok", f"file store {shown} (MLFLOW_ALLOW_FILE_STORE set){note}")
        return Check(
            "mlflow",
            "warn",
            f"file store {shown}: MLflow 3 refuses it unless MLFLOW_ALLOW_FILE_STORE=true{note}",
            "use mlflow.tracking_uri=sqlite:///mlflow.db, or export MLFLOW_ALLOW_FILE_STORE=true",
        )
    return Check("mlflow", "ok", f"tracking URI {shown} (not probed){note}")


def _check_server(
    state: _ServerState, *, api_source: str, files_host: str, severity: Status
) -> Check:
    api_host, web_host = state.api_host, state.web_host
    shown = display_url(api_host)
    parts = urlsplit(api_host)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        state.unreachable_reason = "not an http(s) URL"
        return Check(
            "clearml server",
            "fail",
            f"API host {shown!r} (from {api_source}) is not an http(s) URL",
            "set CLEARML_API_HOST=http://127.0.0.1:8008 (or api.api_server in the config file)",
        )
    reply = state.client.request(f"{api_host}/debug.ping")
    if reply.status == 200:
        state.reachable = True
        return Check(
            "clearml server",
            "ok",
            f"API {shown} (from {api_source}) answers debug.ping; web UI"
            f" {display_url(web_host)}, files {display_url(files_host)}",
        )
    if reply.status is not None:
        state.unreachable_reason = f"HTTP {reply.status} on debug.ping"
        return Check(
            "clearml server",
            severity,
            f"{shown} (from {api_source}) answered debug.ping with HTTP {reply.status}:"
            " not a ClearML API server?",
            "check the API URL: the API server listens on port 8008 (web UI 8080, files 8081)",
        )
    state.unreachable_reason = reply.error
    return Check(
        "clearml server",
        severity,
        f"API {shown} (from {api_source}) unreachable: {reply.error}",
        f"{_START_SERVER}; or run offline with clearml.mode=offline",
    )


def _resolve_credentials(
    env: Mapping[str, str], literals: Mapping[str, str], names: tuple[str, str]
) -> tuple[str, str, str]:
    access = env.get(names[0], "")
    secret = env.get(names[1], "")
    if access and secret:
        return access, secret, "environment"
    if literals.get("access_key") and literals.get("secret_key"):
        return literals["access_key"], literals["secret_key"], "config file"
    return access, secret, ""


def _check_credentials(
    state: _ServerState,
    *,
    access: str,
    secret: str,
    source: str,
    names: tuple[str, str],
    severities: tuple[Status, Status],
) -> Check:
    api_host, web_host = state.api_host, state.web_host
    missing_severity, rejected_severity = severities
    create = (
        f"create credentials in the web UI ({display_url(web_host)}: Settings > Workspace >"
        f" Create new credentials), then export {names[0]} and {names[1]}"
    )
    if not (access and secret):
        missing = [name for name, value in ((names[0], access), (names[1], secret)) if not value]
        return Check(
            "clearml credentials", missing_severity, f"missing: {', '.join(missing)}", create
        )
    state.credentials_present = True
    who = f"access key {mask_key(access)} (from {source})"
    if not state.reachable:
        return Check(
            "clearml credentials",
            "warn",
            f"{who} present; not verified: the server is unreachable",
        )
    basic = base64.b64encode(f"{access}:{secret}".encode()).decode("ascii")
    reply = state.client.request(
        f"{api_host}/auth.login",
        method="POST",
        headers={"Authorization": f"Basic {basic}"},
        body={},
    )
    token = _section(reply.payload, "data").get("token")
    if reply.status == 200 and isinstance(token, str) and token:
        state.credentials_valid = True
        state.token = token
        return Check("clearml credentials", "ok", f"{who} accepted by auth.login")
    if reply.status in {401, 403}:
        state.credentials_valid = False
        message = str(_section(reply.payload, "meta").get("result_msg") or "")
        return Check(
            "clearml credentials",
            rejected_severity,
            f"{who} rejected by auth.login (HTTP {reply.status}"
            + (f": {message})" if message else ")"),
            create,
        )
    return Check(
        "clearml credentials",
        "warn",
        f"{who} present; auth.login did not confirm them ({reply.why})",
        "retry; check the API server log: docker compose logs apiserver",
    )


def _queue_names(queues: Sequence[Any]) -> dict[str, str]:
    names: dict[str, str] = {}
    for queue in queues:
        if isinstance(queue, dict) and queue.get("id"):
            names[str(queue["id"])] = str(queue.get("name") or queue["id"])
    return names


def _get_all(state: _ServerState, kind: str) -> list[Any] | str:
    """``<kind>.get_all`` with the session token: the list, or why there is none."""
    reply = state.client.request(
        f"{state.api_host}/{kind}.get_all",
        method="POST",
        headers={"Authorization": f"Bearer {state.token}"},
        body={},
    )
    items = _section(reply.payload, "data").get(kind)
    if reply.status == 200 and isinstance(items, list):
        return items
    return f"{kind}.get_all failed ({reply.why})"


def _check_queues(state: _ServerState, expected: Sequence[str]) -> tuple[Check, dict[str, str]]:
    queues = _get_all(state, "queues")
    if isinstance(queues, str):
        return Check("clearml queues", "warn", queues), {}
    names = _queue_names(queues)
    if not names:
        return (
            Check(
                "clearml queues",
                "warn",
                "no queues on the server",
                "start an agent (it creates its queue): cd infra/clearml &&"
                " docker compose --profile agent up -d clearml-agent",
            ),
            names,
        )
    described = []
    for queue in queues:
        if not isinstance(queue, dict) or not queue.get("id"):
            continue
        entries = queue.get("entries")
        pending = f" ({len(entries)} pending)" if isinstance(entries, list) and entries else ""
        described.append(f"{names[str(queue['id'])]}{pending}")
    missing = [name for name in expected if name not in names.values()]
    detail = f"{len(names)} queue(s): {', '.join(described)}"
    if missing:
        return (
            Check(
                "clearml queues",
                "warn",
                f"{detail}; missing: {', '.join(missing)}",
                "create it in the web UI (Orchestration > Queues) or start an agent on it"
                " with --create-queue (CLEARML_AGENT_QUEUES in infra/clearml/.env)",
            ),
            names,
        )
    return Check("clearml queues", "ok", detail), names


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
    workers = _get_all(state, "workers")
    if isinstance(workers, str):
        return Check("clearml agents", "warn", workers)
    start_agent = (
        "cd infra/clearml && docker compose --profile agent up -d clearml-agent"
        " (pipeline controllers: --profile services up -d clearml-agent-services)"
    )
    described = []
    listening: set[str] = set()
    for worker in workers:
        if not isinstance(worker, dict):
            continue
        queues = _worker_queues(worker, names)
        listening.update(queues)
        on = ", ".join(queues) if queues else "no queue"
        described.append(f"{worker.get('id') or '?'} ({on})")
    if not described:
        return Check("clearml agents", "warn", "no agent is listening", start_agent)
    detail = f"{len(described)} agent(s): {'; '.join(described)}"
    idle = [name for name in expected if name not in listening]
    if idle:
        return Check(
            "clearml agents",
            "warn",
            f"{detail}; no agent listens on: {', '.join(idle)}",
            start_agent,
        )
    return Check("clearml agents", "ok", detail)


def _mode_check(
    mode: str, env: Mapping[str, str], state: _ServerState, key_names: tuple[str, str]
) -> Check:
    """How the tracker resolves the mode (housing.tracking.clearml.resolve_mode).

    ``auto`` goes online when both key variables are set and the API server answers
    ``debug.ping``; the keys themselves are only verified here (auth.login).
    """
    env_offline = _truthy(env.get("CLEARML_OFFLINE_MODE"))
    shown = display_url(state.api_host)
    if mode == "offline" or (env_offline and mode != "online"):
        why = "clearml.mode=offline" if mode == "offline" else "CLEARML_OFFLINE_MODE is set"
        return Check(
            "clearml mode",
            "ok",
            f"{mode} -> offline ({why}): sessions are written locally;"
            " upload them later with `housing clearml sync`",
        )
    if mode == "online" and env_offline:
        return Check(
            "clearml mode",
            "fail",
            "online requested but CLEARML_OFFLINE_MODE is set in the environment",
            "unset CLEARML_OFFLINE_MODE, or use clearml.mode=offline",
        )
    online = "auto -> online" if mode == "auto" else "online"
    unset = [name for name in key_names if not env.get(name)]
    if mode == "auto" and (unset or not state.reachable):
        why = (
            f"{' and '.join(unset)} not set"
            if unset
            else f"server {shown} unreachable ({state.unreachable_reason or 'no answer'})"
        )
        return Check("clearml mode", "ok", f"auto -> offline: {why}; runs are recorded locally")
    if state.reachable and state.credentials_valid:
        return Check(
            "clearml mode",
            "ok",
            f"{online}: server {shown} answers, credentials accepted",
        )
    # online requested, or auto that will go online: whatever blocks it is a failure.
    if state.credentials_valid is None and state.reachable and state.credentials_present:
        return Check(
            "clearml mode",
            "warn",
            f"{online}: server {shown} answers; the credentials could not be verified",
        )
    return Check(
        "clearml mode",
        "fail",
        f"{online}, but {_online_blocker(state, shown)}: opening tasks will fail",
        "fix the checks below, or use clearml.mode=offline",
    )


def _online_blocker(state: _ServerState, shown: str) -> str:
    if not state.reachable:
        return f"server {shown} unreachable ({state.unreachable_reason or 'no answer'})"
    if not state.credentials_present:
        return "no API credentials"
    if state.credentials_valid is False:
        return "the credentials were rejected"
    return "the credentials could not be verified"


def _scrub(checks: list[Check], secrets: Sequence[str]) -> list[Check]:
    """Last line of defence: no secret value may survive into the output."""
    hidden = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
    if not hidden:
        return checks
    result = []
    for check in checks:
        detail, next_step = check.detail, check.next_step
        for value in hidden:
            detail = detail.replace(value, "***")
            next_step = next_step.replace(value, "***")
        result.append(Check(check.name, check.status, detail, next_step))
    return result


# --------------------------------------------------------------------------- API


def diagnose(
    env: Mapping[str, str],
    *,
    api_host: str | None,
    web_host: str | None,
    files_host: str | None,
    config_file: str | None,
    tracking_backends: Sequence[str],
    clearml_mode: str,
    mlflow_uri: str,
    timeout: float = 2.0,
    expected_queues: Sequence[str] = (),
    access_key_env: str = "CLEARML_API_ACCESS_KEY",
    secret_key_env: str = "CLEARML_API_SECRET_KEY",
) -> list[Check]:
    """Check the tracking setup and return one :class:`Check` per aspect.

    ``env`` is the process environment (or a test's stand-in); ``api_host``,
    ``web_host`` and ``files_host`` are the hosts from the project settings, None to
    take them from ``CLEARML_API_HOST`` / ``CLEARML_WEB_HOST`` / ``CLEARML_FILES_HOST``,
    then from the ClearML config file, then the local defaults (127.0.0.1:8008/8080/8081).
    ``expected_queues`` are queues the pipeline will enqueue to (e.g. the execution
    queue); each is reported when missing or when no agent listens on it.
    ``access_key_env`` / ``secret_key_env`` name the variables holding the API keys
    (``clearml.auth.*_key_env``); without them the config file's literal keys are used.
    """
    client = _Client(env, timeout)
    backends = [b.strip().lower() for b in tracking_backends if b.strip()]
    mode = clearml_mode.strip().lower()
    checks: list[Check] = []

    if backends:
        checks.append(Check("tracking backends", "ok", ", ".join(backends)))
    else:
        checks.append(
            Check(
                "tracking backends",
                "warn",
                "none: runs are not tracked",
                "enable them, e.g. tracking=both (or tracking=mlflow / tracking=clearml)",
            )
        )

    clearml_on = "clearml" in backends
    if not clearml_on:
        checks.append(
            Check("clearml mode", "ok", "ClearML disabled (not among the tracking backends)")
        )
        checks.append(_check_mlflow(env, mlflow_uri, "mlflow" in backends, client))
        client.session.close()
        return checks

    config_check, config_path = _config_file_check(env, config_file)
    literals = _read_config_literals(config_path) if config_path else {}
    api, api_source = _resolve_host("api", api_host, env, literals)
    web = _resolve_host("web", web_host, env, literals)[0]
    files = _resolve_host("files", files_host, env, literals)[0]
    key_names = (access_key_env, secret_key_env)
    access, secret, cred_source = _resolve_credentials(env, literals, key_names)

    # An explicit offline mode needs the server only for `housing clearml sync`.
    severity: Status = "fail" if mode == "online" else "warn"
    state = _ServerState(client=client, api_host=api, web_host=web)
    server_check = _check_server(state, api_source=api_source, files_host=files, severity=severity)
    # Missing keys are a choice outside online mode; rejected keys are a mistake unless
    # the run is offline on purpose.
    cred_severities: tuple[Status, Status] = (
        "fail" if mode == "online" else "warn",
        "warn" if mode == "offline" else "fail",
    )
    cred_check = _check_credentials(
        state,
        access=access,
        secret=secret,
        source=cred_source,
        names=key_names,
        severities=cred_severities,
    )
    extra: list[Check] = []
    if state.token:
        queue_check, names = _check_queues(state, expected_queues)
        extra.append(queue_check)
        extra.append(_check_agents(state, expected_queues, names))

    checks.append(_mode_check(mode, env, state, key_names))
    checks.append(_check_mlflow(env, mlflow_uri, "mlflow" in backends, client))
    client.session.close()
    checks.extend([config_check, server_check, cred_check, *extra])
    basic = base64.b64encode(f"{access}:{secret}".encode()).decode("ascii") if secret else ""
    return _scrub(checks, [secret, basic, state.token, access if len(access) > 4 else ""])


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
