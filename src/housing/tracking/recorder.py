"""What each stage reports to the trackers: one mapping from stage results to calls.

The same names and numbers go to every active backend and match ``metrics/*.json``.
A tracker that fails is reported once and dropped for the rest of the stage: a
tracking problem never fails a stage or loses its outputs. A full disk under a
tracker's store is the exception: the stage's record would be silently incomplete, so
it ends the stage with the one disk-full line naming the store.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from operator import methodcaller
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing.errors import first_line
from housing.stages.select_best import SELECTION_VALUE
from housing.tracking.base import Figure, ModelVersion, StageRun, Tracker
from housing.tracking.lineage import config_hash, decide_champion, git_commit, redact, utc_now

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.predict import PredictResult
    from housing.runs import RunContext
    from housing.stages.evaluate import EvaluationResult
    from housing.stages.prepare import PrepareResult
    from housing.stages.select_best import SelectionResult
    from housing.stages.train import TrainResult
    from housing.tuning import TuneResult

log = logging.getLogger(__name__)


class TrackerSet:
    """The active trackers of one stage; a call that raises disables that tracker (a
    full disk raises :class:`~housing.io.DiskFullError` instead)."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def each(self, action: str, call: Callable[[Tracker], Any]) -> None:
        from housing.io import disk_full, is_disk_full, written_path

        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:
                if is_disk_full(exc):  # the run would be incomplete: the stage fails
                    self.trackers.remove(tracker)
                    with suppress(Exception):  # it cannot write its status either
                        tracker.close("failed", "disk full")
                    raise disk_full(written_path(exc) or _store_of(tracker)) from None
                # any other tracking failure must not fail the stage
                log.warning(
                    "tracking: %s %s failed (%s); continuing without it for this stage",
                    tracker.backend,
                    action,
                    first_line(exc, 300, typed=True),
                )
                self.trackers.remove(tracker)
                _close_quietly(tracker, "failed", f"tracking error during {action}")

    def close(self, status: str, error: str | None) -> None:
        for tracker in self.trackers:
            _close_quietly(tracker, status, error)


def _store_of(tracker: Tracker) -> Path | None:
    """Where ``tracker`` writes locally: an MLflow sqlite store (the spool's too), or the
    ClearML offline folder; None for a server."""
    from housing.tracking.mlflow import _sqlite_path

    uri = getattr(tracker, "tracking_uri", None)
    if isinstance(uri, str):
        return _sqlite_path(uri)
    folder = getattr(getattr(tracker, "settings", None), "offline_dir", None)
    return folder if isinstance(folder, Path) else None


def _close_quietly(tracker: Tracker, status: str, error: str | None) -> None:
    try:
        tracker.close(status, error)
    except Exception as exc:
        log.warning("tracking: closing %s failed (%s)", tracker.backend, type(exc).__name__)


def build_trackers(settings: Settings) -> list[Tracker]:
    """One tracker per active backend (``tracking.backends``), not yet started.

    Local stores are resolved against the repository (:func:`housing.runs.store_root`),
    so a DVC experiment's temporary copy records into the repository's own stores. A
    damaged local store raises :class:`~housing.tracking.stores.StoreError` before the
    stage works (bad data, not a tracker hiccup), a full disk
    :class:`~housing.io.DiskFullError`; a tracker that cannot be built otherwise is a
    warning and the stage runs without it.
    """
    from housing.io import disk_full, is_disk_full, written_path
    from housing.runs import store_root
    from housing.tracking.stores import check_stores

    check_stores(
        settings, root=store_root(settings.root), offline_dir=_in_store(settings).offline_dir
    )
    trackers: list[Tracker] = []
    for backend in settings.tracking:
        try:
            if backend == "mlflow":  # a server falls back to the local spool
                from housing.tracking.mlflow_spool import open_tracker

                trackers.append(open_tracker(settings))
            elif backend == "clearml":
                from housing.tracking.clearml import ClearMLTracker

                trackers.append(ClearMLTracker(_in_store(settings)))
        except Exception as exc:
            if is_disk_full(exc):  # as in TrackerSet.each: the stage's record would be lost
                raise disk_full(written_path(exc)) from None
            log.warning("tracking: %s unavailable (%s: %s)", backend, type(exc).__name__, exc)
    return trackers


@contextmanager
def tracked(settings: Settings, run: StageRun) -> Iterator[TrackerSet]:
    """Open every active tracker for ``run``; close them completed or failed."""
    tset = TrackerSet(build_trackers(settings))
    try:  # a Ctrl-C / SIGTERM while the runs open closes them too
        tset.each("start", lambda t: t.start(run))
        tset.each("log_config", lambda t: t.log_config(redact(dict(settings.resolved)), "config"))
        yield tset
    except BaseException as exc:
        message = f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}"
        killed = isinstance(exc, KeyboardInterrupt | SystemExit)
        tset.close("killed" if killed else "failed", str(redact(message)))
        raise
    tset.close("completed", None)


