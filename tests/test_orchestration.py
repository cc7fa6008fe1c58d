"""The pipeline DAG and its local executor: parallel steps, hash hand-off, cache, failures."""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from housing.cli import main
from housing.config import load_settings
from housing.errors import ArtifactError, HousingError
from housing.monitoring import read_events
from housing.orchestration import pipeline
from housing.orchestration.pipeline import (
    PipelineError,
    Step,
    StepCache,
    build_dag,
    cache_key,
    run_pipeline,
)
from tests.conftest import CONF

FAST = "selection.candidates=[linear_regression,ridge,random_forest]"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ClearML credentials (offline), no inherited run id."""
    for name in ("CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY", "HOUSING_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in ("CLEARML_CONFIG_FILE", "CLEARML_CACHE_DIR", "CLEARML_OFFLINE_MODE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    """A private copy of conf/ that a test may edit."""
    return Path(shutil.copytree(CONF, tmp_path / "conf"))


def _events(root: Path, run_id: str) -> list[dict[str, Any]]:
    return [
        e for e in read_events(root / "metrics" / "pipeline_events.jsonl") if e["run_id"] == run_id
    ]


def _final(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["stage"]: e for e in events if e["status"] != "started"}


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _train_metrics(root: Path, name: str) -> dict[str, float]:
    record = json.loads((root / "metrics" / f"train_{name}.json").read_text())
    return {k: v for k, v in record["metrics"].items() if not k.endswith("fit_seconds")}


# --------------------------------------------------------------------------- unit


def test_dag_has_one_train_step_per_candidate(tmp_path: Path) -> None:
    settings = load_settings(["selection.candidates=[ridge,random_forest]"], CONF, tmp_path)
    dag = build_dag(settings)
    assert [s.name for s in dag] == [
        "prepare",
        "train_ridge",
        "train_random_forest",
        "select_best",
        "evaluate",
    ]
    by_name = {s.name: s for s in dag}
    assert by_name["train_ridge"] == Step("train_ridge", "train", ("model=ridge",), ("prepare",))
    assert by_name["select_best"].parents == ("train_ridge", "train_random_forest")
    assert by_name["evaluate"].parents == ("select_best",)


def test_cache_key_follows_config_inputs_and_code(tmp_path: Path) -> None:
    base = load_settings(["model=ridge"], CONF, tmp_path)
    other = load_settings(["model=ridge", "model.params.alpha=2"], CONF, tmp_path)
    step = Step("train_ridge", "train", ("model=ridge",), ("prepare",))
    key = cache_key(step, base, {"data/processed/train.csv": "a"}, "code")
    assert key == cache_key(step, base, {"data/processed/train.csv": "a"}, "code")
    assert key != cache_key(step, other, {"data/processed/train.csv": "a"}, "code")
    assert key != cache_key(step, base, {"data/processed/train.csv": "b"}, "code")
    assert key != cache_key(step, base, {"data/processed/train.csv": "a"}, "code2")
    # a section the train stage does not read does not matter
    unrelated = load_settings(["model=ridge", "selection.metric=val/rmse"], CONF, tmp_path)
    assert key == cache_key(step, unrelated, {"data/processed/train.csv": "a"}, "code")


def test_step_cache_needs_matching_key_and_intact_outputs(tmp_path: Path) -> None:
    out = tmp_path / "models" / "m.joblib"
    out.parent.mkdir()
    out.write_bytes(b"model")
    cache = StepCache(tmp_path / "metrics" / "pipeline_cache.json")
    outputs = pipeline.hash_files([out], tmp_path)
    cache.store("train_m", "k1", outputs, "run-1")
    assert cache.lookup("train_m", "k1", ["models/m.joblib"], tmp_path) == outputs
    assert cache.lookup("train_m", "k2", ["models/m.joblib"], tmp_path) == {}
    assert cache.lookup("train_m", "k1", ["models/m.joblib", "x"], tmp_path) == {}
    out.write_bytes(b"tampered")
    assert cache.lookup("train_m", "k1", ["models/m.joblib"], tmp_path) == {}
    (tmp_path / "metrics" / "pipeline_cache.json").write_text("{not json")
    assert cache.entry("train_m") is None  # a corrupt index is an empty one


def test_verify_files_rejects_a_changed_input(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("a\n1\n")
    recorded = pipeline.hash_files([data], tmp_path)
    pipeline.verify_files(recorded, tmp_path)
    data.write_text("a\n2\n")
    with pytest.raises(ArtifactError, match=r"data\.csv: sha256"):
        pipeline.verify_files(recorded, tmp_path)


def test_cache_setting_must_be_boolean(tmp_path: Path) -> None:
    assert pipeline.cache_enabled(load_settings([], CONF, tmp_path)) is True
    off = load_settings(["++clearml.pipeline.cache=false"], CONF, tmp_path)
    assert pipeline.cache_enabled(off) is False
    bad = load_settings(["++clearml.pipeline.cache=maybe"], CONF, tmp_path)
    with pytest.raises(HousingError, match=r"clearml\.pipeline\.cache"):
        pipeline.cache_enabled(bad)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.integration
def test_offline_pipeline_parallel_cached_and_equal_to_sequential(
    tmp_path: Path, conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from housing.runner import run_all
    from housing.tracking.offline import list_sessions

    overrides = ["tracking=clearml", FAST]
    par = tmp_path / "parallel"
    result = run_pipeline(overrides, conf, root=par, max_workers=2)
    assert result.status == "succeeded" and result.executor == "local"
    assert result.cached_steps == []

    events = _events(par, result.run_id)
    final = _final(events)
    steps = ["prepare", "train_linear_regression", "train_ridge", "train_random_forest"]
    steps += ["select_best", "evaluate"]
    assert all(final[s]["status"] == "succeeded" for s in steps)
    # the train steps ran at the same time, each in its own process
    trains = [final[s] for s in steps[1:4]]
    overlapping = [
        (a["stage"], b["stage"])
        for i, a in enumerate(trains)
        for b in trains[i + 1 :]
        if _ts(a["started_at"]) < _ts(b["finished_at"])
        and _ts(b["started_at"]) < _ts(a["finished_at"])
    ]
    assert overlapping, f"train steps did not overlap: {trains}"
    assert len({final[s]["pid"] for s in steps}) == len(steps)
    summary = final["pipeline"]
    assert summary["status"] == "succeeded"
    assert summary["best_model"] == result.best_model
    assert summary["test_rmse"] == pytest.approx(result.test_rmse)

    # one ClearML offline session per step
    sessions = list_sessions(par / ".clearml")
    assert sorted(s.name for s in sessions) == sorted(f"housing:{s}" for s in steps)
    assert all(s.closed and not s.failed for s in sessions)
    assert {s.properties.get("pipeline_run_id") for s in sessions} == {result.run_id}

    # the same outputs as the sequential in-process run
    seq = tmp_path / "sequential"
    seq.mkdir()
    monkeypatch.chdir(seq)
    run_all(overrides, conf)
    for name in ("linear_regression", "ridge", "random_forest"):
        assert _train_metrics(par, name) == pytest.approx(_train_metrics(seq, name), rel=1e-12)
    for file in ("train_metrics.json", "test_metrics.json"):
        got = json.loads((par / "metrics" / file).read_text())
        want = json.loads((seq / "metrics" / file).read_text())
        if file == "test_metrics.json":
            assert got["metrics"] == pytest.approx(want["metrics"], rel=1e-12)
        assert got.get("best_model", got.get("model")) == want.get("best_model", want.get("model"))
    assert (par / "models" / "best_model.joblib").is_file()

    # nothing changed: every step is cached, and fast
    t0 = time.monotonic()
    again = run_pipeline(overrides, conf, root=par, max_workers=2)
    assert time.monotonic() - t0 < 10
    assert again.cached_steps == steps and again.executed_steps == []
    assert (again.best_model, again.test_rmse) == (result.best_model, result.test_rmse)
    cached_events = _final(_events(par, again.run_id))
    assert all(cached_events[s]["cached"] is True for s in steps)
    assert len(list_sessions(par / ".clearml")) == len(steps)  # no new tracking

    # ridge's alpha changes: only train_ridge and what depends on it rerun
    ridge = conf / "model" / "ridge.yaml"
    ridge.write_text(ridge.read_text().replace("alpha: 1.0", "alpha: 3.0"))
    third = run_pipeline(overrides, conf, root=par, max_workers=2)
    assert third.executed_steps == ["train_ridge", "select_best", "evaluate"]
    assert third.cached_steps == ["prepare", "train_linear_regression", "train_random_forest"]
    ridge_record = json.loads((par / "metrics" / "train_ridge.json").read_text())
    assert ridge_record["params"] == {"alpha": 3.0}


def test_no_cache_reruns_everything(tmp_path: Path, conf: Path) -> None:
    overrides = ["tracking=none", "selection.candidates=[linear_regression]"]
    first = run_pipeline(overrides, conf, root=tmp_path / "r")
    assert first.cached_steps == []
    second = run_pipeline(overrides, conf, root=tmp_path / "r", use_cache=False)
    assert second.cached_steps == [] and len(second.executed_steps) == 4
    third = run_pipeline([*overrides, "++clearml.pipeline.cache=false"], conf, root=tmp_path / "r")
    assert third.cached_steps == []
    fourth = run_pipeline(overrides, conf, root=tmp_path / "r")
    assert len(fourth.cached_steps) == 4


def test_failing_train_step_stops_its_dependents(
    tmp_path: Path,
    conf: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ridge with solver=lbfgs passes config validation and fails inside fit().
    ridge = conf / "model" / "ridge.yaml"
    ridge.write_text(ridge.read_text() + "  solver: lbfgs\n")
    root = tmp_path / "r"
    best = root / "models" / "best_model.joblib"
    best.parent.mkdir(parents=True)
    best.write_bytes(b"the previous best model")
    overrides = ["tracking=none", "selection.candidates=[linear_regression,ridge]"]

    with pytest.raises(PipelineError) as caught:
        run_pipeline(overrides, conf, root=root)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("pipeline step train_ridge failed: ")
    assert "lbfgs" in message
    assert caught.value.step == "train_ridge"

    runs = {e["run_id"] for e in read_events(root / "metrics" / "pipeline_events.jsonl")}
    (run_id,) = runs
    final = _final(_events(root, run_id))
    assert final["train_ridge"]["status"] == "failed"
    assert "lbfgs" in final["train_ridge"]["error"]
    assert final["train_linear_regression"]["status"] == "succeeded"
    assert "select_best" not in final and "evaluate" not in final
    assert final["pipeline"]["status"] == "failed"
    assert "train_ridge" in final["pipeline"]["error"]
    assert final["pipeline"]["skipped_steps"] == ["select_best", "evaluate"]
    notes = (root / "reports" / "pipeline_notifications.log").read_text()
    assert any("train_ridge" in line and "FAILED" in line for line in notes.splitlines())
    assert best.read_bytes() == b"the previous best model"
    assert not (root / "metrics" / "train_metrics.json").exists()

    # the script entry point: one error line, non-zero exit
    monkeypatch.chdir(root)
    code = main(["pipeline", "-q", "--config-dir", str(conf), *overrides])
    assert code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: pipeline step train_ridge failed:")

    # allow_missing: select_best and evaluate run on the candidates that succeeded
    result = run_pipeline([*overrides, "selection.allow_missing=true"], conf, root=root)
    assert result.status == "succeeded"
    assert result.failed_steps == ["train_ridge"]
    assert result.best_model == "linear_regression"
    summary = json.loads((root / "metrics" / "train_metrics.json").read_text())
    assert list(summary["candidates"]) == ["linear_regression"]
    assert best.read_bytes() != b"the previous best model"


@pytest.mark.slow
@pytest.mark.integration
def test_with_mlflow_the_first_step_to_run_runs_alone(tmp_path: Path, conf: Path) -> None:
    """prepare cached, both trains rerun: one starts after the other made the MLflow parent."""
    from mlflow.tracking import MlflowClient

    root = tmp_path / "r"
    candidates = "selection.candidates=[linear_regression,ridge]"
    run_pipeline(["tracking=none", candidates], conf, root=root, max_workers=2)
    overrides = ["tracking=mlflow", candidates, "train.cv_folds=3"]
    second = run_pipeline(overrides, conf, root=root, max_workers=2)
    assert second.cached_steps == ["prepare"]
    final = _final(_events(root, second.run_id))
    first, other = sorted(
        (final["train_linear_regression"], final["train_ridge"]), key=lambda e: e["started_at"]
    )
    assert _ts(first["finished_at"]) <= _ts(other["started_at"])
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("housing")
    assert experiment is not None
    parents = client.search_runs(
        [experiment.experiment_id],
        f"tags.\"housing.pipeline_run_id\" = '{second.run_id}' "
        "and tags.\"housing.run_type\" = 'pipeline'",
    )
    assert len(parents) == 1
