"""train: fit one candidate Pipeline, score it (train, holdout val, k-fold CV), save it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing import drift, io
from housing.data import schema
from housing.data.split import split_frame
from housing.errors import DataError, first_line
from housing.evaluation import feature_importances, regression_metrics
from housing.models import build_pipeline
from housing.monitoring import Progress

if TYPE_CHECKING:
    import pandas as pd

    from housing.config import ModelSettings, Settings, TrainSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitOutcome:
    """A fitted Pipeline and how it scored; produced in memory, written by ``run``."""

    pipeline: Any
    metrics: dict[str, float]
    cv_folds: int
    n_train: int
    n_val: int
    features: list[str]
    importances: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    """The train stage's record: what was fitted, how it scored, where it went."""

    model_name: str
    estimator: str
    params: dict[str, Any]
    metrics: dict[str, float]
    model_path: Path
    metrics_path: Path
    model_sha256: str
    record: dict[str, Any]  # the meta record plus the counts and ``metrics``
    meta_path: Path


def cross_validate_rmse(
    pipeline: Any,
    x: pd.DataFrame,
    y: pd.Series,
    folds: int,
    random_state: int,
    *,
    on_fold: Callable[[int, float], None] | None = None,
) -> tuple[float, float]:
    """Mean and std of RMSE over shuffled k folds (NaN, NaN when ``folds`` is 0).

    A fold that ends more than 2 s after the start logs a progress line; ``on_fold`` gets
    each fold's index and RMSE as it ends (``housing tune`` prunes a trial from it).
    """
    import numpy as np
    from sklearn.base import clone
    from sklearn.model_selection import KFold

    if folds == 0:
        return float("nan"), float("nan")
    scores = []
    progress = Progress(log, "  cv fold", folds)
    for fold, (tr, va) in enumerate(KFold(folds, shuffle=True, random_state=random_state).split(x)):
        model = fit_deterministic(clone(pipeline), x.iloc[tr], y.iloc[tr])
        pred = model.predict(x.iloc[va])
        scores.append(float(np.sqrt(np.mean((pred - y.iloc[va].to_numpy()) ** 2))))
        progress(fold + 1, f": rmse {scores[-1]:.3f}")
        if on_fold is not None:
            on_fold(fold, scores[-1])
    return float(np.mean(scores)), float(np.std(scores))


def fit_deterministic(pipeline: Any, x: pd.DataFrame, y: pd.Series) -> Any:
    """Fit (threads allowed), then predict single-threaded.

    Forests average their trees' predictions in thread-completion order, so a
    multi-threaded ``predict`` differs in the last bits from run to run.
    """
    pipeline.fit(x, y)
    model = pipeline.named_steps["model"]
    if "n_jobs" in model.get_params():
        model.set_params(n_jobs=1)
    return pipeline


def fit_and_score(
    train: pd.DataFrame, target: str, model: ModelSettings, cfg: TrainSettings
) -> FitOutcome:
    """Fit on train minus holdout, score train/val, CV on the whole split, refit."""
    from sklearn.base import clone

    features = [c for c in train.columns if c != target]
    if not features:
        raise DataError(f"train split has no feature columns besides the target {target!r}")
    pipeline = build_pipeline(
        model.estimator, model.params, features, scale=model.scale, n_jobs=cfg.n_jobs
    )
    fit_part, val_part = split_frame(train, cfg.val_size, cfg.random_state)
    x_fit, y_fit = fit_part[features], fit_part[target]
    x_val, y_val = val_part[features], val_part[target]

    folds = cfg.folds_for(len(train))
    if folds > len(train):
        raise DataError(f"train split has {len(train)} rows, fewer than train.cv_folds={folds}")

    holdout = clone(pipeline)
    t0 = time.perf_counter()
    fit_deterministic(holdout, x_fit, y_fit)
    fit_seconds = time.perf_counter() - t0
    metrics = regression_metrics(y_fit.to_numpy(), holdout.predict(x_fit), "train")
    metrics |= regression_metrics(y_val.to_numpy(), holdout.predict(x_val), "val")
    cv_mean, cv_std = cross_validate_rmse(
        pipeline, train[features], train[target], folds, cfg.random_state
    )
    metrics["cv/rmse_mean"] = cv_mean
    metrics["cv/rmse_std"] = cv_std

    final = holdout
    if cfg.refit_full:
        final = clone(pipeline)
        t0 = time.perf_counter()
        fit_deterministic(final, train[features], train[target])
        fit_seconds = time.perf_counter() - t0
    metrics["train/fit_seconds"] = fit_seconds
    return FitOutcome(
        pipeline=final,
        metrics=metrics,
        cv_folds=folds,
        n_train=len(fit_part),
        n_val=len(val_part),
        features=features,
        importances=feature_importances(final, features),
    )


