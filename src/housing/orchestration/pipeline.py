"""The pipeline DAG, and ``housing pipeline``: one DAG, two engines.

One DAG (:func:`build_dag`) mirrors ``dvc.yaml``::

    prepare -> train_<model> (one per selection.candidates) -> select_best -> evaluate

:func:`run_pipeline` picks the engine: with a ClearML server (``clearml`` among the
tracking backends and the server answers, or running as a ClearML task on an agent)
the DAG goes to ClearML's ``PipelineController``
(:mod:`housing.orchestration.clearml_controller`, steps here or on agent queues).
Without one it is the local engine, ``housing repro`` (:mod:`housing.repro`): DVC
decides what is stale, every stage is recorded as a ClearML offline session, and
``--no-cache`` is ``dvc repro --force``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from housing.errors import ArtifactError, ConfigError, HousingError
from housing.io import file_sha256

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.monitoring import Notifier

log = logging.getLogger(__name__)

StepStatus = Literal["succeeded", "failed", "skipped"]
#: Overrides the local engine accepts: they change how runs are recorded, not outputs.
TRACKING_KEYS = ("tracking", "mlflow", "clearml", "notifications", "registry")


class PipelineError(HousingError):
    """A pipeline step failed; the message names the step and its error.

    ``exit_code`` is the failing step's own (e.g. 2 for a config error), else 1.
    """

    def __init__(self, message: str, *, step: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.step = step
        self.exit_code = exit_code


# --------------------------------------------------------------------------- the DAG


@dataclass(frozen=True)
class Step:
    """One node of the DAG: ``stage`` run with extra Hydra ``overrides`` after ``parents``."""

    name: str
    stage: str
    overrides: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()


def build_dag(settings: Settings) -> list[Step]:
    """prepare -> train_<model> for every candidate -> select_best -> evaluate (topological)."""
    trains = [
        Step(f"train_{name}", "train", (f"model={name}",), ("prepare",))
        for name in settings.selection.candidates
    ]
    return [
        Step("prepare", "prepare"),
        *trains,
        Step("select_best", "select_best", (), tuple(t.name for t in trains)),
        Step("evaluate", "evaluate", (), ("select_best",)),
    ]


def step_outputs(stage: str, settings: Settings) -> list[Path]:
    """The files a stage writes (absolute), as the settings of that step name them."""
    paths = settings.paths
    if stage == "prepare":
        return [paths.raw, paths.train, paths.test, paths.fingerprint]
    if stage == "train":
        name = settings.model.name
        metrics = paths.train_metrics(name)
        return [paths.model(name), metrics, paths.meta(metrics)]
    if stage == "select_best":
        return [paths.best_model, paths.train_summary, paths.meta(paths.train_summary)]
    if stage == "evaluate":
        meta = paths.meta(paths.test_metrics)
        return [paths.test_metrics, meta, paths.test_summary, paths.predictions, paths.importances]
    raise ValueError(f"unknown stage {stage!r}")


def step_inputs(stage: str, settings: Settings) -> list[Path]:
    """The files a stage reads: other steps' outputs, or the raw CSV for ``data=csv``."""
    paths = settings.paths
    if stage == "prepare":
        if settings.data.source == "csv" and settings.data.path is not None:
            return [settings.data.path.resolve()]
        return []
    if stage == "train":
        return [paths.train, paths.fingerprint]
    if stage == "select_best":
        files: list[Path] = []
        for name in settings.selection.candidates:
            metrics = paths.train_metrics(name)
            files += [paths.model(name), metrics, paths.meta(metrics)]
        return files
    if stage == "evaluate":
        return [paths.best_model, paths.meta(paths.train_summary), paths.test]
    raise ValueError(f"unknown stage {stage!r}")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StepResult:
    """What one step did in a run; ``outputs`` maps root-relative paths to sha256."""

    name: str
    status: StepStatus
    cached: bool = False
    outputs: Mapping[str, str] = field(default_factory=dict)
    inputs: Mapping[str, str] = field(default_factory=dict)
    cache_key: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    duration_sec: float | None = None
    error: str | None = None
    pid: int | None = None
    exit_code: int = 0


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of one pipeline run."""

    run_id: str
    status: Literal["succeeded", "failed"]
    executor: str  # local | clearml-local | clearml-queue
    steps: Mapping[str, StepResult]
    duration_sec: float
    best_model: str | None = None
    test_rmse: float | None = None
    controller_task_id: str | None = None

    @property
    def cached_steps(self) -> list[str]:
        """Steps skipped because their outputs were up to date."""
        return [n for n, r in self.steps.items() if r.cached]

    @property
    def executed_steps(self) -> list[str]:
        """Steps that ran in this run (succeeded or failed)."""
        return [n for n, r in self.steps.items() if not r.cached and r.status != "skipped"]

    @property
    def failed_steps(self) -> list[str]:
        return [n for n, r in self.steps.items() if r.status == "failed"]

    @property
    def skipped_steps(self) -> list[str]:
        return [n for n, r in self.steps.items() if r.status == "skipped"]

    def summary_line(self) -> str:
        """One human line: status, duration, best model, test rmse, cached steps."""
        rmse = f"{self.test_rmse:.4f}" if self.test_rmse is not None else "-"
        cached = len(self.cached_steps)
        return (
            f"pipeline {self.run_id}: {self.status} in {self.duration_sec:.1f}s "
            f"({self.executor}; {len(self.executed_steps)} run, {cached} cached, "
            f"{len(self.skipped_steps)} skipped) best_model={self.best_model or '-'} "
            f"test_rmse={rmse}"
        )


# --------------------------------------------------------------------------- hashing


def _rel(path: Path, root: Path) -> str:
    """Root-relative POSIX path when inside ``root``, else the absolute path."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def hash_files(paths: Sequence[Path], root: Path) -> dict[str, str]:
    """``{relative path: sha256}``; a missing file is an :class:`ArtifactError`."""
    out: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise ArtifactError(f"{path}: expected output is missing")
        out[_rel(path, root)] = file_sha256(path)
    return out


