"""select_best: pick the winning candidate by the selection metric and copy it."""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing import io
from housing.errors import ArtifactError

if TYPE_CHECKING:
    from housing.config import Settings

log = logging.getLogger(__name__)

#: The winner's selection-metric value in ``metrics/train_metrics.json`` (and the trackers).
SELECTION_VALUE = "selection/best_value"


@dataclass(frozen=True)
class SelectionResult:
    """The winner, the ranking metric and every candidate's record."""

    best_model: str
    metric: str
    best_value: float
    greater_is_better: bool
    candidates: dict[str, dict[str, Any]]
    missing: list[str]
    best_path: Path
    summary_path: Path
    best_sha256: str
    summary: dict[str, Any]  # the meta record plus ``best_value``
    meta_path: Path

    @property
    def metrics(self) -> dict[str, float]:
        """The winner's train metrics (names as in the train stage)."""
        return dict(self.candidates[self.best_model]["metrics"])


def choose_best(scores: Mapping[str, float], order: Sequence[str], greater_is_better: bool) -> str:
    """Best candidate by score; NaN scores never win; ties go to the earlier candidate."""
    valid = [name for name in order if name in scores and not math.isnan(scores[name])]
    if not valid:
        raise ArtifactError("select_best: no candidate has a usable selection metric value")
    sign = -1.0 if greater_is_better else 1.0
    return min(valid, key=lambda name: (sign * scores[name], order.index(name)))


def load_candidates(
    settings: Settings,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Read every candidate's train scores and meta record; returns (records, missing names).

    A record is the candidate's ``.meta.json`` plus ``metrics`` (its ``split/metric``
    scores) and its counts, as the train stage returns it.
    """
    records: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    metric = settings.selection.metric
    paths = settings.paths
    for name in settings.selection.candidates:
        path = paths.train_metrics(name)
        if not path.is_file():
            missing.append(name)
            continue
        scores = io.read_scores(path)
        if metric not in scores:
            raise ArtifactError(f"{path}: no {metric!r} (re-run: housing train model={name})")
        meta = io.read_record(paths.meta(path))
        counts = {k: v for k, v in scores.items() if "/" not in k}
        metrics = {k: float(v) for k, v in scores.items() if "/" in k}
        records[name] = {**meta, **counts, "metrics": metrics}
    if missing and not settings.selection.allow_missing:
        first = settings.paths.train_metrics(missing[0])
        raise ArtifactError(
            f"{first}: not found; candidates {', '.join(missing)} have not been trained "
            "(train them, or set selection.allow_missing=true)"
        )
    if not records:
        raise ArtifactError("select_best: none of selection.candidates has been trained")
    return records, missing


def run(settings: Settings) -> SelectionResult:
    """Select the best candidate; write ``models/best_model.joblib`` and the summary."""
    records, missing = load_candidates(settings)
    metric = settings.selection.metric
    greater = settings.selection.greater_is_better
    scores = {name: float(r["metrics"][metric]) for name, r in records.items()}
    best = choose_best(scores, list(settings.selection.candidates), greater)
    winner = records[best]
    source = settings.root / winner["model_path"]
    sha = io.file_sha256(source) if source.is_file() else ""
    if not sha or sha != winner.get("model_sha256"):
        raise ArtifactError(
            f"{source}: missing or its sha256 differs from {settings.paths.train_metrics(best)}"
            f" (re-run: housing train model={best})"
        )
    best_path = settings.paths.best_model
    with io.atomic_path(best_path) as tmp:
        shutil.copyfile(source, tmp)
    meta: dict[str, Any] = {
        "best_model": best,
        "selection_metric": metric,
        "greater_is_better": greater,
        "best_model_path": io.project_path(best_path, settings.root),
        "best_model_sha256": sha,
        "best_estimator": winner["estimator"],
        "best_params": winner["params"],
        "data_md5": winner.get("data_md5"),
        "missing_candidates": missing,
        "ranking": sorted(scores, key=lambda n: -scores[n] if greater else scores[n]),
        "candidates": {
            name: {
                "estimator": r["estimator"],
                "metrics": r["metrics"],
                "model_sha256": r["model_sha256"],
            }
            for name, r in records.items()
        },
    }
    summary_path = settings.paths.train_summary
    io.write_scores(summary_path, {**winner["metrics"], SELECTION_VALUE: scores[best]})
    io.write_json(settings.paths.meta(summary_path), meta)
    summary = {**meta, "best_value": scores[best]}
    if missing:
        log.warning("select_best: candidates not trained, skipped: %s", ", ".join(missing))
    log.info("select_best: %s wins on %s=%.4f", best, metric, scores[best])
    return SelectionResult(
        best_model=best,
        metric=metric,
        best_value=scores[best],
        greater_is_better=greater,
        candidates={name: dict(r) for name, r in records.items()},
        missing=missing,
        best_path=best_path,
        summary_path=summary_path,
        best_sha256=sha,
        summary=summary,
        meta_path=settings.paths.meta(summary_path),
    )