def _in_store(settings: Settings) -> Any:
    """ClearML settings whose offline folder is in the repository's store
    (:func:`housing.runs.store_root`) rather than a DVC experiment's temporary copy."""
    from housing.runs import store_root

    folder = settings.clearml.offline_dir
    try:
        moved = store_root(settings.root) / folder.relative_to(settings.root)
    except ValueError:  # an offline_dir outside the project stays where it is
        return settings.clearml
    return settings.clearml.model_copy(update={"offline_dir": moved})


def clearml_env(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """What a process settles at its start-up for the ClearML tracker of ``settings``
    (:func:`housing.tracking.clearml.sdk_env` over ``environ``, default ``os.environ``),
    or ``{}`` when ClearML is not a tracking backend."""
    if "clearml" not in settings.tracking:
        return {}
    from housing.tracking.clearml import sdk_env

    return sdk_env(_in_store(settings), os.environ if environ is None else environ)


@dataclass(frozen=True)
class PendingSync:
    """Work recorded locally that a sync has not sent to its server yet."""

    mlflow_runs: int = 0  # stage runs in the MLflow spool
    clearml_sessions: int = 0  # closed ClearML offline sessions not imported
    problems: tuple[str, ...] = ()  # a local store that could not be read

    def summary(self) -> str | None:
        """One line naming what waits and the command that sends it; None: nothing."""
        if not (self.mlflow_runs or self.clearml_sessions or self.problems):
            return None
        parts = [f"{self.mlflow_runs} MLflow run(s) spooled"] if self.mlflow_runs else []
        if self.clearml_sessions:
            parts.append(f"{self.clearml_sessions} ClearML offline session(s) not synced")
        parts += [f"cannot count: {problem}" for problem in self.problems]
        return "pending sync: " + ", ".join(parts) + "; run `housing sync`"


def pending_sync(settings: Settings) -> PendingSync:
    """What ``housing sync`` would send: MLflow runs spooled for ``mlflow.tracking_uri``
    and closed ClearML offline sessions not yet in ``clearml.server``; read-only."""
    from housing.errors import first_line
    from housing.tracking import mlflow_spool, offline

    runs = sessions = 0
    problems: list[str] = []
    try:
        runs = mlflow_spool.pending(settings)
    except Exception as exc:  # a damaged spool: say so, do not fail the caller
        problems.append(f"{mlflow_spool.spool_dir(settings)}: {first_line(exc, 200)}")
    try:
        sessions = offline.pending_sessions(_in_store(settings))
    except Exception as exc:
        problems.append(f"{_in_store(settings).offline_dir}: {first_line(exc, 200)}")
    return PendingSync(runs, sessions, tuple(problems))


def finish_pipeline(settings: Settings, context: RunContext, status: str) -> None:
    """Close a pipeline run that an engine owns (its MLflow parent run)."""
    for tracker in build_trackers(settings):
        finish = getattr(tracker, "finish_pipeline", None)
        if finish is None:
            continue
        try:
            finish(context.run_id, status)
        except Exception as exc:
            log.warning(
                "tracking: closing the pipeline run in %s failed (%s)", tracker.backend, exc
            )


# ---------------------------------------------------------------------------
# Per-stage records


def record(tset: TrackerSet, stage: str, settings: Settings, result: Any) -> None:
    """Report a stage's result to every tracker."""
    recorder = _RECORDERS.get(stage)
    if recorder is not None:
        recorder(tset, settings, result)


def _report(
    tset: TrackerSet,
    section: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    artifacts: Mapping[Path, str | None],
    *,
    figures: Sequence[Figure] = (),
    text: str | None = None,
) -> None:
    """Log params, metrics, artifacts (path -> name, None: its own), figures and a line."""
    tset.each("log_params", lambda t: t.log_params(params, section))
    tset.each("log_metrics", lambda t: t.log_metrics(metrics))
    for path, name in artifacts.items():
        tset.each("log_artifact", methodcaller("log_artifact", path, name))
    for fig in figures:
        tset.each("log_figure", methodcaller("log_figure", fig))
    if text is not None:
        tset.each("log_text", lambda t: t.log_text(text))


def _lineage(settings: Settings, sha256: str, data_md5: str | None) -> dict[str, str]:
    return {
        "data_md5": data_md5 or "unknown",
        "git_commit": git_commit(settings.root),
        "config_hash": config_hash(settings.resolved),
        "model_sha256": sha256,
        "created_at": utc_now(),
    }


def _example_rows(settings: Settings, rows: int = 5) -> Any:
    """The first ``rows`` of the train split (features and target), or None if unreadable."""
    import pandas as pd

    try:
        return pd.read_csv(settings.paths.train, nrows=rows)
    except (OSError, ValueError) as exc:
        log.debug("no input example for the model (%s)", first_line(exc))
        return None


def _importance_figure(importances: Mapping[str, float], title: str) -> Figure:
    ranked = sorted(importances.items(), key=lambda kv: kv[1], reverse=True)
    x, y = [k for k, _ in ranked], [v for _, v in ranked]
    return Figure("feature_importances", title, "bar", x, y, "feature", "importance")


def _record_prepare(tset: TrackerSet, settings: Settings, result: PrepareResult) -> None:
    fp = result.fingerprint
    params = {
        "data": {
            "name": settings.data.name,
            "source": settings.data.source,
            "target": settings.data.target,
            "drop_columns": list(settings.data.drop_columns),
        },
        "prepare": {
            "test_size": settings.prepare.test_size,
            "random_state": settings.prepare.random_state,
        },
    }
    text = (
        f"prepare: {fp['raw']['rows']} rows -> train {fp['train']['rows']}, "
        f"test {fp['test']['rows']}; raw md5 {fp['raw']['md5']}"
    )
    artifacts = {result.fingerprint_path: "data_fingerprint"}
    _report(tset, "prepare", params, result.metrics, artifacts, text=text)


def _record_train(tset: TrackerSet, settings: Settings, result: TrainResult) -> None:
    rec = result.record
    params = {
        "model": result.model_name,
        "estimator": result.estimator,
        "scale": rec["scale"],
        "params": result.params,
        "train": {
            "val_size": settings.train.val_size,
            "cv_folds": rec["cv_folds"],
            "random_state": settings.train.random_state,
            "refit_full": settings.train.refit_full,
        },
    }
    importances = rec.get("feature_importances")
    title = f"{result.model_name} importances"
    figures = [_importance_figure(importances, title)] if importances else []
    artifacts = dict.fromkeys((result.metrics_path, result.meta_path))
    artifacts |= _profile_artifact(settings, rec)
    _report(tset, "train_params", params, result.metrics, artifacts, figures=figures)
    version = ModelVersion(
        registry_name=f"{_model_name(settings)}-{result.model_name}",
        path=result.model_path,
        algorithm=result.estimator,
        metrics=result.metrics,
        params=result.params,
        metadata=_lineage(settings, result.model_sha256, rec.get("data_md5")),
        tags=("candidate", result.model_name),
        example=_example_rows(settings),
    )
    tset.each("register_model", lambda t: t.register_model(version))


def _record_select(tset: TrackerSet, settings: Settings, result: SelectionResult) -> None:
    margin = settings.registry.min_improvement
    params = {
        "candidates": list(settings.selection.candidates),
        "metric": result.metric,
        "greater_is_better": result.greater_is_better,
        "allow_missing": settings.selection.allow_missing,
        "min_improvement": margin,
    }
    metrics = {**result.metrics, SELECTION_VALUE: result.best_value}
    scores = {n: float(r["metrics"][result.metric]) for n, r in result.candidates.items()}
    title = f"Candidates by {result.metric}"
    figure = Figure(
        "candidates", title, "bar", list(scores), list(scores.values()), "model", result.metric
    )
    artifacts = dict.fromkeys((result.summary_path, result.meta_path))
    artifacts |= _profile_artifact(settings, result.candidates.get(result.best_model, {}))
    _report(
        tset,
        "selection",
        params,
        metrics,
        artifacts,
        figures=[figure],
        text=f"select_best: {result.best_model} wins",
    )
    name = f"{_model_name(settings)}-best"
    version = ModelVersion(
        registry_name=name,
        path=result.best_path,
        algorithm=str(result.summary["best_estimator"]),
        metrics=metrics,
        params=dict(result.summary["best_params"]),
        metadata=_lineage(settings, result.best_sha256, result.summary.get("data_md5")),
        tags=("best", result.best_model),
        example=_example_rows(settings),
    )

    def register_and_gate(t: Tracker) -> None:
        current = t.champion(name, result.metric)
        registered = t.register_model(version)
        decision = decide_champion(
            name,
            registered.version,
            result.best_value,
            current,
            metric=result.metric,
            greater_is_better=result.greater_is_better,
            min_improvement=float(margin),
        )
        t.promote(decision, registered)
        verb = "promoted" if decision.promoted else "kept the champion"
        log.debug("champion (%s): %s: %s", t.backend, verb, decision.reason)
        verdict = "promoted" if decision.promoted else "rejected"
        t.log_text(f"champion decision: {verdict}: {decision.reason}")

    tset.each("register_model", register_and_gate)


def _record_evaluate(tset: TrackerSet, settings: Settings, result: EvaluationResult) -> None:
    table, model = result.predictions, result.model_name
    figures = [
        Figure(
            name="predicted_vs_actual",
            title=f"{model}: predicted vs actual (test)",
            kind="scatter",
            x=table["actual"].tolist(),
            y=table["predicted"].tolist(),
            x_label="actual",
            y_label="predicted",
            diagonal=True,
        ),
        Figure(
            name="residuals",
            title=f"{model}: residuals (test)",
            kind="scatter",
            x=table["predicted"].tolist(),
            y=table["residual"].tolist(),
            x_label="predicted",
            y_label="actual - predicted",
        ),
    ]
    if result.importances:
        figures.append(_importance_figure(result.importances, f"{model} importances"))
    comparison = result.comparison
    models, rmse = comparison["model"].tolist(), comparison["test/rmse"].tolist()
    figures.append(
        Figure(
            "model_comparison", "Test RMSE per candidate", "bar", models, rmse, "model", "test/rmse"
        )
    )
    paths = (result.metrics_path, result.meta_path, result.predictions_path, result.comparison_path)
    _report(
        tset, "evaluate", {"model": model}, result.metrics, dict.fromkeys(paths), figures=figures
    )


def _record_predict(tset: TrackerSet, settings: Settings, result: PredictResult) -> None:
    model = result.model
    params = {
        "model": model.registry_name,
        "version": model.version or "",
        "source": model.source,
        "model_sha256": model.sha256,
        "input": result.record["input"],
        "input_sha256": result.input_sha256,
    }
    text = f"predict: {result.rows} rows with {model.label} in {result.seconds:.2f} s"
    _report(tset, "predict", params, result.metrics, {result.meta_path: None}, text=text)


def _profile_artifact(settings: Settings, record: Mapping[str, Any]) -> dict[Path, str | None]:
    """A candidate's reference profile (housing.drift) as ``reference_profile.json``."""
    from housing.drift import PROFILE_ARTIFACT

    name = record.get("reference_profile")
    path = settings.root / str(name) if name else None
    return {path: PROFILE_ARTIFACT} if path is not None and path.is_file() else {}


def _record_tune(tset: TrackerSet, settings: Settings, result: TuneResult) -> None:
    from housing.tracking.base import TrialRun

    best = result.best
    params = {
        "model": result.model,
        "estimator": result.estimator,
        "study": result.study_name,
        "tune": {k: v for k, v in settings.tune.model_dump(mode="json").items() if k != "storage"},
        "cv_folds": result.cv_folds,
        "best": best.params,
    }
    metrics = {
        "tune/best_cv_rmse": float(best.value or math.nan),
        "tune/default_cv_rmse": result.default_value,
        "tune/improvement": result.improvement,
        "tune/new_trials": float(result.new_trials),
        "tune/trials": float(len(result.trials)),
        "tune/seconds": result.seconds,
    }
    done = [t for t in result.trials if t.value is not None]
    figures = [
        Figure(
            "optimization_history",
            f"{result.model}: CV RMSE per trial",
            "scatter",
            [t.number for t in done],
            [float(t.value or math.nan) for t in done],
            "trial",
            "cv/rmse_mean",
        )
    ]
    if result.importances:
        ranked = list(result.importances.items())
        figures.append(
            Figure(
                "param_importances",
                f"{result.model}: parameter importances",
                "bar",
                [k for k, _ in ranked],
                [v for _, v in ranked],
                "param",
                "importance",
            )
        )
    text = f"tune {result.study_name}: best trial {best.number} cv/rmse_mean {best.value:.4f}"
    _report(tset, "tune", params, metrics, {}, figures=figures, text=text)
    trials = [
        TrialRun(
            number=t.number,
            state=t.state,
            params=t.params,
            metrics={"cv/rmse_mean": t.value}
            if t.value is not None
            else {"cv/rmse_running": t.fold_rmse[-1]}
            if t.fold_rmse
            else {},
        )
        for t in result.untracked
    ]
    tset.each("log_trials", lambda t: t.log_trials(result.study_name, trials, best.number))


def _model_name(settings: Settings) -> str:
    return settings.clearml.model_name


_RECORDERS: dict[str, Callable[[TrackerSet, Any, Any], None]] = {
    "prepare": _record_prepare,
    "train": _record_train,
    "select_best": _record_select,
    "evaluate": _record_evaluate,
    "predict": _record_predict,
    "tune": _record_tune,
}
