"""ClearMLTracker with the real clearml SDK in offline mode, read back from the session folder."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from housing.config import load_settings
from housing.errors import ArtifactError, ConfigError
from housing.quirks.clearml import MASTER_ID_VARIABLES
from housing.tracking import clearml as clearml_tracking
from housing.tracking import offline
from housing.tracking.base import (
    ChampionDecision,
    Figure,
    ModelVersion,
    StageRun,
    Tracker,
)
from housing.tracking.clearml import (
    OFFLINE_ENV,
    ClearMLError,
    ClearMLSettings,
    ClearMLTracker,
    resolve_mode,
)
from tests.conftest import CONF
from tests.fakes.clearml_api import FakeClearMLServer
from tests.helpers import offline_folder, read_log, settle_clearml

pytestmark = pytest.mark.integration


KEYS = ("CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY")  # tests may set these


#: Variables the SDK itself sets in the process that opens a task.
SDK_OWN = {*MASTER_ID_VARIABLES, *OFFLINE_ENV}


def _clearml_vars() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("CLEARML_", "TRAINS_"))}


@pytest.fixture(autouse=True)
def clean_clearml_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No user ClearML variables; those of ``make_settings(tmp_path)`` settled as a stage
    process settles them at start-up; after the test no task is open and the tracker
    wrote no variable (only the SDK's own)."""
    for key in _clearml_vars():
        monkeypatch.delenv(key)
    settle_clearml(make_settings(tmp_path))
    before = _clearml_vars()
    yield
    from clearml import Task

    assert Task.current_task() is None, "a ClearML task leaked out of the test"
    after = _clearml_vars()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed - SDK_OWN - set(KEYS), f"the tracker wrote {changed}"


