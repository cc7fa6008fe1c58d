"""``housing tune`` on ClearML agents: ``HyperParameterOptimizer`` with ``OptimizerOptuna``.

Used when the pipeline would run on a server with its steps on agents (ClearML online and
``clearml.pipeline.run_locally: false``). The search space is ``tune.space``; each trial is
a clone of the model's train step task (``<task_prefix>:train_<model>``, as the pipeline
registered it) with the searched values in its ``model_params`` hyperparameters, enqueued on
``clearml.pipeline.execution_queue``; the train step turns that section into
``model.params.<name>=<value>`` overrides (``clearml_controller.trial_overrides``). The
objective is the step's ``cv/rmse_mean`` as it reports it (a single value: title
``Summary``), minimised.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from housing.orchestration.clearml_controller import TRIAL_SECTION as SECTION
from housing.tracking.offline import ClearMLError

if TYPE_CHECKING:
    from housing.config import ParamRange, Settings

log = logging.getLogger(__name__)

#: The objective: the train step reports its metrics with ``report_single_value``, which
#: ClearML keeps as scalar title ``Summary``, series = the metric's name.
OBJECTIVE: Final = ("Summary", "cv/rmse_mean")


@dataclass(frozen=True)
class RemoteTuneResult:
    """What the optimizer launched: the base task, the queue, and each trial's task id with
    its parameter overrides (``<SECTION>/<param>``: value)."""

    model: str
    base_task_id: str
    queue: str
    trials: dict[str, dict[str, Any]]
    objectives: dict[str, float | None] = field(default_factory=dict)  # last value reported

    @property
    def best(self) -> tuple[str, float] | None:
        """The trial with the lowest objective, and that value; None: none reported one."""
        scored = [(v, k) for k, v in self.objectives.items() if v is not None]
        return (min(scored)[1], min(scored)[0]) if scored else None


def wanted(settings: Settings) -> bool:
    """Whether ``housing tune`` runs on agents: the pipeline's own decision (ClearML online
    and ``clearml.pipeline.run_locally: false``)."""
    from housing.orchestration.pipeline import clearml_mode

    return not settings.clearml.pipeline.run_locally and clearml_mode(settings) == "online"


def hyper_parameters(space: Mapping[str, ParamRange]) -> list[Any]:
    """``tune.space`` as the SDK's parameter ranges, named ``<SECTION>/<param>``."""
    from clearml.automation import (
        DiscreteParameterRange,
        LogUniformParameterRange,
        UniformIntegerParameterRange,
        UniformParameterRange,
    )

    ranges: list[Any] = []
    for name, spec in space.items():
        key = f"{SECTION}/{name}"
        if spec.type == "categorical":
            ranges.append(DiscreteParameterRange(key, values=list(spec.choices or ())))
        elif spec.type == "int":
            low, high, step = int(spec.low or 0), int(spec.high or 0), int(spec.step or 1)
            # the SDK's integer range excludes max_value unless include_max_value
            ranges.append(UniformIntegerParameterRange(key, low, high, step, True))
        elif spec.log:
            low_f, high_f = math.log10(float(spec.low or 1)), math.log10(float(spec.high or 1))
            ranges.append(LogUniformParameterRange(key, low_f, high_f, base=10))
        else:
            lo, hi = float(spec.low or 0), float(spec.high or 0)
            ranges.append(UniformParameterRange(key, lo, hi, spec.step, True))
    return ranges


def base_task_id(settings: Settings) -> str:
    """The id of the newest train step task of ``settings.model`` on the server."""
    from clearml import Task

    cml = settings.clearml
    name = f"{cml.task_prefix}:train_{settings.model.name}"
    found: Sequence[Any] = Task.get_tasks(
        project_name=cml.project_name,
        task_name=f"^{re.escape(name)}$",
        task_filter={"order_by": ["-last_update"]},
    )
    if not found:
        raise ClearMLError(
            f"ClearML server {cml.server.api_host}: no task {name} in project "
            f"{cml.project_name} to clone trials from; run the pipeline there once "
            f"(housing pipeline with selection.candidates including {settings.model.name})"
        )
    return str(found[0].id)


