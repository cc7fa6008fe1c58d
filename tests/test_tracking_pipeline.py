"""The pipeline with MLflow and ClearML (offline) on: what each tracker recorded,
read back, equals the metrics files; champions are gated; no secret is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from housing.tracking.mlflow import version_record
from housing.tracking.offline import list_sessions, read_artifacts, read_models, read_scalars
from tests.helpers import run_all

from .conftest import CONF, metrics_records

SECRET = "SENTINEL-secret-7f3a9c"
ACCESS = "SENTINEL-access-51bd02"
WEBHOOK = "http://127.0.0.1:9/hooks/SENTINEL-webhook-token-c0ffee"
CANDIDATES = ["linear_regression", "ridge", "random_forest"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two tracked pipeline runs: a good one, then a worse one (linear only)."""
    root = tmp_path_factory.mktemp("tracked")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("CLEARML_API_SECRET_KEY", SECRET)
    mp.setenv("CLEARML_API_ACCESS_KEY", ACCESS)
    mp.setenv("HOUSING_WEBHOOK_URL", WEBHOOK)
    common = [
        "tracking=both",
        "clearml.mode=offline",
        "notifications.webhook={url_env: HOUSING_WEBHOOK_URL, timeout_sec: 0.5, retries: 0}",
    ]
    try:
        mp.setenv("HOUSING_RUN_ID", "run-good")
        first = run_all([*common, f"selection.candidates=[{','.join(CANDIDATES)}]"], CONF)
        metrics = metrics_records(root / "metrics")
        mp.setenv("HOUSING_RUN_ID", "run-worse")
        second = run_all([*common, "selection.candidates=[linear_regression]"], CONF)
    finally:
        mp.undo()
    return {"root": root, "first": first, "second": second, "metrics": metrics}


def _sessions_by_name(root: Path) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for session in list_sessions(root / ".clearml"):
        found.setdefault(session.name, []).append(session)
    for sessions in found.values():
        sessions.sort(key=lambda s: s.created)
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_every_stage_is_a_clearml_offline_task(runs: dict[str, Any]) -> None:
    sessions = _sessions_by_name(runs["root"])
    expected = {"prepare", "select_best", "evaluate", *(f"train_{c}" for c in CANDIDATES)}
    assert set(sessions) == {f"housing:{name}" for name in expected}
    assert len(sessions["housing:train_linear_regression"]) == 2
    assert all(s.closed for group in sessions.values() for s in group)
    prepare = sessions["housing:prepare"][0]
    assert "housing" in prepare.tags and prepare.project == "housing"


@pytest.mark.slow
@pytest.mark.integration
def test_clearml_scalars_params_artifacts_and_models_match_the_files(
    runs: dict[str, Any],
) -> None:
    sessions = _sessions_by_name(runs["root"])
    for name in CANDIDATES:
        session = sessions[f"housing:train_{name}"][0]
        record = runs["metrics"][f"train_{name}.json"]
        scalars = read_scalars(session)
        for key, value in record["metrics"].items():
            assert scalars[key] == pytest.approx(value, rel=1e-9), (name, key)
        assert "train_params" in json.dumps(session.task.get("hyperparams", {}))
        assert any(k.startswith(f"train_{name}") for k in read_artifacts(session))
        models = read_models(session)
        assert [m.name for m in models] == [f"housing-{name}"]
        assert models[0].weights_path is not None and models[0].weights_path.is_file()
    evaluate = sessions["housing:evaluate"][0]
    test = runs["metrics"]["test_metrics.json"]["metrics"]
    assert read_scalars(evaluate)["test/rmse"] == pytest.approx(test["test/rmse"])
    best = read_models(sessions["housing:select_best"][0])
    assert [m.name for m in best] == ["housing-best"]


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_runs_nest_and_match_the_files(runs: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("housing")
    assert experiment is not None
    children = client.search_runs(
        [experiment.experiment_id], "tags.`housing.pipeline_run_id` = 'run-good'"
    )
    stages = {r.data.tags.get("mlflow.runName"): r for r in children}
    parents = {r.data.tags.get("mlflow.parentRunId") for r in children} - {None}
    assert len(parents) == 1
    for name in CANDIDATES:
        run = stages[f"train_{name}"]
        record = runs["metrics"][f"train_{name}.json"]
        for key, value in record["metrics"].items():
            assert run.data.metrics[key] == pytest.approx(value, rel=1e-9)
    versions = client.search_model_versions("name = 'housing-best'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    v1 = client.get_model_version("housing-best", "1")
    assert set(v1.tags) == {"algorithm", "data_md5", "git_commit", "champion"}
    record = version_record(client, v1)
    for key in ("data_md5", "git_commit", "config_hash", "model_sha256", "created_at"):
        assert record.get(key), key


@pytest.mark.slow
@pytest.mark.integration
def test_a_worse_model_never_becomes_champion(runs: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    first, second = runs["first"]["select_best"], runs["second"]["select_best"]
    assert second.best_value > first.best_value  # linear regression is worse on CV rmse
    client = MlflowClient(tracking_uri=f"sqlite:///{runs['root'] / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("housing-best", "champion")
    assert str(champion.version) == "1"
    rejected = client.get_model_version("housing-best", "2")
    assert rejected.tags["champion"] == "rejected"
    assert version_record(client, rejected)["champion.decision"] == "rejected"
    ledger = json.loads((runs["root"] / ".clearml" / "champions.json").read_text())
    best = ledger["housing-best"]
    assert best["version"] == "1"
    assert [h["promoted"] for h in best["history"]] == [True, False]
    assert best["history"][1]["champion_version"] == "1"


@pytest.mark.slow
@pytest.mark.integration
def test_no_secret_is_written_anywhere(runs: dict[str, Any]) -> None:
    leaks = []
    for path in runs["root"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in (SECRET, ACCESS, "SENTINEL-webhook-token"):
                if needle.encode() in data:
                    leaks.append(f"{path}: {needle}")
    assert leaks == []
    events = (runs["root"] / "metrics" / "pipeline_events.jsonl").read_text()
    assert "run-good" in events and "run-worse" in events