def make_settings(root: Path, **overrides: object) -> ClearMLSettings:
    mapping: dict[str, object] = {
        "mode": "offline",
        "project_name": "housing",
        "task_prefix": "housing",
        "model_name": "housing",
        "tags": ["housing"],
        "offline_dir": ".clearml",
        **overrides,
    }
    return ClearMLSettings.model_validate(mapping, context={"root": root})


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A real (tiny) sklearn Pipeline saved with joblib."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 3.0
    pipeline = make_pipeline(StandardScaler(), LinearRegression()).fit(x, y)
    path = tmp_path / "models" / "linear_regression.joblib"
    path.parent.mkdir(parents=True)
    joblib.dump(pipeline, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_version(
    path: Path, name: str = "housing-linear_regression", rmse: float = 2.5
) -> ModelVersion:
    return ModelVersion(
        registry_name=name,
        path=path,
        algorithm="linear_regression",
        metrics={"val/rmse": rmse, "cv/rmse_mean": rmse + 0.1},
        params={"fit_intercept": True, "nested": {"n_jobs": -1}},
        metadata={
            "model_sha256": sha256(path),
            "data_md5": "0123456789abcdef0123456789abcdef",
            "git_commit": "a" * 40,
            "config_hash": "b" * 64,
            "created_at": "2026-01-01T00:00:00+00:00",
        },
        tags=("candidate",),
    )


def only_session(settings: ClearMLSettings) -> offline.OfflineSession:
    sessions = offline.list_sessions(settings.offline_dir)
    assert len(sessions) == 1, sessions
    return sessions[0]


# --------------------------------------------------------------------------- settings / mode


def test_settings_from_the_clearml_section(tmp_path: Path) -> None:
    mapping = {
        "enabled": True,
        "mode": "auto",
        "project_name": "housing",
        "task_prefix": "hp",
        "model_name": "housing",
        "output_uri": None,
        "tags": ["housing", "hw5"],
        "offline_dir": ".clearml",
        "server": {
            "api_host": "http://127.0.0.1:8008/",
            "web_host": "http://127.0.0.1:8080",
            "files_host": "http://127.0.0.1:8081",
        },
        "auth": {"access_key_env": "MY_KEY", "secret_key_env": "MY_SECRET"},
        "connect_timeout_sec": 2.0,
        "pipeline": {"execution_queue": "default"},
    }
    settings = ClearMLSettings.model_validate(mapping, context={"root": tmp_path})
    assert settings.offline_dir == tmp_path / ".clearml"
    assert settings.tags == ("housing", "hw5")
    assert settings.server.api_host == "http://127.0.0.1:8008"
    assert (settings.auth.access_key_env, settings.auth.secret_key_env) == ("MY_KEY", "MY_SECRET")
    assert settings.output_uri is None
    absolute = ClearMLSettings.model_validate(
        {**mapping, "offline_dir": str(tmp_path / "abs")}, context={"root": Path("/elsewhere")}
    )
    assert absolute.offline_dir == tmp_path / "abs"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("clearml.mode=sometimes", "clearml.mode: unknown value 'sometimes'"),
        ("clearml.tags=housing", "clearml.tags: expected a list, got 'housing'"),
        ("clearml.connect_timeout_sec=0", "clearml.connect_timeout_sec: must be > 0, got 0"),
        ("clearml.enabled=yes", "clearml.enabled: expected true or false, got 'yes'"),
        ("clearml.server.api_host=''", "clearml.server.api_host: must not be empty, got ''"),
    ],
)
def test_settings_errors_name_the_key(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings([override], CONF, tmp_path)
    assert str(caught.value).startswith(message)


def test_resolve_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    keys = {"CLEARML_API_ACCESS_KEY": "k", "CLEARML_API_SECRET_KEY": "s"}
    dead = make_settings(
        tmp_path, mode="auto", server={"api_host": f"http://127.0.0.1:{dead_port}"}
    )

    assert resolve_mode(make_settings(tmp_path, mode="offline"), env={})[0] == "offline"
    assert resolve_mode(make_settings(tmp_path, mode="online"), env={})[0] == "online"

    caplog.set_level(logging.INFO, logger="housing.tracking.clearml")
    mode, reason = resolve_mode(dead, env={})
    assert mode == "offline"
    assert "CLEARML_API_ACCESS_KEY" in reason
    assert "CLEARML_API_SECRET_KEY" in reason

    started = time.perf_counter()
    mode, reason = resolve_mode(dead, env=keys, timeout=0.5)
    assert time.perf_counter() - started < 3
    assert (mode, "not reachable" in reason) == ("offline", True)
    resolve_mode(dead, env=keys, timeout=0.5)
    assert sum("not reachable" in r.getMessage() for r in caplog.records) == 1  # logged once

    with FakeClearMLServer() as server:
        alive = make_settings(tmp_path, mode="auto", server={"api_host": server.api_host})
        assert resolve_mode(alive, env=keys) == ("online", f"server {server.api_host} answered")
        assert resolve_mode(alive, env={})[0] == "offline"  # no credentials: never online
        offline_env = {**keys, "CLEARML_OFFLINE_MODE": "1"}  # as doctor and the SDK read it
        assert resolve_mode(alive, env=offline_env) == ("offline", "CLEARML_OFFLINE_MODE is set")
        alias = {**keys, "TRAINS_OFFLINE_MODE": "true"}  # the SDK's older name, as it reads it
        assert resolve_mode(alive, env=alias) == ("offline", "CLEARML_OFFLINE_MODE is set")
        assert server.endpoints() == ["debug.ping", "auth.login"]  # the keys are checked too


def test_tracker_satisfies_the_protocol(tmp_path: Path) -> None:
    tracker = ClearMLTracker(make_settings(tmp_path))
    assert isinstance(tracker, Tracker)
    assert tracker.backend == "clearml"
    with pytest.raises(ClearMLError, match="not started"):
        tracker.log_text("no task yet")
    tracker.close("completed")  # closing an unopened tracker is a no-op
    with pytest.raises(ValueError, match="StageRun"):
        tracker.__enter__()


# --------------------------------------------------------------------------- round trip


def test_stage_is_recorded_offline_and_reads_back(tmp_path: Path, model_file: Path) -> None:
    settings = make_settings(tmp_path)
    metrics_json = tmp_path / "metrics" / "train_linear_regression.json"
    metrics_json.parent.mkdir()
    metrics_json.write_text(json.dumps({"val/rmse": 2.5}), encoding="utf-8")
    metrics = {
        "train/rmse": 1.25,
        "val/rmse": 2.5,
        "val/r2": 0.75,
        "cv/rmse_mean": 2.625,
        "cv/rmse_std": float("nan"),  # skipped
    }
    run = StageRun("train", "train_linear_regression", "run-1", tags=("model:linear_regression",))

    with ClearMLTracker(settings, run=run) as tracker:
        assert tracker.mode == "offline"
        assert os.environ["CLEARML_CACHE_DIR"] == str(settings.offline_dir)
        tracker.log_params({"fit_intercept": True, "scaler": {"with_mean": True}}, "train_params")
        connected = tracker.connect_params({"metric": "cv/rmse_mean"}, "selection")
        assert connected == {"metric": "cv/rmse_mean"}
        tracker.log_config({"model": {"name": "linear_regression"}, "seed": 42}, "config")
        tracker.log_metrics(metrics)
        tracker.log_metrics({"train/rmse": 1.0}, step=1)
        tracker.log_artifact(metrics_json)
        tracker.log_artifact(model_file, name="model")
        tracker.upload_artifact({"rows": 40}, "fingerprint")
        with pytest.raises(ArtifactError, match=r"missing\.json"):
            tracker.log_artifact(tmp_path / "missing.json")
        tracker.log_figure(
            Figure(
                "pred_vs_actual",
                "Predicted vs actual",
                "scatter",
                [1.0, 2.0, 3.0],
                [1.1, 1.9, 3.2],
                "actual",
                "predicted",
                diagonal=True,
            )
        )
        tracker.log_figure(Figure("importances", "Importances", "bar", ["a", "b"], [0.7, 0.3]))
        tracker.log_text("trained linear_regression on 40 rows")
        first = tracker.register_model(model_version(model_file))
        second = tracker.register_model(model_version(model_file))
        session_folder = offline_folder(tracker)
        closed_at = time.perf_counter()
    close_seconds = time.perf_counter() - closed_at

    assert close_seconds < 3, f"Task.close took {close_seconds:.2f} s"
    assert tracker.timings["close"] < 3
    assert tracker.task is None
    assert (first.backend, first.registry_name, first.version) == (
        "clearml",
        "housing-linear_regression",
        "1",
    )
    assert second.version == "2"
    assert first.model_id != second.model_id

    session = only_session(settings)
    assert session.folder == session_folder
    assert session.folder.parent == settings.offline_dir / "offline"
    assert session.name == "housing:train_linear_regression"
    assert session.project == "housing"
    assert {"housing", "model:linear_regression", "train"} <= set(session.tags)
    assert session.status == "completed"
    assert session.zip_path is not None and session.zip_path.is_file()

    params = session.hyperparams
    assert params["train_params"] == {"fit_intercept": "True", "scaler/with_mean": "True"}
    assert params["selection"] == {"metric": "cv/rmse_mean"}
    assert params["properties"]["pipeline_run_id"] == "run-1"
    assert params["properties"]["status"] == "completed"
    assert "linear_regression" in session.configuration["config"]
    assert "seed = 42" in session.configuration["config"]

    scalars = offline.read_scalars(session)
    assert scalars == {"train/rmse": 1.0, "val/rmse": 2.5, "val/r2": 0.75, "cv/rmse_mean": 2.625}
    summary = offline.read_scalars(session, summary=True)
    assert summary == {"train/rmse": 1.0, "val/rmse": 2.5, "val/r2": 0.75, "cv/rmse_mean": 2.625}

    plots = [
        json.loads(e["plot_str"])
        for e in offline.read_events(session, "metrics.jsonl")
        if e.get("type") == "plot"
    ]
    series = {trace.get("name") for plot in plots for trace in plot["data"]}
    assert {"pred_vs_actual", "y = x"} <= series
    assert any(trace.get("type") == "bar" for plot in plots for trace in plot["data"])
    assert any("trained linear_regression" in m for m in read_log(session))

    artifacts = offline.read_artifacts(session)
    assert artifacts["train_linear_regression.json"] is not None
    assert json.loads(artifacts["train_linear_regression.json"].read_text()) == {"val/rmse": 2.5}
    assert artifacts["model"] is not None and sha256(artifacts["model"]) == sha256(model_file)
    assert artifacts["fingerprint"] is not None
    assert {
        "model_metadata_housing-linear_regression_v1",
        "model_metadata_housing-linear_regression_v2",
    } <= set(artifacts)

    models = offline.read_models(session)
    assert [m.version for m in models] == ["1", "2"]
    assert [m.model_id for m in models] == [first.model_id, second.model_id]
    for model in models:
        assert model.name == "housing-linear_regression"
        assert model.framework == "ScikitLearn"
        assert model.weights_path is not None
        assert model.weights_path.parent == session.folder / "models"
        assert sha256(model.weights_path) == sha256(model_file)
        assert not any(t.startswith(("sha256:", "config:", "stage:")) for t in model.tags)
        assert model.metadata["metadata"]["model_sha256"] == sha256(model_file)  # the record
        assert "data:0123456789abcdef0123456789abcdef" in model.tags
        assert {"candidate", "algorithm:linear_regression", "git:aaaaaaaaaaaa"} <= set(model.tags)
        assert model.metadata["metrics"] == {"val/rmse": 2.5, "cv/rmse_mean": 2.6}
        assert model.metadata["metadata"]["config_hash"] == "b" * 64
        assert model.metadata["model_id"] == model.model_id
        init = next(
            e["init"] for e in session.task["offline_output_models"] if e["id"] == model.model_id
        )
        assert not (init["config_text"] and init["config_dict"])
    assert models[0].weights_path != models[1].weights_path  # no file name collision


def test_failure_inside_with_marks_the_task_failed(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    run = StageRun("evaluate", "evaluate", "run-2")
    with pytest.raises(RuntimeError, match="test set is empty"):  # noqa: SIM117
        with ClearMLTracker(settings, run=run) as tracker:
            tracker.log_metrics({"test/rmse": 3.0})
            raise RuntimeError("test set is empty\nsecond line")

    session = only_session(settings)
    assert session.status == "failed"
    assert offline.FAILED_TAG in session.tags
    assert session.properties["status"] == "failed"
    assert session.properties["error"] == "RuntimeError: test set is empty"
    assert any("stage failed: RuntimeError: test set is empty" in m for m in read_log(session))
    assert offline.read_scalars(session) == {"test/rmse": 3.0}
    assert session.zip_path is not None  # closed all the same


def test_a_task_inherited_from_another_process_is_not_taken_over(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started from a process with a ClearML task open (its ``CLEARML_PROC_MASTER_ID``,
    a live pid), a stage settles it away and is still its own task: it registers its model."""
    inherited = f"{os.getppid()}:0123456789abcdef"
    monkeypatch.setenv("CLEARML_PROC_MASTER_ID", inherited)
    settings = make_settings(tmp_path)
    assert settle_clearml(settings)["CLEARML_PROC_MASTER_ID"] is None
    assert "CLEARML_PROC_MASTER_ID" not in os.environ
    with ClearMLTracker(settings, run=StageRun("train", "train_a", "run-4")) as tracker:
        registered = tracker.register_model(model_version(model_file))
    assert registered.version == "1"
    assert [m.name for m in offline.read_models(only_session(settings))] == [
        "housing-linear_regression"
    ]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CLEARML_CACHE_DIR", "elsewhere"),  # settled for another offline_dir
        ("CLEARML_CONFIG_FILE", None),
        ("CLEARML_PROC_MASTER_ID", "1:0123456789abcdef"),  # inherited, not settled away
    ],
)
def test_a_tracker_refuses_an_environment_not_settled_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str | None
) -> None:
    """The tracker writes no variable: it names the one its process did not settle."""
    tracker = ClearMLTracker(make_settings(tmp_path))
    with monkeypatch.context() as mp:
        if value is None:
            mp.delenv(variable)
        else:
            mp.setenv(variable, str(tmp_path / value) if "DIR" in variable else value)
        with pytest.raises(ClearMLError, match=f"{variable} is .*settle_clearml"):
            tracker.start(StageRun("prepare", "prepare", "run-9"))
    assert tracker.task is None
    assert offline.list_sessions(tmp_path / ".clearml") == []


def test_online_needs_the_hosts_and_keys_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online, a key the settings name but the process did not settle is refused without
    showing it (offline, the hosts and keys do not matter)."""
    settings = make_settings(
        tmp_path, auth={"access_key_env": "MY_KEY", "secret_key_env": "MY_SECRET"}
    )
    with monkeypatch.context() as mp:
        mp.setenv("MY_KEY", "k-sentinel")
        mp.setenv("MY_SECRET", "s-sentinel")
        problem = clearml_tracking.env_problem(settings, os.environ, online=True)
        assert problem is not None and problem.startswith("CLEARML_API_ACCESS_KEY is not the")
        assert "k-sentinel" not in problem
        assert clearml_tracking.env_problem(settings, os.environ, online=False) is None
        env = settle_clearml(settings, mp)
        keys = (env["CLEARML_API_ACCESS_KEY"], env["CLEARML_API_SECRET_KEY"])
        assert keys == ("k-sentinel", "s-sentinel")
        assert env["CLEARML_API_HOST"] == settings.server.api_host
        assert clearml_tracking.env_problem(settings, os.environ, online=True) is None


def test_sequential_stages_in_one_process(tmp_path: Path, model_file: Path) -> None:
    settings = make_settings(tmp_path)
    versions = []
    for index, name in enumerate(["train_a", "train_b", "train_c"]):
        tracker = ClearMLTracker(settings)
        tracker.start(StageRun("train", name, "run-3"))
        if index == 0:
            blocked = ClearMLTracker(settings)
            with pytest.raises(ClearMLError, match="still open"):
                blocked.start(StageRun("train", "blocked", "run-3"))
        tracker.log_metrics({"val/rmse": float(index)})
        versions.append(
            tracker.register_model(model_version(model_file, name="housing-best")).version
        )
        tracker.close("completed")
        assert tracker.timings["close"] < 3
    assert versions == ["1", "2", "3"]
    sessions = offline.list_sessions(settings.offline_dir)
    assert [s.name for s in sessions] == ["housing:train_a", "housing:train_b", "housing:train_c"]
    assert [offline.read_scalars(s)["val/rmse"] for s in sessions] == [0.0, 1.0, 2.0]
    registry = json.loads((settings.offline_dir / offline.REGISTRY_FILE).read_text())
    assert registry["housing-best"]["last_version"] == 3


def test_no_secret_reaches_the_offline_folder(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "SENTINEL-9f2c51e7d4b34c0e"
    access = "ACCESS-SENTINEL-77aa"
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", secret)
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", access)
    settings = make_settings(tmp_path)
    with ClearMLTracker(settings, run=StageRun("train", "train_secret", "run-4")) as tracker:
        tracker.log_params({"alpha": 1.0}, "train_params")
        tracker.log_config(
            {"clearml": {"auth": {"secret_key_env": "CLEARML_API_SECRET_KEY"}}}, "config"
        )
        tracker.log_metrics({"val/rmse": 1.0})
        tracker.register_model(model_version(model_file))
        print("stage output goes to the console log")
    assert os.environ["CLEARML_API_SECRET_KEY"] == secret  # untouched

    blobs: list[tuple[str, bytes]] = []
    for path in settings.offline_dir.rglob("*"):
        if path.is_file():
            blobs.append((str(path), path.read_bytes()))
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as zf:
                    blobs.extend((f"{path}!{n}", zf.read(n)) for n in zf.namelist())
    assert len(blobs) > 5
    for name, data in blobs:
        assert secret.encode() not in data, f"secret leaked into {name}"
        assert access.encode() not in data, f"access key leaked into {name}"


def test_champion_ledger_promote_and_reject(tmp_path: Path, model_file: Path) -> None:
    settings = make_settings(tmp_path)
    name, metric = "housing-best", "cv/rmse_mean"

    with ClearMLTracker(settings, run=StageRun("select_best", "select_best", "run-5")) as tracker:
        assert tracker.champion(name, metric) is None
        registered = tracker.register_model(model_version(model_file, name=name, rmse=2.0))
        tracker.promote(
            ChampionDecision(
                name,
                registered.version,
                2.1,
                None,
                None,
                metric,
                True,
                "no champion yet",
                "2026-01-01T00:00:00+00:00",
            ),
            registered,
        )
        assert tracker.champion(name, metric) == ("1", 2.1)
        assert tracker.champion(name, "val/r2") is None  # decided on another metric

    with ClearMLTracker(settings, run=StageRun("select_best", "select_best", "run-6")) as tracker:
        assert tracker.champion(name, metric) == ("1", 2.1)
        challenger = tracker.register_model(model_version(model_file, name=name, rmse=3.0))
        assert challenger.version == "2"
        tracker.promote(
            ChampionDecision(
                name,
                challenger.version,
                3.1,
                "1",
                2.1,
                metric,
                False,
                "3.1 does not beat 2.1",
                "2026-01-02T00:00:00+00:00",
            ),
            challenger,
        )
        assert tracker.champion(name, metric) == ("1", 2.1)

    ledger = json.loads((settings.offline_dir / offline.CHAMPIONS_FILE).read_text())
    entry = ledger[name]
    assert (entry["version"], entry["value"], entry["metric"]) == ("1", 2.1, metric)
    assert entry["model_id"] == registered.model_id
    assert [h["promoted"] for h in entry["history"]] == [True, False]
    assert entry["history"][1]["reason"] == "3.1 does not beat 2.1"

    first, second = offline.list_sessions(settings.offline_dir)
    assert "champion:promoted" in first.tags
    assert "champion:rejected" in second.tags
    (model_1,) = offline.read_models(first)
    (model_2,) = offline.read_models(second)
    assert "champion" in model_1.tags
    assert "champion" not in model_2.tags
    assert any(
        "champion decision: housing-best v2" in m and "rejected" in m for m in read_log(second)
    )


def test_forced_online_without_a_server_records_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "k")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "s")
    settings = make_settings(tmp_path, mode="online", server={"api_host": dead})
    caplog.set_level(logging.WARNING, logger="housing.tracking.clearml")
    started = time.perf_counter()
    with ClearMLTracker(settings, run=StageRun("prepare", "prepare", "run-8")) as tracker:
        assert tracker.mode == "offline"
        assert "not reachable" in tracker.mode_reason
        tracker.log_metrics({"data/rows": 506.0})
    assert time.perf_counter() - started < 5
    assert any("recording offline" in r.getMessage() for r in caplog.records)
    assert offline.read_scalars(only_session(settings)) == {"data/rows": 506.0}