def run_remote(settings: Settings) -> RemoteTuneResult:
    """Run ``tune.n_trials`` trials (``tune.n_jobs`` at a time, ``tune.timeout``) of
    ``tune.space`` on agents; returns once the optimizer is done (or stopped)."""
    from clearml.automation import HyperParameterOptimizer
    from clearml.automation.optuna import OptimizerOptuna

    from housing.orchestration.clearml_controller import clearml_environment
    from housing.tuning import check_space, sampler

    cfg, options = settings.tune, settings.clearml.pipeline
    poll = options.poll_sec
    check_space(settings)
    with clearml_environment(settings.clearml):
        base = base_task_id(settings)
        _require_queue(settings)
        try:
            optimizer: Any = HyperParameterOptimizer(
                base_task_id=base,
                hyper_parameters=hyper_parameters(cfg.space),
                objective_metric_title=OBJECTIVE[0],
                objective_metric_series=OBJECTIVE[1],
                objective_metric_sign="min",
                optimizer_class=OptimizerOptuna,
                max_number_of_concurrent_tasks=cfg.n_jobs,
                execution_queue=options.execution_queue,
                optimization_time_limit=None if cfg.timeout is None else cfg.timeout / 60.0,
                total_max_jobs=cfg.n_trials,
                max_iteration_per_job=None,
                auto_connect_task=False,
                pool_period_min=poll / 60.0,
                optuna_sampler=sampler(cfg.seed),
            )
        except Exception as exc:
            raise ClearMLError(f"ClearML HyperParameterOptimizer could not start: {exc}") from exc
        log.info("tune: trials of %s go to queue %r", base, options.execution_queue)
        optimizer.start()
        try:
            optimizer.wait()
        finally:  # the reporter thread only logs to an optimizer task, which there is not
            optimizer.stop(timeout=poll / 60.0, wait_for_reporter=False)
        trials = {str(k): dict(v) for k, v in optimizer.optimizer.get_created_jobs_ids().items()}
        objectives = {task_id: _objective(task_id) for task_id in trials}
    if not trials:
        raise ClearMLError(
            f"ClearML HyperParameterOptimizer launched no trial of task {base} "
            f"(tune.n_trials={cfg.n_trials}, tune.timeout={cfg.timeout}); see the log above"
        )
    return RemoteTuneResult(settings.model.name, base, options.execution_queue, trials, objectives)


def _objective(task_id: str) -> float | None:
    """The last :data:`OBJECTIVE` value trial ``task_id`` reported (None: none yet), read
    as the optimizer reads it (the task's scalar histogram)."""
    from clearml import Task

    try:
        scalars: Any = Task.get_task(task_id=task_id).get_reported_scalars()
    except Exception as exc:  # the trial's record is the server's; say it, go on
        log.warning("tune: cannot read the objective of trial %s: %s", task_id, exc)
        return None
    values = ((scalars or {}).get(OBJECTIVE[0]) or {}).get(OBJECTIVE[1]) or {}
    ys = values.get("y") or []
    return float(ys[-1]) if ys else None


def _require_queue(settings: Settings) -> None:
    """Raise ClearMLError unless the server has ``clearml.pipeline.execution_queue``
    (the SDK would only log each trial's failed enqueue)."""
    from clearml import Task
    from clearml.backend_interface.util import get_queue_id

    queue = settings.clearml.pipeline.execution_queue
    if get_queue_id(Task._get_default_session(), queue) is None:
        raise ClearMLError(
            f"ClearML server {settings.clearml.server.api_host} has no queue {queue!r} "
            "(clearml.pipeline.execution_queue)"
        )
