"""evaluate: score the selected model on the test split; write metrics and plot data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing import io
from housing.data import schema
from housing.errors import DataError
from housing.evaluation import feature_importances, prediction_table, regression_metrics
from housing.stages.train import read_split

if TYPE_CHECKING:
    import pandas as pd

    from housing.config import Paths, Settings

log = logging.getLogger(__name__)

#: The keys of ``metrics.json`` (``test/<key>`` in ``metrics/test_metrics.json``), kept
#: short so that ``dvc metrics show`` fits in 40 columns.
SUMMARY_METRICS = ("rmse", "mae", "r2")


@dataclass(frozen=True)
class EvaluationResult:
    """Test metrics of the selected model and where the plot data went."""

    model_name: str
    metrics: dict[str, float]
    metrics_path: Path  # metrics/test_metrics.json: ``test/<metric>`` and ``n_test``
    predictions_path: Path
    predictions: pd.DataFrame
    importances: dict[str, float]
    comparison: pd.DataFrame  # one row per candidate: val, CV and test metrics
    comparison_path: Path
    meta_path: Path  # metrics/test_metrics.meta.json: model, sha256, candidates' test scores


def evaluate_model(
    pipeline: Any, test: pd.DataFrame, target: str, origin: str = "test split"
) -> tuple[dict[str, float], pd.DataFrame]:
    """Test metrics and the predicted-vs-actual table of a fitted Pipeline."""
    if target not in test.columns:
        raise DataError(f"{origin}: target column {target!r} not found (data.target)")
    features = [str(f) for f in getattr(pipeline, "feature_names_in_", ())]
    schema.check_split(test, features, target, origin, "rerun the pipeline (dvc repro)")
    x = test.drop(columns=[target])
    y = test[target].to_numpy()
    pred = pipeline.predict(x)
    return regression_metrics(y, pred, "test"), prediction_table(y, pred)


def run(settings: Settings) -> EvaluationResult:
    """Evaluate ``models/best_model.joblib`` (sha256-checked) on the test split."""
    import pandas as pd

    paths = settings.paths
    summary = io.read_record(paths.meta(paths.train_summary))
    pipeline = io.load_model(paths.best_model, summary.get("best_model_sha256"))
    test = read_split(paths.test)
    metrics, table = evaluate_model(pipeline, test, settings.data.target, str(paths.test))
    features = [c for c in test.columns if c != settings.data.target]
    importances = feature_importances(pipeline, features)

    io.write_csv(paths.predictions, table)
    ranked = sorted(importances.items(), key=lambda kv: kv[1], reverse=True)
    imp = pd.DataFrame(ranked, columns=["feature", "importance"])
    io.write_csv(paths.importances, imp)
    comparison = compare_candidates(settings, summary, test)
    io.write_csv(paths.comparison, comparison)
    meta = {
        "model": summary["best_model"],
        "model_sha256": summary["best_model_sha256"],
        "candidates": {
            row["model"]: {f"test/{m}": row[f"test/{m}"] for m in SUMMARY_METRICS}
            for row in comparison.to_dict("records")
        },
    }
    io.write_scores(paths.test_metrics, {**metrics, "n_test": len(test)})
    io.write_json(paths.meta(paths.test_metrics), meta)
    io.write_scores(paths.test_summary, {m: metrics[f"test/{m}"] for m in SUMMARY_METRICS})
    scores = " ".join(f"test/{m}={metrics[f'test/{m}']:.3f}" for m in SUMMARY_METRICS)
    log.info("evaluate %s: %s", summary["best_model"], scores)
    return EvaluationResult(
        model_name=summary["best_model"],
        metrics=metrics,
        metrics_path=paths.test_metrics,
        predictions_path=paths.predictions,
        predictions=table,
        importances=importances,
        comparison=comparison,
        comparison_path=paths.comparison,
        meta_path=paths.meta(paths.test_metrics),
    )


def compare_candidates(
    settings: Settings, summary: dict[str, Any], test: pd.DataFrame
) -> pd.DataFrame:
    """Val, CV and test metrics of every candidate select_best saw (sha256-checked loads).

    Test scores are for reporting only: the selection was made on validation data.
    """
    import pandas as pd

    rows, origin = [], str(settings.paths.test)
    for name, cand in summary["candidates"].items():
        model = io.load_model(settings.paths.model(name), cand.get("model_sha256"))
        test_metrics, _ = evaluate_model(model, test, settings.data.target, origin)
        train_metrics = cand["metrics"]
        rows.append(
            {
                "model": name,
                "best": name == summary["best_model"],
                "val/rmse": train_metrics["val/rmse"],
                "cv/rmse_mean": train_metrics["cv/rmse_mean"],
                **test_metrics,
            }
        )
    return pd.DataFrame(rows)


def read_outcome(paths: Paths) -> tuple[str, dict[str, float]]:
    """The selected model's name and its test scores (``test/<metric>``, ``n_test``)."""
    scores = io.read_scores(paths.test_metrics)
    return str(io.read_record(paths.meta(paths.test_metrics))["model"]), scores
