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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from housing.errors import ConfigError, HousingError, first_line
from housing.orchestration.dag import PipelineError, PipelineResult, StepResult, final_metrics

if TYPE_CHECKING:
    import pandas as pd

    from housing.config import Settings
    from housing.drift import ReferenceProfile
    from housing.orchestration.dag import StepStatus
    from housing.predict import ModelChoice

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
    if settings.clearml.pipeline.retrain == "on_change" and use_cache is not False:
        skipped = skip_unchanged(settings)
        if skipped is not None:
            return skipped
    if clearml_mode(settings) == "online":
        from housing.orchestration.clearml_controller import run_controller

        return run_controller(settings, overrides, cdir)
    return run_local(settings, overrides, max_workers=max_workers, use_cache=use_cache)


@dataclass(frozen=True)
class RetrainDecision:
    """Whether a scheduled run should train, and why (one line)."""

    retrain: bool
    reason: str
    data_md5: str | None = None
    max_psi: float | None = None


def prepared_md5(settings: Settings) -> tuple[str, pd.DataFrame]:
    """The md5 ``data/raw/housing.csv`` would have after prepare (the lineage's
    ``data_md5``), and that table; computed in a temporary folder, writing nothing."""
    import tempfile

    from housing import io
    from housing.data import sources
    from housing.stages.prepare import prepare_frames

    raw, _, _ = prepare_frames(sources.load(settings.data), settings.data, settings.prepare)
    with tempfile.TemporaryDirectory(prefix="housing-drift-") as tmp:
        written = io.write_csv(Path(tmp) / "raw.csv", raw)
        return io.file_md5(written), raw


def retrain_decision(settings: Settings) -> RetrainDecision:
    """``clearml.pipeline.retrain: on_change``: skip only when the pipeline trained before
    (the newest registered version of ``<model_name>-best``, whether the champion gate
    promoted it or not), the input data's md5 equals that version's ``data_md5`` and
    nothing drifts against its reference profile (the champion's, said so, when it has
    none)."""
    from housing.drift import compare, current_of
    from housing.drift_check import newest_or_none

    model = newest_or_none(settings)
    if model is None:
        return RetrainDecision(True, "no registered model yet")
    try:
        md5, raw = prepared_md5(settings)
    except HousingError as exc:  # prepare will say it in its own words
        return RetrainDecision(True, f"data not readable here ({first_line(exc, 200)})")
    if md5 != model.data_md5:
        return RetrainDecision(
            True,
            f"new data: md5 {md5[:12]}, {model.label} was trained on "
            f"{(model.data_md5 or 'unknown')[:12]}",
            md5,
        )
    try:
        reference, note = _baseline_reference(settings, model)
    except HousingError as exc:
        return RetrainDecision(True, first_line(exc), md5)
    result = compare(reference, current_of(reference, [raw]), settings.drift)
    if result.drifting:
        return RetrainDecision(True, f"{result.line()}{note}", md5, result.max_psi)
    return RetrainDecision(
        False,
        f"skipped: no change (data md5 {md5[:12]} is {model.label}'s; {result.line()}{note})",
        md5,
        result.max_psi,
    )


def _baseline_reference(settings: Settings, model: ModelChoice) -> tuple[ReferenceProfile, str]:
    """``model``'s reference profile and ``""``; when it has none, the champion's and a
    note saying so (``"; drift against <champion>'s reference: <why>"``). Neither: the
    newest's one-line ArtifactError."""
    from housing.drift import reference_for
    from housing.drift_check import champion_or_none

    try:
        return reference_for(settings, model)[0], ""
    except HousingError as exc:
        champion = champion_or_none(settings)
        if champion is None or champion.sha256 == model.sha256:
            raise
        try:
            reference, _ = reference_for(settings, champion)
        except HousingError:
            raise exc from None
        log.warning("pipeline: %s; comparing with %s's", first_line(exc), champion.label)
        return reference, f"; drift against {champion.label}'s reference: {first_line(exc)}"


def skip_unchanged(settings: Settings) -> PipelineResult | None:
    """``clearml.pipeline.retrain: on_change``: a run whose data is what the pipeline last
    trained on (:func:`retrain_decision`) and does not drift trains nothing; it records a
    ``skipped`` pipeline event (notified as any run summary) and returns its result. None:
    the run goes ahead (the reason is logged)."""
    import time

    from housing import runs
    from housing.monitoring import EventLog, build_notifiers, record_pipeline_summary

    started = time.perf_counter()
    decision = retrain_decision(settings)
    if decision.retrain:
        log.info("pipeline: retraining (clearml.pipeline.retrain: on_change): %s", decision.reason)
        return None
    run_id = runs.current().run_id
    seconds = time.perf_counter() - started
    record_pipeline_summary(
        EventLog(settings.paths.metrics_dir / "pipeline_events.jsonl"),
        run_id,
        "skipped",
        seconds,
        notifier=build_notifiers(settings.notifications),
        extra={"reason": decision.reason, "data_md5": decision.data_md5},
    )
    return PipelineResult(run_id, "skipped", "none", {}, seconds, reason=decision.reason)


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
