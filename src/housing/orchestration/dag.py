"""The pipeline DAG as ClearML's controller runs it (it mirrors ``dvc.yaml``), and what a
run of it returns. Shared by ``housing pipeline`` (:mod:`.pipeline`) and the controller
(:mod:`.clearml_controller`), which import this module and never each other's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from housing.errors import ArtifactError, HousingError
from housing.io import file_sha256

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.monitoring import Notifier

StepStatus = Literal["succeeded", "failed", "skipped"]


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
