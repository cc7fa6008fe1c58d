"""Stage functions end to end in a temporary root, and their failure contracts."""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from housing import io
from housing.cli import main
from housing.errors import ArtifactError, ConfigError, DataError
from housing.stages import evaluate, prepare, select_best, train
from housing.stages.select_best import choose_best
from tests.helpers import run_all

from .conftest import CONF, SettingsFactory, csv_overrides, settings_at, table_120

FAST = ["selection.candidates=[linear_regression,ridge]"]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): io.file_sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "input" not in p.parts
    }


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root where prepare and both FAST candidates ran once on the small CSV (each test
    of ``trained`` gets its own copy: the outputs hold only root-relative paths)."""
    root = tmp_path_factory.mktemp("trained")
    csv = root / "input" / "houses.csv"
    csv.parent.mkdir()
    table_120().to_csv(csv, index=False)
    base = csv_overrides(csv, *FAST)
    prepare.run(settings_at(root, base))
    for name in ("linear_regression", "ridge"):
        train.run(settings_at(root, [*base, f"model={name}"]))
    return root


@pytest.fixture
def trained(
    trained_template: Path, make_settings: SettingsFactory, csv_file: Path, tmp_path: Path
) -> SettingsFactory:
    """A root where prepare and both FAST candidates have run on the small CSV."""
    shutil.copytree(
        trained_template, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("input")
    )
    base = csv_overrides(csv_file, *FAST)

    def factory(extra: list[str] | tuple[str, ...] = ()) -> object:
        return make_settings([*base, *extra])

    return factory  # type: ignore[return-value]


def test_stages_chain_and_return_their_records(trained: SettingsFactory) -> None:
    settings = trained()
    chosen = select_best.run(settings)
    assert chosen.best_model in {"linear_regression", "ridge"}
    assert set(chosen.candidates) == {"linear_regression", "ridge"}
    numbers = json.loads(settings.paths.train_summary.read_text())
    summary = json.loads(settings.paths.meta(settings.paths.train_summary).read_text())
    assert summary["best_model"] == chosen.best_model
    assert summary["best_model_sha256"] == io.file_sha256(settings.paths.best_model)
    scores = {n: c["metrics"]["cv/rmse_mean"] for n, c in summary["candidates"].items()}
    assert numbers["selection/best_value"] == min(scores.values())
    assert numbers == {**chosen.metrics, "selection/best_value": chosen.best_value}

    result = evaluate.run(settings)
    on_disk = json.loads(settings.paths.test_metrics.read_text())
    assert on_disk == {**result.metrics, "n_test": 24}
    meta = json.loads(settings.paths.meta(settings.paths.test_metrics).read_text())
    assert meta["model"] == chosen.best_model
    assert set(meta["candidates"]) == {"linear_regression", "ridge"}
    assert json.loads(settings.paths.test_summary.read_text()) == {
        "rmse": result.metrics["test/rmse"],
        "mae": result.metrics["test/mae"],
        "r2": result.metrics["test/r2"],
    }
    assert set(result.metrics) == {"test/rmse", "test/mae", "test/r2"}
    assert result.metrics["test/r2"] > 0.9  # a nearly linear table
    table = pd.read_csv(settings.paths.predictions)
    assert list(table.columns) == ["actual", "predicted", "residual"]
    assert len(table) == 24  # test_size 0.2 of 120 rows


def test_train_record_has_every_metric(trained: SettingsFactory) -> None:
    settings = trained()
    path = settings.paths.train_metrics("ridge")
    record = json.loads(path.read_text())
    for key in ("train/rmse", "train/mae", "train/r2", "val/rmse", "val/mae", "val/r2",
                "cv/rmse_mean", "cv/rmse_std", "train/fit_seconds"):  # fmt: skip
        assert math.isfinite(record[key]), key
    assert record["cv_folds"] == 5
    assert record["n_train"] + record["n_val"] == record["n_train_full"] == 96
    assert all(type(v) in (int, float) for v in record.values())  # numbers only
    meta = json.loads(settings.paths.meta(path).read_text())
    assert meta["model_sha256"] == io.file_sha256(settings.paths.model("ridge"))
    assert meta["params"] == {"alpha": 1.0}
    assert meta["model_path"] == "models/ridge.joblib"


def test_train_without_prepare_says_what_to_run(make_settings: SettingsFactory) -> None:
    with pytest.raises(DataError, match="run the prepare stage first"):
        train.run(make_settings(["model=ridge"]))


def test_unknown_estimator_param_is_named_before_reading_data(
    make_settings: SettingsFactory,
) -> None:
    with pytest.raises(ConfigError, match=r"model.params.alpah: not a parameter of Ridge"):
        train.run(make_settings(["model=ridge", "+model.params.alpah=2"]))


def test_failed_train_keeps_the_previous_model(trained: SettingsFactory) -> None:
    settings = trained(["model=ridge"])
    before = _tree_digest(settings.root)
    settings.paths.train.write_text("a,b,c,price\n1,x,3,4\n")
    with pytest.raises(DataError, match=r"train\.csv: not a numeric table"):
        train.run(settings)
    after = _tree_digest(settings.root)
    del before["data/processed/train.csv"], after["data/processed/train.csv"]
    assert after == before
    assert not list(settings.root.rglob("*.tmp"))


def test_failed_prepare_keeps_the_previous_split(
    trained: SettingsFactory, make_settings: SettingsFactory, tmp_path: Path
) -> None:
    before = _tree_digest(tmp_path)
    bad = tmp_path / "input" / "bad.csv"
    bad.write_text("a,b,c,price\n" + "1,2,3,-5\n" * 50)
    with pytest.raises(DataError):
        prepare.run(make_settings(csv_overrides(bad, "+data.schema.columns.price={min: 0}")))
    assert _tree_digest(tmp_path) == before


def test_select_best_requires_every_candidate_unless_allowed(trained: SettingsFactory) -> None:
    with pytest.raises(ArtifactError, match=r"train_random_forest.json: not found"):
        select_best.run(trained(["selection.candidates=[ridge,random_forest]"]))
    allowed = select_best.run(
        trained(["selection.candidates=[ridge,random_forest]", "selection.allow_missing=true"])
    )
    assert allowed.best_model == "ridge"
    assert allowed.missing == ["random_forest"]


def test_select_best_refuses_a_tampered_candidate(trained: SettingsFactory) -> None:
    settings = trained(["selection.candidates=[ridge]"])
    settings.paths.model("ridge").write_bytes(b"not the trained model")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        select_best.run(settings)
    assert not settings.paths.best_model.exists()


def test_select_best_by_r2_prefers_higher(trained: SettingsFactory) -> None:
    settings = trained(["selection.metric=val/r2"])
    result = select_best.run(settings)
    r2 = {n: r["metrics"]["val/r2"] for n, r in result.candidates.items()}
    assert result.best_model == max(r2, key=lambda n: r2[n])
    assert result.greater_is_better


def test_choose_best_rules() -> None:
    order = ["a", "b", "c"]
    assert choose_best({"a": 3.0, "b": 1.0, "c": 2.0}, order, greater_is_better=False) == "b"
    assert choose_best({"a": 3.0, "b": 1.0, "c": 2.0}, order, greater_is_better=True) == "a"
    assert choose_best({"a": 1.0, "b": 1.0}, order, greater_is_better=False) == "a"
    assert choose_best({"a": math.nan, "b": 5.0}, order, greater_is_better=False) == "b"
    with pytest.raises(ArtifactError):
        choose_best({"a": math.nan}, order, greater_is_better=False)


def test_evaluate_refuses_a_swapped_best_model(trained: SettingsFactory) -> None:
    settings = trained()
    select_best.run(settings)
    evaluate.run(settings)
    before = settings.paths.test_metrics.read_bytes()
    marker = settings.root / "unpickled.marker"
    settings.paths.best_model.write_bytes(pickle.dumps(_Booby(str(marker))))
    with pytest.raises(ArtifactError, match="refusing to unpickle"):
        evaluate.run(settings)
    assert not marker.exists()
    assert settings.paths.test_metrics.read_bytes() == before


def test_evaluate_refuses_a_swapped_candidate(trained: SettingsFactory) -> None:
    """The comparison loads every candidate, each checked against its train record."""
    settings = trained()
    select_best.run(settings)
    settings.paths.model("ridge").write_bytes(b"swapped after selection")
    with pytest.raises(ArtifactError, match=r"ridge\.joblib: sha256"):
        evaluate.run(settings)
    assert not settings.paths.test_metrics.exists()


class _Booby:
    """Unpickling this creates a file: proof that a load happened."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "x"))  # type: ignore[return-value]


