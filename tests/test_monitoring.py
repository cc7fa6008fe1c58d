"""Tests for housing.monitoring: events log, stage tracking, status and notifiers."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from housing import monitoring as mon

TOKEN = "XyZSECRETtoken0123456789abcdef"
N_PROCS, N_THREADS, N_LINES = 4, 4, 200


# --------------------------------------------------------------------------- events log


def _writer_thread(path: str, proc: int, thread: int) -> None:
    log = mon.EventLog(path)
    for i in range(N_LINES):
        # Varying, fairly long payloads make torn/interleaved writes detectable.
        pad = f"{proc}{thread}{i % 10}" * (50 + (i * 37) % 400)
        log.append({"run_id": f"p{proc}", "stage": f"t{thread}", "i": i, "pad": pad})


def _writer_process(path: str, proc: int) -> None:
    threads = [
        threading.Thread(target=_writer_thread, args=(path, proc, t)) for t in range(N_THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_processes_and_threads_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "pipeline_events.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer_process, args=(str(path), p)) for p in range(N_PROCS)]
    for p in procs:
        p.start()
    _writer_process(str(path), N_PROCS)  # the parent writes concurrently too
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    raw_lines = path.read_bytes().split(b"\n")
    assert raw_lines[-1] == b""  # file ends with a newline
    records = [json.loads(line) for line in raw_lines[:-1]]  # every line is valid JSON
    total = (N_PROCS + 1) * N_THREADS * N_LINES
    assert len(records) == total
    seen = set()
    for rec in records:
        proc, thread, i = int(rec["run_id"][1:]), int(rec["stage"][1:]), rec["i"]
        assert rec["pad"] == f"{proc}{thread}{i % 10}" * (50 + (i * 37) % 400)
        seen.add((proc, thread, i))
    assert len(seen) == total
    # per-writer order is preserved
    for proc in range(N_PROCS + 1):
        for thread in range(N_THREADS):
            order = [
                r["i"] for r in records if r["run_id"] == f"p{proc}" and r["stage"] == f"t{thread}"
            ]
            assert order == list(range(N_LINES))


def test_append_creates_parent_lazily_and_serializes_awkward_values(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "events.jsonl"
    log = mon.EventLog(path, fsync=True)
    assert not path.parent.exists()
    log.append({"x": float("nan"), "y": float("inf"), "p": Path("/tmp"), "msg": "two\nlines"})
    text = path.read_text()
    assert text.count("\n") == 1
    assert json.loads(text) == {"x": None, "y": None, "p": "/tmp", "msg": "two\nlines"}


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    code = (
        "import logging, housing.monitoring, housing.schedule;"
        "assert logging.getLogger().handlers == [];"
        "assert logging.getLogger('housing.monitoring').handlers == []"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=30)
    assert list(tmp_path.iterdir()) == []


def test_new_run_id_sortable_and_unique() -> None:
    ids = []
    for _ in range(50):
        ids.append(mon.new_run_id())
        time.sleep(0.0005)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert re.fullmatch(r"\d{8}T\d{12}Z-[0-9a-f]{8}", ids[0])


def _parse_iso(text: str) -> datetime:
    assert text.endswith("Z")
    return datetime.fromisoformat(text)


def test_track_stage_success(tmp_path: Path) -> None:
    log = mon.EventLog(tmp_path / "events.jsonl")
    seen: list[dict[str, Any]] = []

    class Recorder:
        def notify(self, event: Any) -> None:
            seen.append(dict(event))

    with mon.track_stage(log, "run1", "train_ridge", Recorder()) as handle:
        time.sleep(0.05)
        handle.update({"rmse": 1.25, "n_features": 8})

    started, done = log.read()
    assert started["status"] == "started"
    assert started["finished_at"] is None and started["duration_sec"] is None
    assert done["status"] == "succeeded"
    assert done["error"] is None
    assert done["rmse"] == 1.25 and done["n_features"] == 8
    assert 0.05 <= done["duration_sec"] < 2
    assert done["started_at"] == started["started_at"]
    assert _parse_iso(done["finished_at"]) >= _parse_iso(done["started_at"])
    for rec in (started, done):
        assert rec["run_id"] == "run1" and rec["stage"] == "train_ridge"
        assert rec["host"] == socket.gethostname() and isinstance(rec["pid"], int)
    assert [e["status"] for e in seen] == ["started", "succeeded"]


def test_track_stage_failure_reraises_and_records_one_line_error(tmp_path: Path) -> None:
    log = mon.EventLog(tmp_path / "events.jsonl")

    class Broken:
        def notify(self, event: Any) -> None:
            raise RuntimeError("notifier down")

    with pytest.raises(ValueError, match="missing"), mon.track_stage(log, "r", "prep", Broken()):
        raise ValueError("missing\n   column 'price'")

    started, failed = log.read()
    assert started["status"] == "started"
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: missing column 'price'"
    assert "\n" not in failed["error"]
    assert failed["duration_sec"] >= 0


def test_handle_rejects_reserved_fields() -> None:
    handle = mon.StageHandle("r", "s")
    with pytest.raises(ValueError, match="status"):
        handle.update({"status": "x"})


def test_read_events_tolerates_truncated_last_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.jsonl"
    log = mon.EventLog(path)
    log.append({"run_id": "a", "stage": "prepare", "status": "started"})
    log.append({"run_id": "a", "stage": "prepare", "status": "succeeded"})
    with path.open("ab") as fh:
        fh.write(b'{"run_id": "a", "stage": "tra')  # writer killed mid-line
    with caplog.at_level(logging.WARNING, logger="housing.monitoring"):
        events = mon.read_events(path)
    assert [e["status"] for e in events] == ["started", "succeeded"]
    assert "truncated last line" in caplog.text

    # the next append starts on a fresh line, so it is not lost
    log.append({"run_id": "a", "stage": "train", "status": "started"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="housing.monitoring"):
        events = mon.read_events(path)
    assert [e.get("stage") for e in events] == ["prepare", "prepare", "train"]
    assert "corrupt line 3" in caplog.text
    assert mon.read_events(tmp_path / "missing.jsonl") == []


def test_last_run_status_picks_last_run_and_renders(tmp_path: Path) -> None:
    log = mon.EventLog(tmp_path / "events.jsonl")
    assert mon.last_run_status(log.path) is None
    with mon.track_stage(log, "run-old", "prepare"):
        pass
    mon.record_pipeline_summary(log, "run-old", "succeeded", 1.0, best_model="ridge")

    with mon.track_stage(log, "run-new", "prepare"):
        pass
    with pytest.raises(ValueError), mon.track_stage(log, "run-new", "train_ridge"):
        raise ValueError("bad alpha")
    log.append(mon.make_event("run-new", "train_rf", "started", started_at="2024-01-01T00:00Z"))

    status = mon.last_run_status(log.path)
    assert status is not None
    assert status.run_id == "run-new"
    assert [(s.stage, s.status) for s in status.stages] == [
        ("prepare", "succeeded"),
        ("train_ridge", "failed"),
        ("train_rf", "started"),
    ]
    assert status.outcome == "failed"
    assert status.summary is None
    assert status.stages[1].error == "ValueError: bad alpha"

    mon.record_pipeline_summary(
        log, "run-new", "failed", 2.5, test_rmse=0.12345, error="ValueError: bad alpha"
    )
    status = mon.last_run_status(log.path)
    assert status is not None and status.summary is not None
    assert status.outcome == "failed" and status.summary["duration_sec"] == 2.5
    text = mon.render_status(status)
    assert "run run-new: FAILED" in text
    assert re.search(r"train_ridge\s+failed\s+\d+\.\d\ds", text)
    assert "error: ValueError: bad alpha" in text
    assert "test_rmse=0.1235" in text
    assert "run-old" not in text


def test_last_run_status_running(tmp_path: Path) -> None:
    log = mon.EventLog(tmp_path / "events.jsonl")
    log.append(mon.make_event("r", "prepare", "started", started_at="x"))
    status = mon.last_run_status(log.path)
    assert status is not None and status.outcome == "running"
    assert "summary: none" in mon.render_status(status)


# --------------------------------------------------------------------------- sinks


def _event(status: str = "failed", stage: str = "train_ridge") -> dict[str, Any]:
    return mon.make_event(
        "run-42",
        stage,
        status,
        started_at="2024-01-01T00:00:00.000Z",
        finished_at="2024-01-01T00:00:01.500Z",
        duration_sec=1.5,
        error="ValueError: boom" if status == "failed" else None,
    )


def test_console_and_file_notifiers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mon.ConsoleNotifier().notify(_event())
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "train_ridge FAILED" in err and "run=run-42" in err and "ValueError: boom" in err

    buf = io.StringIO()
    mon.ConsoleNotifier(buf).notify(_event("succeeded"))
    assert "train_ridge SUCCEEDED" in buf.getvalue()

    path = tmp_path / "reports" / "pipeline_notifications.log"
    notifier = mon.FileNotifier(path)
    assert not path.parent.exists()
    notifier.notify(_event())
    notifier.notify(_event("succeeded", stage="pipeline"))
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("2024-01-01T00:00:01.500Z [housing] stage train_ridge FAILED")
    assert "pipeline SUCCEEDED" in lines[1]


def test_multi_and_filtered_notifiers_isolate_failures() -> None:
    got: list[str] = []

    class Boom:
        def notify(self, event: Any) -> None:
            raise OSError("sink down")

    class Rec:
        def notify(self, event: Any) -> None:
            got.append(f"{event['stage']}:{event['status']}")

    notifier = mon.Notifiers([Boom(), Rec()], ["failed", "pipeline"])
    notifier.notify(_event("started"))
    notifier.notify(_event("succeeded"))
    notifier.notify(_event("failed"))
    notifier.notify(_event("succeeded", stage="pipeline"))
    assert got == ["train_ridge:failed", "pipeline:succeeded"]

    only = mon.Notifiers([Rec()], ["succeeded_pipeline"])
    got.clear()
    only.notify(_event("failed", stage="pipeline"))
    only.notify(_event("succeeded", stage="pipeline"))
    assert got == ["pipeline:succeeded"]
    assert isinstance(notifier, mon.Notifier)


def test_build_notifiers_from_the_typed_section(tmp_path: Path) -> None:
    from housing.config import NotificationSettings, load_settings
    from housing.errors import ConfigError
    from tests.conftest import CONF

    overrides = [
        "notifications.console=true",
        "notifications.webhook={url_env: MY_HOOK, timeout_sec: 1, retries: 1}",
        "notifications.on=[failed,succeeded_pipeline]",
    ]
    settings = load_settings(overrides, CONF, tmp_path).notifications
    built = mon.build_notifiers(settings, {"MY_HOOK": "https://hooks.example.com/T/B/x"})
    sinks = built.sinks
    assert [type(s).__name__ for s in sinks] == [
        "ConsoleNotifier",
        "FileNotifier",
        "WebhookNotifier",
    ]
    assert sinks[1].path == tmp_path / "reports" / "pipeline_notifications.log"
    assert sinks[2].target == "https://hooks.example.com/<redacted>"
    assert built.on == {"failed", "succeeded_pipeline"}

    # webhook configured but env var missing -> skipped, not an error
    built = mon.build_notifiers(NotificationSettings(webhook=True), {})  # type: ignore[arg-type]
    assert built.sinks == ()
    with pytest.raises(ConfigError, match="must hold an http"):
        mon.build_notifiers(
            NotificationSettings(webhook=True),  # type: ignore[arg-type]
            {"HOUSING_WEBHOOK_URL": "ftp://x/y"},
        )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+notifications.slack=true", "notifications.slack: unknown key"),
        ("+notifications.webhook.url=x", "notifications.webhook.url: unknown key; did you mean"),
        ("notifications.on=[failed,sometimes]", "notifications.on: unknown trigger 'sometimes'"),
        ("notifications.console=yes", "notifications.console: expected true or false"),
    ],
)
def test_bad_notifications_are_config_errors(tmp_path: Path, override: str, message: str) -> None:
    from housing.config import load_settings
    from housing.errors import ConfigError
    from tests.conftest import CONF

    with pytest.raises(ConfigError) as caught:
        load_settings([override], CONF, tmp_path)
    assert str(caught.value).startswith(message)


# --------------------------------------------------------------------------- webhook


class _HookServer(ThreadingHTTPServer):
    daemon_threads = True
    mode = "ok"
    sleep_sec = 0.0

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HookHandler)
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.release = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # client hung up after a timeout: expected, keep stderr clean

    @property
    def hits(self) -> int:
        with self.lock:
            return len(self.bodies)


class _HookHandler(BaseHTTPRequestHandler):
    server: _HookServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the default would print the path (with the token) to stderr

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        with self.server.lock:
            self.server.bodies.append(body)
            self.server.paths.append(self.path)
        if self.server.mode == "sleep":
            self.server.release.wait(self.server.sleep_sec)
        code = 500 if self.server.mode == "500" else 404 if self.server.mode == "404" else 200
        try:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok" if code == 200 else b"error")
        except OSError:
            pass


@pytest.fixture
def hook_server() -> Iterator[_HookServer]:
    server = _HookServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _hook(server: _HookServer, **kwargs: Any) -> mon.WebhookNotifier:
    url = f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/{TOKEN}"
    # trust_env=False: never use a proxy
    return mon.WebhookNotifier(env={"HOUSING_WEBHOOK_URL": url}, trust_env=False, **kwargs)


def _assert_no_token(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    out = capsys.readouterr()
    assert TOKEN not in caplog.text
    assert TOKEN not in out.err and TOKEN not in out.out
    for record in caplog.records:
        assert TOKEN not in record.getMessage()


def test_webhook_success_slack_payload(
    hook_server: _HookServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hook = _hook(hook_server)
    assert TOKEN not in repr(hook) and TOKEN not in hook.target
    with caplog.at_level(logging.DEBUG):
        assert hook.send(_event()) is True
    assert hook.last_attempts == 1
    assert hook_server.paths == [f"/services/T000/B000/{TOKEN}"]
    (body,) = hook_server.bodies
    assert set(body) == {"text"}
    assert "train_ridge" in body["text"] and "FAILED" in body["text"]
    assert "run-42" in body["text"]
    _assert_no_token(caplog, capsys)


def test_webhook_timeout_is_bounded_retried_and_silent(
    hook_server: _HookServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hook_server.mode, hook_server.sleep_sec = "sleep", 3.0
    hook = _hook(hook_server, timeout_sec=0.25, retries=2, backoff_sec=0.05)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        hook.notify(_event())  # must not raise
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0  # 3 x 0.25 s + backoff, far below the server's 3 s sleep
    assert hook.last_attempts == 3
    deadline = time.monotonic() + 2
    while hook_server.hits < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hook_server.hits == 3
    assert "timed out" in caplog.text
    assert f"http://127.0.0.1:{hook_server.server_address[1]}/<redacted>" in caplog.text
    _assert_no_token(caplog, capsys)


def test_webhook_http_500_retries_then_gives_up(
    hook_server: _HookServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hook_server.mode = "500"
    hook = _hook(hook_server, timeout_sec=1, retries=2, backoff_sec=0.01)
    with caplog.at_level(logging.WARNING):
        hook.notify(_event())
        assert hook.send(_event()) is False
    assert hook_server.hits == 6
    assert "HTTP 500" in caplog.text and "3 attempt(s)" in caplog.text
    _assert_no_token(caplog, capsys)


def test_webhook_http_404_is_not_retried(
    hook_server: _HookServer,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hook_server.mode = "404"
    hook = _hook(hook_server, retries=3, backoff_sec=0.01)
    with caplog.at_level(logging.WARNING):
        assert hook.send(_event()) is False
    assert hook_server.hits == 1
    assert "HTTP 404" in caplog.text
    _assert_no_token(caplog, capsys)


def test_webhook_connection_refused_never_raises(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook/{TOKEN}?token={TOKEN}"
    hook = mon.WebhookNotifier(
        "X_HOOK", env={"X_HOOK": url}, retries=1, backoff_sec=0.01, trust_env=False
    )
    with caplog.at_level(logging.WARNING):
        multi = mon.Notifiers([hook, mon.ConsoleNotifier()], ["all"])
        multi.notify(_event())
    assert hook.last_attempts == 2
    assert "connection error" in caplog.text
    _assert_no_token(caplog, capsys)


def test_webhook_unset_env_is_noop() -> None:
    hook = mon.WebhookNotifier(env={})
    assert not hook.enabled
    assert hook.send(_event()) is False
    assert hook.last_attempts == 0


def test_redact_url() -> None:
    assert mon.redact_url(f"https://user:pw@hooks.slack.com/services/{TOKEN}") == (
        "https://hooks.slack.com/<redacted>"
    )
    assert mon.redact_url("not a url") == "<redacted-url>"


def test_progress_lines_only_for_long_steps(caplog: pytest.LogCaptureFixture) -> None:
    from housing.monitoring import Progress

    logger = logging.getLogger("housing.test-progress")
    caplog.set_level(logging.INFO, logger=logger.name)
    quick = Progress(logger, "quick", 3)  # done well within 2 s: silent
    for done in (1, 2, 3):
        quick(done)
    slow = Progress(logger, "slow", 3, after=0.0)
    for done in (1, 2, 3):
        slow(done, f": item {done}")
    throttled = Progress(logger, "throttled", 3, after=0.0, every=3600.0)
    for done in (1, 2, 3):
        throttled(done)  # only the last line gets through the throttle
    assert [r.getMessage() for r in caplog.records] == [
        "slow 1/3: item 1",
        "slow 2/3: item 2",
        "slow 3/3: item 3",
        "throttled 3/3",
    ]
