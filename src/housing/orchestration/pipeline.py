"""``housing pipeline``: one DAG (:mod:`.dag`, mirroring ``dvc.yaml``), two engines.

With a ClearML server (``clearml`` among the tracking backends and the server answers, or
running as a ClearML task on an agent) the DAG goes to ClearML's ``PipelineController``
(:mod:`.clearml_controller`). Without one it is the local engine, ``housing repro``
(:mod:`housing.repro`): DVC decides what is stale, every stage is a ClearML offline
session, and ``--no-cache`` is ``dvc repro --force``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from housing.errors import ConfigError
from housing.orchestration.dag import PipelineError, PipelineResult, StepResult, final_metrics

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.orchestration.dag import StepStatus

log = logging.getLogger(__name__)

#: Overrides the local engine accepts: they change how runs are recorded, not outputs.
TRACKING_KEYS = ("tracking", "mlflow", "clearml", "notifications", "registry")
#: ``housing repro``'s stage outcomes as step statuses (any other: skipped).
_STATUS: dict[str, StepStatus] = {"ran": "succeeded", "skipped": "succeeded", "failed": "failed"}


def run_pipeline(
    overrides: Sequence[str] = (),
    config_dir: Path | None = None,
    *,
    root: Path | None = None,
    max_workers: int | None = None,
    use_cache: bool | None = None,
) -> PipelineResult:
    """Run the whole DAG on the engine the config selects; ``use_cache=False`` reruns every
    step. A failed step raises :class:`PipelineError` (after the run's summary event)."""
    from housing.config import default_config_dir, load_settings

    cdir = (config_dir or default_config_dir()).resolve()
    root = (root or Path.cwd()).resolve()
    settings = load_settings(overrides, config_dir=cdir, root=root)
    if clearml_mode(settings) == "online":
        from housing.orchestration.clearml_controller import run_controller

        return run_controller(settings, overrides, cdir)
    return run_local(settings, overrides, max_workers=max_workers, use_cache=use_cache)


def clearml_mode(settings: Settings) -> str:
    """``online`` when ClearML is a tracking backend and a server answers (or this runs as
    a ClearML task on an agent), else ``offline``."""
    if "clearml" not in settings.tracking:
        return "offline"
    if os.environ.get("CLEARML_TASK_ID"):  # executed as a ClearML task (agent): online
        return "online"
    from housing.tracking.clearml import resolve_mode

    mode, reason = resolve_mode(settings.clearml)
    log.debug("pipeline: ClearML %s (%s)", mode, reason)
    return mode


def run_local(
    settings: Settings,
    overrides: Sequence[str],
    *,
    max_workers: int | None = None,
    use_cache: bool | None = None,
) -> PipelineResult:
    """The local engine (``housing repro``) on ``settings.root``'s ``dvc.yaml``; only tracking
    overrides apply (outputs are what ``dvc.yaml`` and ``conf/`` say: DVC tells what is stale)."""
    from housing.repro import reproduce

    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.split(".", 1)[0] not in TRACKING_KEYS and key != "hydra.verbose":
            raise ConfigError(
                f"{key}: without a ClearML server the pipeline is dvc.yaml with conf/ as it "
                f"is; set {key} in conf/ or run `dvc exp run -S {item}`"
            )
    if use_cache is None:
        use_cache = settings.clearml.pipeline.cache
    result = reproduce(
        settings.root, jobs=max_workers, force=not use_cache, overrides=tuple(overrides)
    )
    if not result.ok:
        raise PipelineError(f"pipeline {result.error}", exit_code=result.exit_code or 1)
    steps = {  # train@ridge -> train_ridge, the DAG's step names
        name.replace("@", "_"): StepResult(
            name.replace("@", "_"), _STATUS.get(status, "skipped"), cached=status == "skipped"
        )
        for name, status in result.stages.items()
    }
    best, rmse = final_metrics(settings)
    return PipelineResult(result.run_id, "succeeded", "local", steps, result.seconds, best, rmse)
