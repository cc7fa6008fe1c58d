"""Running stages in this process: events, notifications and trackers around each one.

``execute_stage`` wraps one stage; ``run_stage`` composes the config first;
``run_all`` runs prepare, every candidate's train, select_best and evaluate in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing.errors import ConfigError

if TYPE_CHECKING:
    from housing.config import Settings


def run_stage(stage: str, overrides: Sequence[str] = (), config_dir: Path | None = None) -> Any:
    """Compose the config and run one stage; returns the stage's result dataclass."""
    from housing.config import load_settings

    return execute_stage(stage, load_settings(overrides, config_dir=config_dir))


def pipeline_run_id() -> str:
    """``$HOUSING_RUN_ID`` (shared by the stages of one run), else a new id."""
    from housing.monitoring import current_run_id

    return current_run_id()


def execute_stage(stage: str, settings: Settings, run_id: str | None = None) -> Any:
    """Run one stage with its events, notifications and trackers around it."""
    from housing.monitoring import EventLog, build_notifiers, track_stage
    from housing.tracking.base import StageRun
    from housing.tracking.recorder import record, tracked

    name = f"train_{settings.model.name}" if stage == "train" else stage
    run_id = run_id or pipeline_run_id()
    events = EventLog(settings.paths.metrics_dir / "pipeline_events.jsonl")
    try:
        notifier = build_notifiers(settings.section("notifications"), base_dir=settings.root)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    run = StageRun(stage=stage, name=name, pipeline_run_id=run_id, tags=(stage,))
    with track_stage(events, run_id, name, notifier) as handle, tracked(settings, run) as tset:
        result = _stage_function(stage)(settings)
        record(tset, stage, settings, result)
        metrics = getattr(result, "metrics", None)
        if isinstance(metrics, dict):
            handle.update({"metrics": metrics})
    return result


def _stage_function(stage: str) -> Callable[[Any], Any]:
    if stage == "prepare":
        from housing.stages.prepare import run as prepare

        return prepare
    if stage == "train":
        from housing.stages.train import run as train

        return train
    if stage == "select_best":
        from housing.stages.select_best import run as select_best

        return select_best
    if stage == "evaluate":
        from housing.stages.evaluate import run as evaluate

        return evaluate
    raise ValueError(f"unknown stage {stage!r}")


def run_all(overrides: Sequence[str] = (), config_dir: Path | None = None) -> dict[str, Any]:
    """prepare -> train every candidate -> select_best -> evaluate, in this process."""
    from housing.config import load_settings

    settings = load_settings(overrides, config_dir=config_dir)
    run_id = pipeline_run_id()
    results: dict[str, Any] = {"prepare": execute_stage("prepare", settings, run_id)}
    for name in settings.selection.candidates:
        model_settings = load_settings([*overrides, f"model={name}"], config_dir=config_dir)
        results[f"train_{name}"] = execute_stage("train", model_settings, run_id)
    results["select_best"] = execute_stage("select_best", settings, run_id)
    results["evaluate"] = execute_stage("evaluate", settings, run_id)
    return results
