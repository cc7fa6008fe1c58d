"""CLI subcommands beyond the stages: doctor, status."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from housing.cli import main
from housing.monitoring import EventLog, track_stage

from .conftest import CONF


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_doctor_with_an_unreachable_server_answers_fast_and_hides_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "AKEY1234567890")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "SENTINEL-SECRET-DOCTOR")
    host = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    main(["--config-dir", str(CONF), "doctor", f"clearml.server.api_host={host}"])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert elapsed < 5
    assert "unreachable" in out
    assert "SENTINEL-SECRET-DOCTOR" not in out
    assert "AKEY1234567890" not in out


def test_status_reads_the_last_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--config-dir", str(CONF), "status"]) == 0
    assert "no pipeline runs" in capsys.readouterr().out
    events = EventLog(tmp_path / "metrics" / "pipeline_events.jsonl")
    with track_stage(events, "run-1", "prepare"):
        pass
    with pytest.raises(RuntimeError), track_stage(events, "run-1", "train_ridge"):
        raise RuntimeError("boom")
    assert main(["--config-dir", str(CONF), "status"]) == 1
    out = capsys.readouterr().out
    assert "run-1" in out and "train_ridge" in out and "failed" in out
