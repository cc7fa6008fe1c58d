"""conf/clearml/clearml.conf.example, loaded by the installed ClearML SDK.

Every load runs in a fresh interpreter: the SDK keeps its configuration in process
globals, which must not leak into other tests.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import serve

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "conf" / "clearml" / "clearml.conf.example"
ACCESS = "ACCESS-SENTINEL-7c1d"
SECRET = "SECRET-SENTINEL-42f0"

pytestmark = pytest.mark.integration

_READ_BACK = textwrap.dedent(
    """
    import json
    from clearml.config import config_obj
    keys = [
        "api.api_server", "api.web_server", "api.files_server",
        "api.credentials.access_key", "api.credentials.secret_key",
        "api.http.retries.total", "api.http.retries.connect", "api.http.retries.read",
        "api.http.retries.backoff_factor", "api.http.retries.backoff_max",
        "api.http.wait_on_maintenance_forever",
        "sdk.development.report_use_subprocess", "sdk.development.vcs_repo_detect_async",
        "sdk.development.store_uncommitted_code_diff",
    ]
    print(json.dumps({key: config_obj.get(key) for key in keys}))
    """
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CLEARML_", "TRAINS_"))
        and key.lower() not in {"http_proxy", "https_proxy", "all_proxy"}
    }
    env["CLEARML_CONFIG_FILE"] = str(TEMPLATE)
    env.update(extra)
    return env


def _read_back(env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    env = {**env, "HOME": str(tmp_path)}  # no stray ~/clearml.conf
    result = subprocess.run(
        [sys.executable, "-c", _READ_BACK],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    values: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return values


def test_template_resolves_keys_from_environment(tmp_path: Path) -> None:
    env = _clean_env(CLEARML_API_ACCESS_KEY=ACCESS, CLEARML_API_SECRET_KEY=SECRET)
    values = _read_back(env, tmp_path)

    assert values["api.credentials.access_key"] == ACCESS
    assert values["api.credentials.secret_key"] == SECRET
    assert values["api.api_server"] == "http://127.0.0.1:8008"
    assert values["api.web_server"] == "http://127.0.0.1:8080"
    assert values["api.files_server"] == "http://127.0.0.1:8081"
    assert values["api.http.retries.total"] == 3
    assert values["api.http.retries.connect"] == 2
    assert values["api.http.retries.read"] == 2
    assert values["api.http.retries.backoff_factor"] == 0.5
    assert values["api.http.retries.backoff_max"] == 5.0
    assert values["api.http.wait_on_maintenance_forever"] is False
    assert values["sdk.development.report_use_subprocess"] is False
    assert values["sdk.development.vcs_repo_detect_async"] is False
    assert values["sdk.development.store_uncommitted_code_diff"] is False


def test_template_holds_no_credentials_and_follows_host_variables(tmp_path: Path) -> None:
    env = _clean_env(
        CLEARML_API_HOST="http://clearml.example:18008",
        CLEARML_WEB_HOST="http://clearml.example:18080",
        CLEARML_FILES_HOST="http://clearml.example:18081",
    )
    values = _read_back(env, tmp_path)

    assert values["api.credentials.access_key"] == ""
    assert values["api.credentials.secret_key"] == ""
    assert values["api.api_server"] == "http://clearml.example:18008"
    assert values["api.web_server"] == "http://clearml.example:18080"
    assert values["api.files_server"] == "http://clearml.example:18081"


# --------------------------------------------------------------------------- the SDK session


def _token() -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"exp": int(time.time()) + 3600, "api_version": "2.31", "env": "local"}
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@pytest.fixture
def login_recorder() -> Iterator[tuple[str, list[str]]]:
    """An API stand-in that accepts auth.login and records its Authorization headers."""
    seen: list[str] = []
    token = _token()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            endpoint = self.path.split("?", 1)[0].strip("/")
            if endpoint == "auth.login":
                seen.append(self.headers.get("Authorization", ""))
            data = {"token": token} if endpoint == "auth.login" else {}
            raw = json.dumps({"meta": {"result_code": 200, "result_msg": "OK"}, "data": data})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw.encode())

        do_GET = _handle  # noqa: N815 (http.server naming)
        do_POST = _handle  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serve(Handler) as url:
        yield url, seen


_SESSION = textwrap.dedent(
    """
    import time
    started = time.monotonic()
    from clearml.backend_api import Session
    try:
        Session(initialize_logging=False)
        print("LOGGED-IN", round(time.monotonic() - started, 2))
    except Exception as exc:
        print("FAILED", type(exc).__name__, round(time.monotonic() - started, 2))
    """
)


def _session(env: dict[str, str], tmp_path: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _SESSION],
        capture_output=True,
        text=True,
        env={**env, "HOME": str(tmp_path)},
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].split()


def test_sdk_session_logs_in_with_keys_from_environment(
    tmp_path: Path, login_recorder: tuple[str, list[str]]
) -> None:
    url, seen = login_recorder
    env = _clean_env(
        CLEARML_API_HOST=url, CLEARML_API_ACCESS_KEY=ACCESS, CLEARML_API_SECRET_KEY=SECRET
    )
    outcome = _session(env, tmp_path)

    assert outcome[0] == "LOGGED-IN", outcome
    assert len(seen) == 1
    scheme, _, encoded = seen[0].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"{ACCESS}:{SECRET}"


def test_sdk_gives_up_quickly_on_unreachable_server(tmp_path: Path) -> None:
    # With the SDK defaults (240 retries, back-off up to 120 s) this takes minutes.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = _clean_env(
        CLEARML_API_HOST=f"http://127.0.0.1:{port}",
        CLEARML_API_ACCESS_KEY=ACCESS,
        CLEARML_API_SECRET_KEY=SECRET,
    )
    outcome = _session(env, tmp_path)

    assert outcome[0] == "FAILED", outcome
    assert outcome[1] == "LoginError"
    assert float(outcome[2]) < 10.0