def test_atomic_path_leaves_target_untouched_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_cli_runs_a_stage_and_reports_data_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--config-dir", str(CONF), "prepare", "tracking=none", "data=csv",
            f"data.path={tmp_path / 'missing.csv'}", "data.target=price"]  # fmt: skip
    assert main(args) == DataError.exit_code
    assert capsys.readouterr().err.startswith("error: ")


def _default_run(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The default pipeline (tracking off) run in ``root``: its results and the train
    metrics without the fit times (the one number allowed to differ between runs)."""
    root.mkdir()
    with contextlib.chdir(root):
        results = run_all(["tracking=none"], config_dir=CONF)
    metrics = {k: dict(v.metrics) for k, v in results.items() if k.startswith("train_")}
    for m in metrics.values():
        m.pop("train/fit_seconds")
    return results, metrics


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One default pipeline run shared by the slow tests below (the costly part)."""
    root = tmp_path_factory.mktemp("default") / "first"
    results, metrics = _default_run(root)
    return root, {"results": results, "metrics": metrics}


@pytest.mark.slow
def test_boston_default_pipeline_meets_the_quality_bar(
    default_run: tuple[Path, dict[str, Any]],
) -> None:
    """Default config: the selected model's test RMSE is below 3.0."""
    root, run = default_run
    results = run["results"]
    assert results["evaluate"].metrics["test/rmse"] < 3.0
    assert results["select_best"].best_model in results["select_best"].candidates
    fingerprint = json.loads((root / "metrics/data_fingerprint.json").read_text())
    assert fingerprint["raw"]["rows"] == 506
    assert (fingerprint["train"]["rows"], fingerprint["test"]["rows"]) == (404, 102)
    ridge = json.loads((root / "metrics/train_ridge.json").read_text())
    assert ridge["val/rmse"] == pytest.approx(4.825, abs=0.001)


@pytest.mark.slow
def test_two_runs_give_identical_metrics_and_predictions(
    default_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A second run in a fresh root gives the first run's numbers and predictions."""
    _, first = default_run
    results, metrics = _default_run(tmp_path / "second")
    assert metrics == first["metrics"]
    assert results["evaluate"].metrics == first["results"]["evaluate"].metrics
    pd.testing.assert_frame_equal(
        results["evaluate"].predictions, first["results"]["evaluate"].predictions
    )
