"""Syncing offline sessions (written by the real SDK) into the recording fake ClearML API."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import joblib
import pytest
from sklearn.linear_model import Ridge

from housing.config import ClearMLServer, ClearMLSettings
from housing.tracking import offline
from housing.tracking.base import ChampionDecision, ModelVersion, StageRun
from housing.tracking.clearml import ClearMLTracker
from housing.tracking.offline import SyncError
from tests.fakes.clearml_api import FakeClearMLServer
from tests.helpers import settle_clearml

pytestmark = pytest.mark.integration

ACCESS, SECRET = "fake-access-key", "fake-secret-SENTINEL-5b1d"
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path) -> ClearMLSettings:
    return ClearMLSettings.model_validate(
        {"mode": "offline", "tags": ["housing"], "offline_dir": ".clearml"},
        context={"root": tmp_path},
    )


@pytest.fixture(autouse=True)
def clean_clearml_env(monkeypatch: pytest.MonkeyPatch, settings: ClearMLSettings) -> None:
    """No user ClearML variables; ``settings``' settled as a stage process's start-up does."""
    for key in [k for k in os.environ if k.startswith(("CLEARML_", "TRAINS_"))]:
        monkeypatch.delenv(key)
    settle_clearml(settings, monkeypatch)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "ridge.joblib"
    joblib.dump(Ridge(alpha=0.5).fit([[0.0], [1.0], [2.0]], [1.0, 2.0, 3.5]), path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_stages(settings: ClearMLSettings, model_file: Path) -> dict[str, Any]:
    """Two stage sessions: a train stage with a registered champion model, a failed one."""
    metrics_json = model_file.with_name("train_ridge.json")
    metrics_json.write_text('{"val/rmse": 0.25}', encoding="utf-8")
    with ClearMLTracker(settings, run=StageRun("train", "train_ridge", "run-1")) as tracker:
        tracker.log_params({"alpha": 0.5}, "train_params")
        tracker.log_metrics({"train/rmse": 0.125, "val/rmse": 0.25})
        tracker.log_artifact(metrics_json)
        registered = tracker.register_model(
            ModelVersion(
                registry_name="housing-ridge",
                path=model_file,
                algorithm="ridge",
                metrics={"val/rmse": 0.25},
                params={"alpha": 0.5},
                metadata={"model_sha256": sha256(model_file), "data_md5": "d" * 32},
            )
        )
        tracker.promote(
            ChampionDecision(
                "housing-ridge",
                "1",
                0.25,
                None,
                None,
                "val/rmse",
                True,
                "no champion yet",
                "2026-01-01T00:00:00+00:00",
            ),
            registered,
        )
    with (
        pytest.raises(ValueError, match="bad split"),
        ClearMLTracker(settings, run=StageRun("evaluate", "evaluate", "run-1")) as tracker,
    ):
        tracker.log_metrics({"test/rmse": 0.5})
        raise ValueError("bad split")
    return {"registered": registered}


def fake_env(server: FakeClearMLServer) -> dict[str, str]:
    return {**os.environ, "CLEARML_API_ACCESS_KEY": ACCESS, "CLEARML_API_SECRET_KEY": SECRET}


def at_server(settings: ClearMLSettings, server: FakeClearMLServer) -> ClearMLSettings:
    """``settings`` pointed at the fake server (API, web and files hosts)."""
    hosts = ClearMLServer(
        api_host=server.api_host, web_host=server.web_host, files_host=server.files_host
    )
    return settings.model_copy(update={"server": hosts})


def at_host(settings: ClearMLSettings, api_host: str, **changes: Any) -> ClearMLSettings:
    """``settings`` pointed at ``api_host`` (other hosts: the defaults), with ``changes``."""
    return settings.model_copy(update={"server": ClearMLServer(api_host=api_host), **changes})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def corrupt_session(settings: ClearMLSettings) -> Path:
    folder = settings.offline_dir / "offline" / "offline-0000corrupt0000"
    folder.mkdir(parents=True)
    (folder / "task.json").write_text('{"id": "offline-0000corrupt0000", "name": ', "utf-8")
    return folder


def promote_new_champion(settings: ClearMLSettings, model_file: Path) -> str:
    """A later select stage whose model (version 2) replaces the champion; its model id."""
    run = StageRun("select_best", "select_best", "run-2")
    with ClearMLTracker(settings, run=run) as tracker:
        registered = tracker.register_model(
            ModelVersion("housing-ridge", model_file, "ridge", {"val/rmse": 0.2}, {}, {})
        )
        decision = ChampionDecision(
            "housing-ridge", registered.version, 0.2, "1", 0.25, "val/rmse", True,
            "0.2 beats 0.25", "2026-01-02T00:00:00+00:00",
        )  # fmt: skip
        tracker.promote(decision, registered)
    return registered.model_id


# --------------------------------------------------------------------------- sync


@pytest.mark.slow
def test_sync_imports_sessions_once(
    settings: ClearMLSettings, model_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record_stages(settings, model_file)
    promote_new_champion(settings, model_file)
    bad = corrupt_session(settings)
    sessions = offline.list_sessions(settings.offline_dir)
    by_name = {s.name: s for s in sessions}
    original_task_json = (by_name["housing:train_ridge"].folder / "task.json").read_bytes()
    # A champion imported by an earlier sync, already on the server.
    old_champion = {
        "name": "housing-ridge",
        "project_name": "housing",
        "ready": True,
        "tags": ["champion", "version:0"],
    }

    with FakeClearMLServer(access_key=ACCESS, secret_key=SECRET, models=[old_champion]) as server:
        caplog.set_level(logging.WARNING, logger="housing.tracking.offline")
        started = time.perf_counter()
        report = offline.sync(at_server(settings, server), env=fake_env(server))
        seconds = time.perf_counter() - started

        assert report.ok, report.failed
        assert set(report.imported) == {s.task_id for s in sessions}
        assert any(str(bad) in r.getMessage() for r in caplog.records)
        endpoints = server.endpoints()
        for endpoint in (
            "debug.ping",
            "auth.login",
            "projects.get_all",
            "tasks.create",
            "tasks.edit",
            "tasks.started",
            "models.create",
            "models.edit",
            "events.add_batch",
            "tasks.completed",
            "tasks.failed",
            "files.upload",
        ):
            assert endpoint in endpoints, endpoints
        print(f"sync: {seconds:.2f} s; endpoints: {endpoints}")

        created = [body["name"] for body in server.calls_to("tasks.create")]
        assert created == ["housing:train_ridge", "housing:evaluate", "housing:select_best"]
        tasks = {t["name"]: t for t in server.tasks.values()}
        train, evaluate = tasks["housing:train_ridge"], tasks["housing:evaluate"]
        assert train["status"] == "completed"
        assert evaluate["status"] == "failed"
        assert evaluate["status_reason"] == "ValueError: bad split"
        assert {"housing", "train", "champion:promoted"} <= set(train["tags"])
        assert train["hyperparams"]["train_params"]["alpha"]["value"] == "0.5"
        assert train["id"] == report.imported[by_name["housing:train_ridge"].task_id]

        models = {
            tag: m
            for m in server.models.values()
            for tag in m["tags"]
            if tag.startswith("version:")
        }
        assert set(models) == {"version:0", "version:1", "version:2"}
        model = models["version:1"]
        assert model["name"] == "housing-ridge"
        assert {f"data:{'d' * 32}", "algorithm:ridge"} <= set(model["tags"])
        assert not any(t.startswith("sha256:") for t in model["tags"])
        record = json.loads(next(ln for ln in model["comment"].splitlines() if ln.startswith("{")))
        assert record["metadata"]["model_sha256"] == sha256(model_file)
        assert record["metrics"] == {"val/rmse": 0.25}
        assert model["uri"].startswith(server.files_host)
        assert "housing-clearml-sync" not in model["comment"]  # no temporary path in it
        uploaded = {
            k: v for k, v in server.uploads.items() if k.endswith("housing-ridge-v1.joblib")
        }
        assert list(uploaded.values()) == [model_file.read_bytes()]
        assert any(k.endswith("train_ridge.json") for k in server.uploads)
        # The champion tag moved: only version 2 (the ledger's champion) keeps it, published.
        champions = [v for v, m in sorted(models.items()) if "champion" in m["tags"]]
        assert champions == ["version:2"]
        assert models["version:2"]["ready"] is True

        scalars = {
            (e["metric"], e["variant"]): e["value"]
            for e in server.events(train["id"])
            if e.get("type") == "training_stats_scalar" and e["metric"] != "Summary"
        }
        assert scalars == {("train", "rmse"): 0.125, ("val", "rmse"): 0.25}

        ledger = json.loads((settings.offline_dir / offline.IMPORTED_FILE).read_text())
        assert set(ledger["sessions"]) == set(report.imported)
        assert SECRET not in (settings.offline_dir / offline.IMPORTED_FILE).read_text()
        assert SECRET not in (settings.offline_dir / "clearml-sync.conf").read_text()

        # A second sync imports nothing (and needs no server round trip at all).
        server.reset_calls()
        again = offline.sync(at_server(settings, server), env=fake_env(server))
        assert again.imported == {}
        assert sorted(again.already_imported) == sorted(report.imported)
        assert server.calls == []

    # The originals were never patched.
    assert (by_name["housing:train_ridge"].folder / "task.json").read_bytes() == original_task_json


def test_unreachable_server_fails_fast_and_loses_nothing(
    settings: ClearMLSettings, model_file: Path
) -> None:
    record_stages(settings, model_file)
    imported = settings.offline_dir / offline.IMPORTED_FILE
    imported.write_text('{"sessions": {}}\n', encoding="utf-8")
    before = imported.read_bytes()
    api_host = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "CLEARML_API_ACCESS_KEY": ACCESS, "CLEARML_API_SECRET_KEY": SECRET}

    started = time.perf_counter()
    with pytest.raises(SyncError) as excinfo:
        offline.sync(at_host(settings, api_host, connect_timeout_sec=1.0), env=env)
    assert time.perf_counter() - started < 5
    message = str(excinfo.value)
    assert "\n" not in message
    assert api_host in message and "not reachable" in message
    assert "2 session(s) wait" in message
    assert SECRET not in message
    assert imported.read_bytes() == before
    assert len(offline.list_sessions(settings.offline_dir)) == 2

    with pytest.raises(SyncError, match="CLEARML_API_SECRET_KEY"):
        offline.sync(at_host(settings, api_host), env={"CLEARML_API_ACCESS_KEY": ACCESS})


def test_wrong_credentials_stop_the_sync(settings: ClearMLSettings, model_file: Path) -> None:
    record_stages(settings, model_file)
    with FakeClearMLServer(access_key=ACCESS, secret_key="the-right-one") as server:
        started = time.perf_counter()
        with pytest.raises(SyncError) as excinfo:
            offline.sync(at_server(settings, server), env=fake_env(server))
        assert time.perf_counter() - started < 15
        assert server.endpoints() == ["debug.ping", "auth.login"]
    message = str(excinfo.value)
    assert "auth.login refused the credentials (HTTP 401)" in message
    assert "nothing imported; 2 session(s) wait" in message
    assert SECRET not in message and "\n" not in message
    assert not (settings.offline_dir / offline.IMPORTED_FILE).exists()


def test_one_sync_at_a_time(settings: ClearMLSettings) -> None:
    from housing.io import file_lock

    with file_lock(settings.offline_dir / offline.SYNC_LOCK_FILE) as acquired:
        assert acquired
        with pytest.raises(SyncError, match="another ClearML sync"):
            offline.sync(at_host(settings, "http://127.0.0.1:9"), env={})


@pytest.mark.slow
def test_a_failed_import_is_reported_and_retried(
    settings: ClearMLSettings, model_file: Path
) -> None:
    with ClearMLTracker(settings, run=StageRun("prepare", "prepare", "run-7")) as tracker:
        tracker.log_metrics({"data/rows": 506})
    (session,) = offline.list_sessions(settings.offline_dir)

    with FakeClearMLServer() as server:
        server.fail("tasks.create", times=1, status=400, message="project is read-only")
        first = offline.sync(at_server(settings, server), env=fake_env(server))
        assert first.imported == {}
        assert "read-only" in first.failed[session.task_id] or first.failed[session.task_id]
        assert not (settings.offline_dir / offline.IMPORTED_FILE).exists()

        second = offline.sync(at_server(settings, server), env=fake_env(server))
        assert list(second.imported) == [session.task_id]
        assert [t["name"] for t in server.tasks.values()] == ["housing:prepare"]


def test_a_long_sync_reports_its_progress(
    settings: ClearMLSettings,
    model_file: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for stage in ("prepare", "evaluate"):
        with ClearMLTracker(settings, run=StageRun(stage, stage, "run-8")) as tracker:
            tracker.log_metrics({"data/rows": 506})
    monkeypatch.setattr(offline, "PROGRESS_AFTER_SEC", 0.0)  # every sync is "long"
    caplog.set_level(logging.INFO, logger="housing.tracking.offline")
    with FakeClearMLServer() as server:
        report = offline.sync(at_server(settings, server), env=fake_env(server))
    assert len(report.imported) == 2
    progress = [r.getMessage() for r in caplog.records if "sessions imported" in r.getMessage()]
    assert progress, "no progress line"
    assert progress[-1].endswith("/2 sessions imported")


# --------------------------------------------------------------------------- session folder


def test_corrupt_and_open_sessions(
    settings: ClearMLSettings, model_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record_stages(settings, model_file)
    bad = corrupt_session(settings)
    empty = settings.offline_dir / "offline" / "offline-0000empty00000"
    empty.mkdir()
    caplog.set_level(logging.WARNING, logger="housing.tracking.offline")

    sessions = offline.list_sessions(settings.offline_dir)
    assert [s.name for s in sessions] == ["housing:train_ridge", "housing:evaluate"]
    warnings = [r.getMessage() for r in caplog.records]
    assert any(str(bad) in w for w in warnings)
    assert any(str(empty) in w and "no task.json" in w for w in warnings)
    assert all("\n" not in w for w in warnings)

    # Open sessions (no zip yet: running or crashed) are not synced by default, and with
    # nothing else pending the server is not even contacted.
    for session in sessions:
        assert session.zip_path is not None
        session.zip_path.unlink()
    reopened = offline.list_sessions(settings.offline_dir)
    assert [(s.closed, s.status) for s in reopened] == [(False, "open"), (False, "failed")]
    report = offline.sync(at_host(settings, f"http://127.0.0.1:{free_port()}"), env={})
    assert sorted(report.open_sessions) == sorted(s.task_id for s in sessions)
    assert report.imported == {} and report.ok


def test_a_session_read_from_its_zip_and_patched_copy(
    settings: ClearMLSettings, model_file: Path, tmp_path: Path
) -> None:
    record_stages(settings, model_file)
    train = next(s for s in offline.list_sessions(settings.offline_dir) if s.name.endswith("ridge"))
    # Move the offline folder away: recorded absolute paths now dangle.
    moved = tmp_path / "moved"
    shutil.move(settings.offline_dir, moved)
    (session,) = [s for s in offline.list_sessions(moved) if s.task_id == train.task_id]
    (model,) = offline.read_models(session)
    assert model.weights_path is not None and model.weights_path.is_relative_to(moved)
    assert offline.read_artifacts(session)["train_ridge.json"] is not None

    # Both config_text and config_dict recorded: the copy keeps only one.
    task_json = session.folder / "task.json"
    data = json.loads(task_json.read_text())
    data["offline_output_models"][0]["init"].update(config_text="a = 1", config_dict={"a": 1})
    task_json.write_text(json.dumps(data))
    original = task_json.read_bytes()
    session = next(s for s in offline.list_sessions(moved) if s.task_id == train.task_id)

    copy = offline._patched_copy(session, tmp_path / "copy", None)
    patched = json.loads((copy / "task.json").read_text())["offline_output_models"][0]
    assert patched["init"]["config_text"] == "a = 1" and not patched["init"]["config_dict"]
    assert patched["weights"]["weights_filename"] == str(
        session.folder / "models" / model.weights_path.name
    )
    uploaded = offline._patched_copy(session, tmp_path / "copy2", "http://files")
    patched = json.loads((uploaded / "task.json").read_text())["offline_output_models"][0]
    assert patched["weights"]["weights_filename"].startswith(str(tmp_path / "copy2"))
    assert patched["output_uri"] == "http://files"
    assert task_json.read_bytes() == original  # the original is untouched

    # Only the zip left: still listed and readable.
    shutil.rmtree(session.folder)
    (from_zip,) = [s for s in offline.list_sessions(moved) if s.task_id == train.task_id]
    assert from_zip.zip_path is not None
    assert offline.read_scalars(from_zip) == {"train/rmse": 0.125, "val/rmse": 0.25}


# --------------------------------------------------------------------------- online (subprocess)

ONLINE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from housing.tracking.base import ChampionDecision, ModelVersion, StageRun
    from housing.config import ClearMLSettings
    from housing.entry import settle_environment
    from housing.tracking.clearml import ClearMLTracker, sdk_env

    root, model = Path(sys.argv[1]), Path(sys.argv[2])
    settings = ClearMLSettings.model_validate({"mode": "auto", "server": {
        "api_host": sys.argv[3], "web_host": sys.argv[3] + "/web",
        "files_host": sys.argv[3] + "/files"}}, context={"root": root})
    settle_environment(sdk_env(settings, os.environ))  # this script's start-up
    out = {}
    mv = ModelVersion("housing-best", model, "ridge", {"val/rmse": 0.25}, {},
                      {"model_sha256": "abc"})
    try:
        with ClearMLTracker(settings, run=StageRun("select_best", "select_best", "r")) as t:
            out["mode"] = t.mode
            t.log_params({"metric": "val/rmse"}, "selection")
            t.log_metrics({"val/rmse": 0.25})
            first = t.register_model(mv)
            t.promote(ChampionDecision("housing-best", "1", 0.25, None, None, "val/rmse",
                                       True, "first", "now"), first)
            second = t.register_model(mv)
            t.promote(ChampionDecision("housing-best", "2", 0.2, "1", 0.25, "val/rmse",
                                       True, "better", "now"), second)
            out["champion"] = t.champion("housing-best", "val/rmse")
            out["versions"] = [first.version, second.version]
            out["timings"] = t.timings
            raise RuntimeError("late failure")
    except RuntimeError:
        out["raised"] = True
    out["close"] = t.timings["close"]
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_online_mode_against_the_fake_server(tmp_path: Path, model_file: Path) -> None:
    with FakeClearMLServer(access_key=ACCESS, secret_key=SECRET) as server:
        env = {**fake_env(server), "PYTHONPATH": str(PROJECT / "src")}
        proc = subprocess.run(
            [sys.executable, "-c", ONLINE_SCRIPT, str(tmp_path), str(model_file), server.api_host],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        result = json.loads(line.removeprefix("RESULT "))
        assert result["mode"] == "online"
        assert result["versions"] == ["1", "2"]
        assert result["champion"] == ["2", 0.2]  # the decision's value, not the registration's
        assert result["raised"] is True
        assert result["close"] < 3

        (task,) = server.tasks.values()
        assert task["name"] == "housing:select_best"
        assert task["status"] == "failed"
        assert task["hyperparams"]["selection"]["metric"]["value"] == "val/rmse"
        models = sorted(server.models.values(), key=lambda m: m["created"] + m["id"])
        assert [("champion" in m["tags"]) for m in models] == [False, True]
        assert models[1]["ready"] is True  # published
        assert all(m["uri"].startswith(server.files_host) for m in models)
        assert "models.add_or_update_metadata" in server.endpoints()
        for model in models:  # the record is one metadata entry, not one per key
            assert set(model["metadata"]) - {"champion_metric", "champion_value"} == {"lineage"}
            record = json.loads(model["metadata"]["lineage"]["value"])
            assert (record["registry_name"], record["version"]) == (
                model["name"],
                "1" if model is models[0] else "2",
            )
            assert set(record) >= {"metadata", "metrics", "params", "algorithm", "task_id"}
        assert not (tmp_path / ".clearml" / "offline").exists()  # nothing recorded offline


def test_fake_pages_and_filters_tasks() -> None:
    server = FakeClearMLServer(
        tasks=[
            {"name": f"housing:train_{i}", "project_name": "housing", "tags": ["t"]}
            for i in range(5)
        ],
        models=[{"name": "housing-best", "tags": ["champion"]}, {"name": "housing-ridge"}],
    )
    with server:

        def post(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
            request = urllib.request.Request(
                f"{server.api_host}/v2.23/{endpoint}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Authorization": "Basic azpz"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                envelope = json.loads(response.read())
            assert envelope["meta"]["result_code"] == 200
            return dict(envelope["data"])

        pages = [post("tasks.get_all", {"page": p, "page_size": 2})["tasks"] for p in range(3)]
        assert [len(p) for p in pages] == [2, 2, 1]
        assert len({t["id"] for p in pages for t in p}) == 5
        assert all(t["output"] == {} for p in pages for t in p)
        found = post("models.get_all", {"name": "^housing\\-best$", "tags": ["champion"]})
        assert [m["name"] for m in found["models"]] == ["housing-best"]
        assert (
            post("models.get_all", {"tags": ["-champion"]})["models"][0]["name"] == "housing-ridge"
        )
        assert server.calls_to("tasks.get_all")[0] == {"page": 0, "page_size": 2}


@pytest.mark.slow
def test_sync_keeps_run_times_and_model_metadata(
    settings: ClearMLSettings, model_file: Path
) -> None:
    """The server stamps an imported task with the import time; compare must still show
    (and order by) when the offline run happened, and the model keeps its record."""
    from housing.reporting.compare import _server_task_row, iso, parse_time

    record_stages(settings, model_file)
    sessions = {s.name: s for s in offline.list_sessions(settings.offline_dir)}
    train = sessions["housing:train_ridge"]
    started, completed = offline.run_times(train)
    assert completed is not None and started <= completed
    time.sleep(1.1)  # the import happens visibly later than the run
    with FakeClearMLServer(access_key=ACCESS, secret_key=SECRET) as server:
        report = offline.sync(at_server(settings, server), env=fake_env(server))
        assert report.ok, report.failed
        tasks = {t["name"]: t for t in server.tasks.values()}
        props = tasks["housing:train_ridge"]["hyperparams"]["properties"]
        assert props[offline.RUN_STARTED]["value"] == started.isoformat(timespec="milliseconds")
        assert props[offline.RUN_COMPLETED]["value"] == completed.isoformat(timespec="milliseconds")
        row = _server_task_row(tasks["housing:train_ridge"], "housing")
        assert (row["started"], row["completed"]) == (iso(started), iso(completed))
        # not the import's time (the server's created/started), which came over a second later
        imported = parse_time(tasks["housing:train_ridge"]["created"])
        assert imported is not None and imported - started > timedelta(seconds=1)
        # compare orders by run time: the failed evaluate ran after train
        rows = [_server_task_row(t, "housing") for t in tasks.values()]
        when = {r["name"]: r["started"] for r in rows}
        assert when["housing:train_ridge"] <= when["housing:evaluate"] < iso(imported)

        (model,) = [m for m in server.models.values() if "version:1" in m["tags"]]
        lineage = model["metadata"][offline.LINEAGE_METADATA]["value"]
        assert json.loads(lineage)["metadata"]["model_sha256"] == sha256(model_file)