def read_split(path: Path) -> pd.DataFrame:
    """Read a processed split written by prepare."""
    import pandas as pd

    if not path.is_file():
        raise DataError(f"{path}: not found (run the prepare stage first)")
    try:
        return pd.read_csv(path, dtype="float64", engine="c")
    except (ValueError, pd.errors.ParserError) as exc:
        message = f"{path}: not a numeric table written by prepare ({first_line(exc)})"
        raise DataError(message) from None


def run(settings: Settings) -> TrainResult:
    """Train ``settings.model`` and write ``models/<name>.joblib`` + its metrics JSON."""
    paths = settings.paths
    # Validate the estimator config (and its large-table profile) before reading any data.
    for candidate in (settings.model, settings.model.large_profile()):
        build_pipeline(candidate.estimator, candidate.params, ["x"], scale=candidate.scale)
    train = read_split(paths.train)
    target = settings.data.target
    if target not in train.columns:
        raise DataError(f"{paths.train}: target column {target!r} not found (data.target)")
    schema.check_split(train, (), target, str(paths.train), "rerun prepare (dvc repro)")
    large = len(train) > settings.train.large_table_rows
    model = settings.model.large_profile() if large else settings.model
    if large:
        log.warning("train %s: %s", model.name, large_table_line(settings, len(train)))
    outcome = fit_and_score(train, target, model, settings.train)

    model_path = paths.model(model.name)
    sha = io.save_model(model_path, outcome.pipeline)
    fingerprint = _read_fingerprint(paths.fingerprint)
    data_md5 = fingerprint.get("raw", {}).get("md5")
    reference = drift.profile(
        train,
        outcome.features,
        bins=settings.drift.bins,
        sample_size=settings.drift.sample_size,
        seed=settings.train.random_state,
        model_sha256=sha,
        data_md5=data_md5,
    )
    profile_path = drift.profile_path(model_path)
    profile_sha = drift.write_profile(profile_path, reference)
    counts = {
        "large_table": int(large),
        "cv_folds": outcome.cv_folds,
        "n_train": outcome.n_train,
        "n_val": outcome.n_val,
        "n_train_full": len(train),
    }
    meta: dict[str, Any] = {
        "model": model.name,
        "estimator": model.estimator,
        "params": dict(model.params),
        "profile": "large" if large else "default",
        "scale": model.scale,
        "refit_full": settings.train.refit_full,
        "features": outcome.features,
        "feature_importances": outcome.importances,
        "model_path": io.project_path(model_path, settings.root),
        "model_sha256": sha,
        "data_md5": data_md5,
        "train_md5": io.file_md5(paths.train),
        "reference_profile": io.project_path(profile_path, settings.root),
        "reference_profile_sha256": profile_sha,
    }
    metrics_path = paths.train_metrics(model.name)
    io.write_scores(metrics_path, {**outcome.metrics, **counts})
    io.write_json(paths.meta(metrics_path), meta)
    record = {**meta, **counts, "metrics": outcome.metrics}
    m = outcome.metrics
    log.info(
        "train %s: val/rmse=%.3f cv/rmse_mean=%.3f (%d folds) fit %.2fs -> %s",
        model.name,
        m["val/rmse"],
        m["cv/rmse_mean"],
        outcome.cv_folds,
        m["train/fit_seconds"],
        record["model_path"],
    )
    return TrainResult(
        model_name=model.name,
        estimator=model.estimator,
        params=dict(model.params),
        metrics=outcome.metrics,
        model_path=model_path,
        metrics_path=metrics_path,
        model_sha256=sha,
        record=record,
        meta_path=paths.meta(metrics_path),
    )


def large_table_line(settings: Settings, n_rows: int) -> str:
    """The one line saying what a large train split changes (profile and CV folds)."""
    cfg, base = settings.train, settings.model
    large = base.large_profile()
    changes = []
    if large is not base:
        params = ", ".join(f"{k}={v}" for k, v in large.params.items() if k != "random_state")
        changes.append(f"{large.estimator}({params}) (model.large)")
    folds = cfg.folds_for(n_rows)
    if folds != cfg.cv_folds:
        changes.append(f"{folds}-fold CV (train.cv_folds_large)")
    what = ", ".join(changes) or "no change (no model.large, train.cv_folds_large: null)"
    limit = f"train.large_table_rows={cfg.large_table_rows}"
    return f"{n_rows} rows > {limit}: large-table profile: {what}"


def _read_fingerprint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = io.read_json(path)
    return data if isinstance(data, dict) else {}
