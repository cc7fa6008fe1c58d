"""housing.doctor against a closed port, a silent port, the strict ClearML fake and a real
``mlflow server``."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from housing.config import ClearMLSettings
from housing.doctor import Check, diagnose, display_url, mask_key, render
from tests.fakes.clearml_api import FakeClearMLServer, token_is_valid

ACCESS = "ABCDACCESSSENTINEL0001"
SECRET = "SECRET-SENTINEL-9f8e7d6c5b4a"


# --------------------------------------------------------------------------- fakes


@pytest.fixture
def fake() -> Iterator[FakeClearMLServer]:
    """The strict ClearML fake with these keys, two queues (two tasks pending on default)
    and an agent on each."""
    with FakeClearMLServer(access_key=ACCESS, secret_key=SECRET) as server:
        server.add_queue("default", pending=["t1", "t2"])
        server.add_queue("services")
        server.add_worker("housing-agent:cpu:0", ["default"])
        server.add_worker("housing-services:0", ["services"])
        yield server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        "HOME": str(tmp_path),  # no ~/clearml.conf there
        "CLEARML_API_ACCESS_KEY": ACCESS,
        "CLEARML_API_SECRET_KEY": SECRET,
    }
    env.update(extra)
    return env


def _run(
    env: dict[str, str],
    api: str | None,
    *,
    tracking_backends: Sequence[str] = ("mlflow", "clearml"),
    mlflow_uri: str = "sqlite:///mlflow.db",
    **clearml: Any,
) -> list[Check]:
    """Diagnose with the ClearML settings ``clearml`` (``api``: the API host, else the default)."""
    section = {"server": {"api_host": api} if api else {}, **clearml}
    settings = ClearMLSettings.model_validate(section, context={"root": Path.cwd()})
    return diagnose(env, settings, tracking_backends=tracking_backends, mlflow_uri=mlflow_uri)


def _queue(name: str) -> dict[str, Any]:
    """The ``clearml.pipeline`` section of a pipeline that enqueues its steps to ``name``."""
    return {"run_locally": False, "execution_queue": name}


def _by_name(checks: list[Check]) -> dict[str, Check]:
    names = [check.name for check in checks]
    assert len(names) == len(set(names)), names
    return {check.name: check for check in checks}


def _assert_no_secret(checks: list[Check], fake: FakeClearMLServer | None = None) -> str:
    """Neither key nor anything sent in an ``Authorization`` header (basic keys, the
    session token) appears in the diagnosis."""
    text = render(checks) + repr(checks)
    assert SECRET not in text
    assert ACCESS not in text  # only the masked form may appear
    for call in fake.calls if fake else []:
        credential = call.headers.get("Authorization", "").partition(" ")[2]
        assert not credential or credential not in text
    return text


# --------------------------------------------------------------------------- unreachable


def test_unreachable_server_fails_fast_with_next_step(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    checks = _run(_env(tmp_path), api, mode="online")
    elapsed = time.monotonic() - started

    assert elapsed < 5.0
    by_name = _by_name(checks)
    server = by_name["clearml server"]
    assert server.status == "fail"
    assert "unreachable" in server.detail
    assert "connection refused" in server.detail
    assert "docker compose up -d" in server.next_step
    assert by_name["clearml mode"].status == "fail"
    assert "unreachable" in by_name["clearml mode"].detail
    credentials = by_name["clearml credentials"]
    assert credentials.status == "warn"
    assert "not verified" in credentials.detail
    assert "ABCD…" in credentials.detail
    assert "clearml queues" not in by_name  # nothing to ask without a server
    text = _assert_no_secret(checks)
    assert "next: " in text


def test_auto_mode_with_keys_and_no_server_is_a_failure(tmp_path: Path) -> None:
    checks = _run(_env(tmp_path), f"http://127.0.0.1:{_free_port()}", mode="auto")
    by_name = _by_name(checks)
    assert by_name["clearml mode"].status == "ok"
    assert by_name["clearml mode"].detail.startswith("auto -> offline")
    # credentials say a server is meant to be used: it being down is not fine
    assert by_name["clearml server"].status == "fail"


def test_auto_mode_without_keys_runs_offline_and_the_server_is_optional(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    checks = _run(env, f"http://127.0.0.1:{_free_port()}", mode="auto")
    by_name = _by_name(checks)
    assert by_name["clearml mode"].detail.startswith("auto -> offline")
    assert by_name["clearml server"].status == "warn"
    assert not [c for c in checks if c.status == "fail"]


def test_silent_server_is_bounded_by_timeout(tmp_path: Path) -> None:
    # Accepts TCP connections but never answers: only the timeout ends the request.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        api = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        checks = _run(_env(tmp_path), api, mode="online", connect_timeout_sec=0.5)
        elapsed = time.monotonic() - started

    assert elapsed < 3.0  # one 0.5 s timeout, plus slack for a loaded machine
    server = _by_name(checks)["clearml server"]
    assert server.status == "fail"
    assert "no answer within 0.5 s" in server.detail
    _assert_no_secret(checks)


def test_black_hole_host_is_bounded_by_timeout(tmp_path: Path) -> None:
    # A listener whose accept queue is full drops further SYNs: connecting never ends.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        for sock in fillers:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        started = time.monotonic()
        checks = _run(_env(tmp_path), f"http://127.0.0.1:{port}", connect_timeout_sec=0.5)
        elapsed = time.monotonic() - started
        for sock in fillers:
            sock.close()

    assert elapsed < 3.0  # the budget: at most 2.5 x 0.5 s, plus slack
    server = _by_name(checks)["clearml server"]
    assert server.status == "fail"  # keys set: the server is meant to be used
    assert "no answer within 0.5 s" in server.detail
    _assert_no_secret(checks)


# --------------------------------------------------------------------------- reachable


def test_reachable_server_valid_credentials(tmp_path: Path, fake: FakeClearMLServer) -> None:
    checks = _run(_env(tmp_path), fake.url, pipeline=_queue("default"))
    by_name = _by_name(checks)

    assert by_name["clearml server"].status == "ok"
    assert "debug.ping" in by_name["clearml server"].detail
    assert by_name["clearml credentials"].status == "ok"
    assert "accepted" in by_name["clearml credentials"].detail
    assert "ABCD…" in by_name["clearml credentials"].detail
    queues = by_name["clearml queues"]
    assert queues.status == "ok"
    assert "default (2 pending)" in queues.detail
    assert "services" in queues.detail
    agents = by_name["clearml agents"]
    assert agents.status == "ok"
    assert "housing-agent:cpu:0 (default)" in agents.detail
    assert "housing-services:0 (services)" in agents.detail  # queue id mapped to its name
    assert by_name["clearml mode"].detail.startswith("auto -> online")

    assert fake.endpoints() == ["debug.ping", "auth.login", "queues.get_all", "workers.get_all"]
    login = fake.calls[1]
    assert login.method == "POST"
    scheme, _, encoded = login.headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == f"{ACCESS}:{SECRET}"
    scheme, _, token = fake.calls[2].headers["Authorization"].partition(" ")
    assert scheme == "Bearer" and token_is_valid(token)  # the session token auth.login gave
    _assert_no_secret(checks, fake)


def test_rejected_credentials(tmp_path: Path, fake: FakeClearMLServer) -> None:
    fake.secret_key = "another-secret-entirely"  # the server knows other keys
    checks = _run(_env(tmp_path), fake.url)
    by_name = _by_name(checks)

    credentials = by_name["clearml credentials"]
    assert credentials.status == "fail"
    assert "rejected" in credentials.detail
    assert "401" in credentials.detail
    assert "invalid credentials" in credentials.detail  # the server's result_msg
    assert "Create new credentials" in credentials.next_step
    assert "clearml queues" not in by_name
    assert "clearml agents" not in by_name
    # The tracker's decision (resolve_mode: auth.login refused) is offline, with a
    # warning in every stage: a failure to fix, said as what will happen.
    mode = by_name["clearml mode"]
    assert mode.status == "fail"
    assert mode.detail.startswith("auto -> offline: the credentials were rejected")
    assert "queues.get_all" not in fake.endpoints()
    _assert_no_secret(checks, fake)


def test_secret_echoed_by_server_is_hidden(tmp_path: Path, fake: FakeClearMLServer) -> None:
    # a misbehaving server (or proxy) that rejects the keys and repeats what it got
    basic = base64.b64encode(f"{ACCESS}:{SECRET}".encode()).decode()
    echo = f"Unauthorized (invalid credentials): got {ACCESS}:{SECRET} (Basic {basic})"
    fake.fail("auth.login", status=401, message=echo)
    checks = _run(_env(tmp_path), fake.url)
    detail = _by_name(checks)["clearml credentials"].detail
    assert "got ***:*** (Basic ***)" in detail  # the message is kept, the keys are not
    assert basic not in render(checks)
    _assert_no_secret(checks, fake)


def test_missing_credentials(tmp_path: Path, fake: FakeClearMLServer) -> None:
    env = {"HOME": str(tmp_path)}
    checks = _run(env, fake.url)
    by_name = _by_name(checks)
    credentials = by_name["clearml credentials"]
    assert credentials.status == "warn"
    assert "CLEARML_API_ACCESS_KEY" in credentials.detail
    assert "CLEARML_API_SECRET_KEY" in credentials.detail
    assert (
        "auto -> offline: CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY not set"
        in by_name["clearml mode"].detail
    )
    assert "auth.login" not in fake.endpoints()

    online = _by_name(_run(env, fake.url, mode="online"))
    assert online["clearml credentials"].status == "fail"
    assert online["clearml mode"].status == "fail"


def test_key_variable_names_are_configurable(tmp_path: Path, fake: FakeClearMLServer) -> None:
    env = {"HOME": str(tmp_path), "TEAM_CLEARML_KEY": ACCESS, "TEAM_CLEARML_SECRET": SECRET}
    checks = _run(
        env,
        fake.url,
        auth={"access_key_env": "TEAM_CLEARML_KEY", "secret_key_env": "TEAM_CLEARML_SECRET"},
    )
    assert _by_name(checks)["clearml credentials"].status == "ok"
    missing = _by_name(_run(env, fake.url))["clearml credentials"]
    assert missing.status == "warn"
    assert "CLEARML_API_ACCESS_KEY" in missing.detail


def test_missing_queue_and_idle_queue(tmp_path: Path, fake: FakeClearMLServer) -> None:
    missing = _by_name(_run(_env(tmp_path), fake.url, pipeline=_queue("gpu")))
    assert missing["clearml queues"].status == "warn"
    assert "missing: gpu" in missing["clearml queues"].detail
    assert missing["clearml agents"].status == "warn"
    assert "no agent listens on: gpu" in missing["clearml agents"].detail

    del fake.workers["housing-services:0"]  # nobody listens on "services" any more
    idle = _by_name(_run(_env(tmp_path), fake.url, pipeline=_queue("services")))
    assert idle["clearml queues"].status == "ok"
    assert idle["clearml agents"].status == "warn"
    assert "no agent listens on: services" in idle["clearml agents"].detail
    assert "--profile agent" in idle["clearml agents"].next_step


def test_no_queues_and_no_agents(tmp_path: Path, fake: FakeClearMLServer) -> None:
    fake.queues.clear()
    fake.workers.clear()
    by_name = _by_name(_run(_env(tmp_path), fake.url))
    assert by_name["clearml queues"].status == "warn"
    assert by_name["clearml queues"].detail == "no queues on the server"
    assert by_name["clearml agents"].status == "warn"
    assert by_name["clearml agents"].detail == "no agent is listening"


def test_proxy_variables_do_not_capture_loopback(tmp_path: Path, fake: FakeClearMLServer) -> None:
    env = _env(tmp_path, http_proxy=f"http://127.0.0.1:{_free_port()}")
    by_name = _by_name(_run(env, fake.url))
    assert by_name["clearml server"].status == "ok"


def test_credentials_from_config_file(tmp_path: Path, fake: FakeClearMLServer) -> None:
    # The layout `clearml-init` writes: quoted keys, `=` and unquoted URLs.
    conf = tmp_path / "clearml.conf"
    conf.write_text(
        "api {\n"
        "    web_server: http://127.0.0.1:1\n"
        "    api_server: http://127.0.0.1:1\n"
        "    credentials {\n"
        f'        "access_key" = "{ACCESS}"\n'
        f'        "secret_key"  = "{SECRET}"\n'
        "    }\n"
        "}\n"
    )
    env = {"HOME": str(tmp_path / "elsewhere"), "CLEARML_CONFIG_FILE": str(conf)}
    checks = _run(env, fake.url)
    by_name = _by_name(checks)
    assert by_name["clearml config"].status == "ok"
    assert "from CLEARML_CONFIG_FILE" in by_name["clearml config"].detail
    assert f"API {fake.url} (from conf/)" in by_name["clearml server"].detail
    assert by_name["clearml credentials"].status == "ok"
    assert "(from config file)" in by_name["clearml credentials"].detail
    # auto mode looks only at the key variables, as the tracker does
    assert by_name["clearml mode"].detail.startswith("auto -> offline: CLEARML_API_ACCESS_KEY")
    online = _by_name(_run(env, fake.url, mode="online"))["clearml mode"]
    assert online.status == "ok"
    assert online.detail.startswith("online: server")
    _assert_no_secret(checks)


def test_host_user_info_is_dropped(tmp_path: Path, fake: FakeClearMLServer) -> None:
    api = fake.url.replace("://", "://someone:hunter22@") + "/"
    by_name = _by_name(_run(_env(tmp_path, CLEARML_API_HOST="http://127.0.0.1:1"), api))
    assert by_name["clearml server"].status == "ok"
    assert f"API {fake.url} (from conf/)" in by_name["clearml server"].detail
    assert "hunter22" not in render(list(by_name.values()))


def test_missing_config_file_named_by_variable(tmp_path: Path) -> None:
    env = _env(tmp_path, CLEARML_CONFIG_FILE=str(tmp_path / "nope.conf"))
    by_name = _by_name(_run(env, f"http://127.0.0.1:{_free_port()}"))
    config = by_name["clearml config"]
    assert config.status == "fail"
    assert "does not exist" in config.detail
    assert "clearml.conf.example" in config.next_step


def test_no_config_file_at_all_is_a_warning(tmp_path: Path) -> None:
    by_name = _by_name(_run(_env(tmp_path), f"http://127.0.0.1:{_free_port()}"))
    config = by_name["clearml config"]
    assert config.status == "warn"
    assert "CLEARML_CONFIG_FILE" in config.next_step


# --------------------------------------------------------------------------- modes


def test_clearml_disabled_makes_no_request(tmp_path: Path, fake: FakeClearMLServer) -> None:
    checks = _run(_env(tmp_path), fake.url, tracking_backends=["mlflow"])
    assert [check.name for check in checks] == ["tracking backends", "clearml mode", "mlflow"]
    assert "disabled" in checks[1].detail
    assert fake.calls == []


def test_offline_mode_from_environment(tmp_path: Path) -> None:
    env = _env(tmp_path, CLEARML_OFFLINE_MODE="1")
    by_name = _by_name(_run(env, f"http://127.0.0.1:{_free_port()}"))
    mode = by_name["clearml mode"]
    assert mode.status == "ok"
    assert "offline" in mode.detail
    assert "CLEARML_OFFLINE_MODE" in mode.detail
    assert by_name["clearml server"].status == "warn"  # only `clearml sync` needs it
    # the SDK's older name turns it offline too, so doctor reads it as well
    alias = _by_name(
        _run(_env(tmp_path, TRAINS_OFFLINE_MODE="1"), f"http://127.0.0.1:{_free_port()}")
    )
    assert (alias["clearml mode"].status, alias["clearml server"].status) == ("ok", "warn")

    online = _by_name(_run(env, f"http://127.0.0.1:{_free_port()}", mode="online"))
    assert online["clearml mode"].status == "fail"  # online wins: no server there
    assert "CLEARML_OFFLINE_MODE" in online["clearml mode"].detail


def test_online_mode_wins_over_offline_environment_as_the_tracker_decides(
    tmp_path: Path, fake: FakeClearMLServer
) -> None:
    """``clearml.mode=online`` with ``CLEARML_OFFLINE_MODE`` set: doctor reports the
    tracker's own decision (``resolve_mode``: online), and the server it will use."""
    from housing.config import ClearMLSettings
    from housing.tracking.clearml import resolve_mode

    env = _env(tmp_path, CLEARML_OFFLINE_MODE="1")
    mode = _by_name(_run(env, fake.url, mode="online"))["clearml mode"]
    settings = ClearMLSettings.model_validate({"mode": "online"}, context={"root": tmp_path})
    assert resolve_mode(settings, env)[0] == "online"
    assert mode.status == "ok", mode
    assert mode.detail.startswith("online (clearml.mode=online wins over CLEARML_OFFLINE_MODE)")
    assert "credentials accepted" in mode.detail


