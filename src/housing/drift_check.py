"""``housing drift`` and prepare's snapshot check: a drift check's outputs.

:func:`run` checks a file against the reference profile (:mod:`housing.drift`) of the
model ``--model`` names (resolved as predict resolves it), reading it as predict does;
:func:`check_snapshot` checks prepare's new snapshot against the champion's reference,
if there is a champion. Both :func:`publish`: ``metrics/drift.json`` (numbers only), its
``.meta.json`` sidecar (input and its sha256, model, thresholds, drifting features, bin
shares), one plot per drifting feature under ``plots/drift/`` (older ones removed), and
the ``drift`` event (notified on a crossing). Nothing here prints.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing import io
from housing.drift import (
    STAGE,
    DriftResult,
    announce,
    compare,
    current_of,
    plot_stem,
    reference_for,
)
from housing.errors import ArtifactError, HousingError, first_line

if TYPE_CHECKING:
    import pandas as pd

    from housing.config import Settings
    from housing.predict import ModelChoice

log = logging.getLogger(__name__)


def champion_or_none(settings: Settings) -> ModelChoice | None:
    """The champion as predict resolves it, or None when there is none (no store, no
    champion recorded, or its record is unusable: said at debug level)."""
    from housing.predict import CHAMPION

    return _resolved_or_none(settings, CHAMPION)


def newest_or_none(settings: Settings) -> ModelChoice | None:
    """The newest registered version of ``<model_name>-best``, promoted or not (the model
    the pipeline last trained), as predict resolves it; None as :func:`champion_or_none`."""
    from housing.predict import NEWEST

    return _resolved_or_none(settings, NEWEST)


def _resolved_or_none(settings: Settings, spec: str) -> ModelChoice | None:
    from housing.predict import resolve_model

    try:
        return resolve_model(settings, spec)
    except HousingError as exc:
        log.debug("drift: no usable %s model (%s)", spec, first_line(exc))
        return None


@dataclass(frozen=True)
class DriftReport:
    """What a drift check wrote and found."""

    result: DriftResult
    metrics_path: Path
    meta_path: Path
    plots: tuple[Path, ...]
    record: dict[str, Any] = field(repr=False)

    def line(self) -> str:
        """What ``housing drift`` prints."""
        where = io.relpath(self.metrics_path, Path.cwd())
        plots = f", {len(self.plots)} plot(s) in plots/drift/" if self.plots else ""
        return f"{self.result.line()}; wrote {where}{plots}"


def _model_fields(model: ModelChoice | None, reference: str) -> dict[str, Any]:
    if model is None:
        return {"reference": reference}
    return {
        "model": model.registry_name,
        "version": model.version,
        "source": model.source,
        "model_sha256": model.sha256,
        "data_md5": model.data_md5,
        "reference": reference,
    }


def publish(
    settings: Settings,
    result: DriftResult,
    *,
    origin: str,
    input_path: Path,
    input_sha256: str,
    model: ModelChoice | None,
    reference: str,
    started: float,
) -> DriftReport:
    """Write ``metrics/drift.json`` (numbers), ``metrics/drift.meta.json`` and one plot per
    drifting feature under ``plots/drift/`` (older ones removed), then :func:`announce`."""
    from housing.reporting.report import drift_chart
    from housing.tracking.lineage import utc_now

    paths = settings.paths
    metrics_path = paths.metrics_dir / "drift.json"
    folder = paths.plots_dir / STAGE
    plots = []
    for name in result.drifting:
        f = result.features[name]
        chart = drift_chart(name, f.bin_labels(), f.reference, f.current, f.psi)
        plots.append(io.write_text(folder / f"{plot_stem(name)}.svg", chart.svg))
    for stale in folder.glob("*.svg"):
        if stale not in plots:
            stale.unlink(missing_ok=True)
    record = {
        "origin": origin,
        "input": io.project_path(input_path, settings.root),
        "input_sha256": input_sha256,
        **_model_fields(model, reference),
        "psi_threshold": result.psi_threshold,
        "p_value": result.p_value,
        "rule": "drifting: PSI >= psi_threshold and KS p-value < p_value",
        "drifting": result.drifting,
        "n_reference": result.n_reference,
        "rows": result.n_current,
        "features": {
            name: {
                "psi": f.psi,
                "ks_statistic": f.ks_statistic,
                "ks_pvalue": f.p_value,
                "drifting": f.drifting,
                "bins": f.bin_labels(),
                "reference": list(f.reference),
                "current": list(f.current),
            }
            for name, f in result.features.items()
        },
        "plots": [io.project_path(p, settings.root) for p in plots],
        "created_at": utc_now(),
    }
    io.write_scores(metrics_path, result.metrics)
    meta_path = paths.meta(metrics_path)
    io.write_json(meta_path, record)
    announce(settings, result, origin=origin, input_path=input_path, model=model, started=started)
    return DriftReport(result, metrics_path, meta_path, tuple(plots), record)


# --------------------------------------------------------------------------- entry points


def run(settings: Settings, input_path: Path, model_spec: str = "champion") -> DriftReport:
    """``housing drift --input F``: F's features (checked as predict checks them, read in
    ``predict.chunk_rows`` chunks) against the reference of the model ``model_spec`` names."""
    from housing.predict import check_columns, checked_chunks, header_columns, resolve_model

    started = time.perf_counter()
    input_path = Path(input_path)
    columns = header_columns(input_path, settings.data.sep)
    model = resolve_model(settings, model_spec)
    reference, where = reference_for(settings, model)
    features = list(reference.features)
    check_columns(input_path, columns, features)
    data = (model.data or settings.data).model_copy(update={"sep": settings.data.sep})
    chunks = checked_chunks(input_path, data, features, settings.predict.chunk_rows)
    current = current_of(reference, chunks, settings.drift.sample_size)
    result = compare(reference, current, settings.drift)
    return publish(
        settings,
        result,
        origin=STAGE,
        input_path=input_path,
        input_sha256=io.file_sha256(input_path),
        model=model,
        reference=where,
        started=started,
    )


def check_snapshot(settings: Settings, frame: pd.DataFrame, path: Path) -> DriftReport | None:
    """Drift of a new snapshot (prepare's validated table) against the champion's
    reference: None, silently, when there is no champion. Never raises a HousingError
    (a missing reference is a warning): prepare must not fail on it."""
    started = time.perf_counter()
    model = champion_or_none(settings)
    if model is None:
        return None
    try:
        reference, where = reference_for(settings, model)
        missing = [f for f in reference.features if f not in frame.columns]
        if missing:
            raise ArtifactError(f"{path}: no column(s) {', '.join(missing)} to compare")
        current = current_of(reference, [frame], settings.drift.sample_size)
        result = compare(reference, current, settings.drift)
        return publish(
            settings,
            result,
            origin="prepare",
            input_path=path,
            input_sha256=io.file_sha256(path),
            model=model,
            reference=where,
            started=started,
        )
    except HousingError as exc:
        log.warning("drift: not checked against %s (%s)", model.label, first_line(exc))
        return None