def notifier_for(settings: Settings) -> Notifier:
    """The configured notification sinks (a bad ``notifications`` section is a ConfigError)."""
    from housing.monitoring import build_notifiers

    return build_notifiers(settings.notifications)


# --------------------------------------------------------------------------- entry points


def run_pipeline(
    overrides: Sequence[str] = (),
    config_dir: Path | None = None,
    *,
    root: Path | None = None,
    max_workers: int | None = None,
    use_cache: bool | None = None,
) -> PipelineResult:
    """Run the whole DAG on the engine the config selects (see the module docstring).

    ``use_cache=False`` reruns every step. Raises :class:`PipelineError` when a step
    fails (after the run's summary event is written).
    """
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
    """The local engine (``housing repro``) on ``settings.root``'s ``dvc.yaml``.

    Only tracking overrides apply (``tracking=``, ``mlflow.*``, ``clearml.*``...): the
    outputs are what ``dvc.yaml`` and ``conf/`` say, so DVC can tell what is stale.
    """
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
    steps = {
        _step_name(name): StepResult(
            _step_name(name),
            "succeeded"
            if status in ("ran", "skipped")
            else "failed"
            if status == "failed"
            else "skipped",
            cached=status == "skipped",
        )
        for name, status in result.stages.items()
    }
    best, rmse = _final_metrics(settings) if result.ok else (None, None)
    outcome = PipelineResult(
        run_id=result.run_id,
        status="succeeded" if result.ok else "failed",
        executor="local",
        steps=steps,
        duration_sec=result.seconds,
        best_model=best,
        test_rmse=rmse,
    )
    if not result.ok:
        failed = outcome.failed_steps
        raise PipelineError(
            f"pipeline {result.error}",
            step=failed[0] if failed else "dvc",
            exit_code=result.exit_code or 1,
        )
    return outcome


def _step_name(dvc_name: str) -> str:
    """``train@ridge`` -> ``train_ridge`` (the DAG's step names)."""
    return dvc_name.replace("@", "_")


def _final_metrics(settings: Settings) -> tuple[str | None, float | None]:
    from housing.stages.evaluate import read_outcome

    try:
        best, scores = read_outcome(settings.paths)
        return best, float(scores["test/rmse"])
    except (HousingError, KeyError, TypeError, ValueError):
        return None, None