def test_no_backends_is_a_warning(tmp_path: Path) -> None:
    checks = _run(_env(tmp_path), None, tracking_backends=[])
    assert checks[0].name == "tracking backends"
    assert checks[0].status == "warn"


# --------------------------------------------------------------------------- MLflow


@pytest.mark.slow  # imports MLflow's server app (~5 s)
def test_mlflow_tracking_server_probe(tmp_path: Path) -> None:
    # MLflow's own server app (what ``mlflow server`` serves) on a real socket; a
    # ``mlflow server`` process takes 10-30 s to start on a loaded 2-core machine.
    from mlflow.server import app
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        ok = _by_name(_run(_env(tmp_path), None, tracking_backends=["mlflow"], mlflow_uri=uri))
    finally:
        server.shutdown()
        server.server_close()
    assert ok["mlflow"].status == "ok"
    assert "answers /health" in ok["mlflow"].detail


def test_mlflow_tracking_server_down(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{_free_port()}"
    bad = _by_name(_run(_env(tmp_path), None, tracking_backends=["mlflow"], mlflow_uri=down))
    assert bad["mlflow"].status == "warn"
    assert "connection refused" in bad["mlflow"].detail


def test_mlflow_file_store_needs_opt_in(tmp_path: Path) -> None:
    common: dict[str, Any] = {"tracking_backends": ["mlflow"], "mlflow_uri": "./mlruns"}
    plain = _by_name(_run(_env(tmp_path), None, **common))["mlflow"]
    assert plain.status == "warn"
    assert "MLFLOW_ALLOW_FILE_STORE" in plain.detail
    allowed = _by_name(_run(_env(tmp_path, MLFLOW_ALLOW_FILE_STORE="true"), None, **common))
    assert allowed["mlflow"].status == "ok"


def test_mlflow_uri_credentials_are_hidden(tmp_path: Path) -> None:
    uri = f"postgresql://mlflow:{SECRET}@db.internal:5432/mlflow"
    checks = _run(_env(tmp_path), None, tracking_backends=["mlflow"], mlflow_uri=uri)
    detail = _by_name(checks)["mlflow"].detail
    assert "db.internal:5432" in detail
    assert SECRET not in render(checks)


# --------------------------------------------------------------------------- helpers


def test_mask_key() -> None:
    assert mask_key("ABCDEFGHIJ") == "ABCD…"
    assert mask_key("ABCD") == "…"
    assert mask_key("") == "…"


def test_display_url_drops_user_info() -> None:
    assert display_url("https://user:pw@example.org:8443/api?x=1") == "https://example.org:8443/api"
    assert display_url("http://127.0.0.1:8008") == "http://127.0.0.1:8008"


def test_render_lists_statuses_next_steps_and_totals() -> None:
    text = render(
        [
            Check("alpha", "ok", "fine"),
            Check("beta", "warn", "hmm", "do this"),
            Check("gamma", "fail", "broken", "do that"),
        ]
    )
    lines = text.splitlines()
    assert lines[0].startswith("[ ok ] alpha")
    assert lines[1].startswith("[warn] beta")
    assert lines[2].strip() == "next: do this"
    assert lines[3].startswith("[FAIL] gamma")
    assert lines[-1] == "1 ok, 1 warning(s), 1 failure(s)"


def test_import_loads_only_the_standard_library() -> None:
    code = (
        "import sys; import housing.doctor; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'clearml', 'mlflow', 'requests', 'urllib3', 'hydra', 'sklearn', 'pandas'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- pending sync


@pytest.mark.slow  # imports MLflow (~3 s)
def test_status_and_doctor_count_what_waits_for_a_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two spooled MLflow stage runs (one synced), two closed ClearML offline sessions (one
    # imported into this server): one of each waits.
    import shutil

    from mlflow import MlflowClient

    from housing.cli import main
    from housing.io import write_json
    from housing.tracking import mlflow_spool

    monkeypatch.chdir(tmp_path)
    uri, api_host = "http://127.0.0.1:9", "http://127.0.0.1:8008"
    spool = tmp_path / ".mlflow-spool"
    spool.mkdir()
    mlflow_spool.create_store(spool / "mlflow.db")
    client = MlflowClient(mlflow_spool.spool_uri(spool))
    experiment = client.create_experiment("housing")
    tags = {mlflow_spool.TAG_TARGET: uri, "housing.run_type": "stage"}
    waiting, synced = (client.create_run(experiment, tags=tags).info.run_id for _ in range(2))
    client.set_tag(synced, mlflow_spool.TAG_SYNCED, "server-run")
    for sid in ("offline-0123abcd", "offline-4567ef01"):
        session = tmp_path / ".clearml" / "offline" / sid
        session.mkdir(parents=True)
        (session / "task.json").write_text(json.dumps({"id": sid, "name": "housing:prepare"}))
        shutil.make_archive(str(session), "zip", session)
    imported = {"api_host": api_host, "task_id": "t1", "imported_at": "2026-01-01T00:00:00"}
    write_json(
        tmp_path / ".clearml" / "imported.json", {"sessions": {"offline-0123abcd": [imported]}}
    )

    line = (
        "pending sync: 1 MLflow run(s) spooled, 1 ClearML offline session(s) not synced; "
        "run `housing sync`"
    )
    overrides = [
        "tracking=none",
        f"mlflow.tracking_uri={uri}",
        f"clearml.server.api_host={api_host}",
    ]
    assert main(["status", *overrides]) == 0
    assert line in capsys.readouterr().out.splitlines()
    assert main(["doctor", *overrides]) == 0  # a warning, not a failure
    out = capsys.readouterr().out
    assert "[warn] pending sync" in out and line.removeprefix("pending sync: ") in out
    assert "next: housing sync" in out
    client.set_tag(waiting, mlflow_spool.TAG_SYNCED, "server-run")  # as a sync does
    shutil.rmtree(tmp_path / ".clearml" / "offline")
    assert main(["doctor", *overrides]) == 0
    assert "pending sync" not in capsys.readouterr().out  # nothing waits: no line


def test_doctor_checks_the_exported_api_host_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from housing.cli import main

    from .conftest import CONF

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLEARML_API_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    monkeypatch.chdir(tmp_path)
    code = main(["--config-dir", str(CONF), "doctor", "clearml.mode=online"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "http://127.0.0.1:9 (from CLEARML_API_HOST) unreachable" in out
    assert "8008" not in out.split("clearml server", 1)[1].splitlines()[0]
    assert "other.db (from MLFLOW_TRACKING_URI)" in out
