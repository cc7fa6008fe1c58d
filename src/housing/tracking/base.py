"""The tracker protocol: what every experiment-tracking backend implements.

Stages never import a tracking library; the adapter layer (``housing.tracking``)
opens one :class:`Tracker` per active backend for a stage and feeds each the same
params, metrics (``val/rmse``-style names, the numbers in ``metrics/*.json``),
artifacts, figures and registered models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from housing.runs import RunContext


@dataclass(frozen=True)
class StageRun:
    """Identity of one stage execution inside one pipeline run."""

    stage: str  # prepare | train | select_best | evaluate (train: task name has the model)
    name: str  # display name, e.g. "train_ridge"
    pipeline_run_id: str  # shared by every stage of one pipeline run
    tags: Sequence[str] = ()
    context: RunContext | None = None  # who owns the pipeline run (housing.runs)


@dataclass(frozen=True)
class Figure:
    """A plot as data, rendered by each backend its own way.

    ``kind`` is ``scatter`` (x/y points; ``diagonal`` adds y = x) or ``bar``
    (``x`` are labels, ``y`` values).
    """

    name: str  # e.g. "predicted_vs_actual"
    title: str
    kind: str
    x: Sequence[Any]
    y: Sequence[float]
    x_label: str = ""
    y_label: str = ""
    diagonal: bool = False


@dataclass(frozen=True)
class ModelVersion:
    """A model to register: the file plus the lineage metadata every version carries."""

    registry_name: str  # "<model_name>-<algorithm>" or "<model_name>-best"
    path: Path  # the joblib Pipeline
    algorithm: str
    metrics: Mapping[str, float]
    params: Mapping[str, Any]
    metadata: Mapping[str, str]  # data_md5, git_commit, config_hash, model_sha256, created_at
    tags: Sequence[str] = ()
    example: Any = None  # a few rows of the train split (DataFrame): the model's schema


@dataclass(frozen=True)
class RegisteredModel:
    """What a backend registered: its id and version (backend-specific strings)."""

    backend: str
    registry_name: str
    version: str
    model_id: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChampionDecision:
    """Whether a challenger replaced the champion, and why; recorded by every tracker."""

    registry_name: str
    challenger_version: str
    challenger_value: float
    champion_version: str | None
    champion_value: float | None
    metric: str
    promoted: bool
    reason: str
    decided_at: str


@dataclass(frozen=True)
class TrialRun:
    """One trial of a hyperparameter study (``housing tune``) as the trackers record it."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    params: Mapping[str, Any]
    metrics: Mapping[str, float]


@runtime_checkable
class Tracker(Protocol):
    """One experiment-tracking backend, open for one stage run."""

    backend: str

    def start(self, run: StageRun) -> None:
        """Open the run/task for this stage."""

    def log_params(self, params: Mapping[str, Any], section: str) -> None:
        """Record flat or nested params under a named section (e.g. ``train_params``)."""

    def log_config(self, config: Mapping[str, Any], name: str) -> None:
        """Record the resolved config (already redacted) as one document."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics under their ``split/metric`` names."""

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """Attach a file (metrics JSON, model, fingerprint) to the run."""

    def log_figure(self, figure: Figure) -> None:
        """Record a plot."""

    def log_text(self, text: str) -> None:
        """Record a log line."""

    def log_trials(self, study: str, trials: Sequence[TrialRun], best: int) -> None:
        """Record a study's trials under this run (MLflow: one nested run per trial;
        ClearML: a table and scalars per trial) and mark trial ``best``."""

    def register_model(self, model: ModelVersion) -> RegisteredModel:
        """Add a new version of ``model.registry_name`` with its metadata."""

    def champion(self, registry_name: str, metric: str) -> tuple[str, float] | None:
        """The current champion's (version, metric value), or None."""

    def promote(self, decision: ChampionDecision, registered: RegisteredModel) -> None:
        """Record a champion decision; move the champion marker when promoted."""

    def close(self, status: str, error: str | None = None) -> None:
        """Close the run: ``completed`` or ``failed`` (with a one-line error)."""
