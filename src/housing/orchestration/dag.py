"""The pipeline DAG as ClearML's controller runs it (it mirrors ``dvc.yaml``), and what a
run of it returns; shared by :mod:`.pipeline` and :mod:`.clearml_controller`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from housing.errors import HousingError

if TYPE_CHECKING:
    from housing.config import Settings

StepStatus = Literal["succeeded", "failed", "skipped"]


class PipelineError(HousingError):
    """A pipeline step failed (the message names it); ``exit_code`` is the step's own, else 1."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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


def step_files(stage: str, settings: Settings) -> tuple[list[Path], list[Path]]:
    """(inputs, outputs) of a stage, absolute, as that step's settings name them: inputs are
    other steps' outputs, or the CSV ``prepare`` reads (``data.path``)."""
    from housing.drift import profile_path

    paths, data = settings.paths, settings.data

    def trained(name: str) -> list[Path]:
        metrics, model = paths.train_metrics(name), paths.model(name)
        return [model, profile_path(model), metrics, paths.meta(metrics)]

    csv = [data.path.resolve()] if data.path is not None else []
    summary, tested = paths.train_summary, paths.test_metrics
    files = {
        "prepare": (csv, [paths.raw, paths.train, paths.test, paths.fingerprint]),
        "train": ([paths.train, paths.fingerprint], trained(settings.model.name)),
        "select_best": (
            [f for name in settings.selection.candidates for f in trained(name)],
            [paths.best_model, summary, paths.meta(summary)],
        ),
        "evaluate": (
            [paths.best_model, paths.meta(summary), paths.test],
            [tested, paths.meta(tested), paths.test_summary, paths.predictions, paths.importances],
        ),
    }
    return files[stage]


@dataclass(frozen=True)
class StepResult:
    """What one step did in a run (``cached``: its outputs were up to date)."""

    name: str
    status: StepStatus
    cached: bool = False


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of one pipeline run."""

    run_id: str
    status: Literal["succeeded", "failed", "skipped"]
    executor: str  # local | clearml-local | clearml-queue | none (skipped)
    steps: Mapping[str, StepResult]
    duration_sec: float
    best_model: str | None = None
    test_rmse: float | None = None
    reason: str | None = None  # why a run was skipped

    def summary_line(self) -> str:
        """One human line: status, duration, steps run/cached/skipped, best model, test rmse."""
        if self.status == "skipped":
            return f"pipeline {self.run_id}: {self.reason or 'skipped'}"
        kinds = [
            "skipped" if r.status == "skipped" else "cached" if r.cached else "run"
            for r in self.steps.values()
        ]
        rmse = f"{self.test_rmse:.4f}" if self.test_rmse is not None else "-"
        return (
            f"pipeline {self.run_id}: {self.status} in {self.duration_sec:.1f}s "
            f"({self.executor}; {kinds.count('run')} run, {kinds.count('cached')} cached, "
            f"{kinds.count('skipped')} skipped) best_model={self.best_model or '-'} "
            f"test_rmse={rmse}"
        )


def final_metrics(settings: Settings) -> tuple[str | None, float | None]:
    """The selected model and its test rmse after a run, (None, None) when unreadable."""
    from housing.stages.evaluate import read_outcome

    try:
        best, scores = read_outcome(settings.paths)
        return best, float(scores["test/rmse"])
    except (HousingError, KeyError, TypeError, ValueError):
        return None, None
