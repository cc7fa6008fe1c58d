"""The experiments report: ``reports/experiments.html`` and ``reports/experiments.md``.

:func:`build_report` reads the pipeline's metrics and plots files and the trackers (through
:mod:`housing.reporting.compare`), builds a :class:`Page` of sections (the champion's
headline numbers, model comparison, predicted vs actual and residuals, feature
importances, metrics across registered versions, champion history, recent runs) and
renders it through ``templates/``: a self-contained HTML page (CSS inlined, figures as
inline SVG drawn by matplotlib with text as paths; no script, no URL) and Markdown with the
figures in ``reports/experiments_figures/``. A missing input leaves a note instead.
"""

from __future__ import annotations

import functools
import html
import io
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from housing.errors import HousingError, first_line
from housing.reporting.compare import ERROR_CHARS, ChampionEvent, Collected, as_float, parse_time

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from housing.config import Settings

log = logging.getLogger(__name__)

__all__ = ["ReportResult", "build_report", "format_metric"]

HTML_NAME: Final = "experiments.html"
MARKDOWN_NAME: Final = "experiments.md"
FIGURES_DIR: Final = "experiments_figures"
DEFAULT_VERSIONS: Final = 10
DASH: Final = "\u2013"  # shown for a missing value
MINUS: Final = "\u2212"
TIMES: Final = "\u00d7"

# Colors: validation, CV, test, and the champion accent (colorblind-safe Tableau hues).
VAL_COLOR: Final = "#4C78A8"
CV_COLOR: Final = "#F58518"
TEST_COLOR: Final = "#54A24B"
ACCENT: Final = "#E45756"  # attention (residuals outside 2 RMSE), never the champion
CHAMPION: Final = "#1E3A5F"  # the champion's text, as the page's headline (report.css)
CHAMPION_STAR: Final = "#F5B400"  # its star marker, edged in CHAMPION
MUTED: Final = "#9CA3AF"
INK: Final = "#1F2937"
LINE_COLORS: Final = ("#4C78A8", "#F58518", "#54A24B", "#B279A2", "#72B7B2", "#9D755D", "#EECA3B")
MARKERS: Final = ("s", "^", "D", "v", "P", "X", "<")
# Per series, so lines with equal values stay apart: dash pattern and a sideways dodge.
DASHES: Final = ("--", ":", "-.", (0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (1, 3)), (0, (8, 2)), "-")
DODGE: Final = 0.05  # x offset between series, in versions


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and what it says about the champion."""

    html_path: Path
    markdown_path: Path
    figure_paths: tuple[Path, ...]
    notes: tuple[str, ...]
    champion: str | None
    champion_test_rmse: float | None

    @property
    def champion_test_rmse_text(self) -> str:
        """The champion's test RMSE as the page shows it."""
        return format_metric(self.champion_test_rmse)


@dataclass(frozen=True)
class Chart:
    """One figure: its SVG (standalone document) and caption."""

    name: str
    title: str
    caption: str
    svg: str
    kind: ClassVar = "chart"  # the templates' switch


@dataclass(frozen=True)
class Cell:
    """A table cell; ``badge`` styles it (good, bad, muted, star; wrap: long text; id: an
    identifier that may break anywhere; nowrap: a time kept on one line)."""

    text: str
    badge: str = ""


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    numeric: frozenset[int] = frozenset()  # right-aligned columns
    caption: str = ""
    kind: ClassVar = "table"


@dataclass(frozen=True)
class Note:
    text: str
    kind: ClassVar = "note"


@dataclass(frozen=True)
class ChartRow:
    """Charts side by side (stacked in Markdown)."""

    charts: tuple[Chart, ...]
    kind: ClassVar = "row"


Block = Chart | ChartRow | Table | Note


@dataclass
class Section:
    anchor: str
    title: str
    lead: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> Section:
        self.blocks.extend(blocks)
        return self


@dataclass(frozen=True)
class Kpi:
    label: str
    value: str
    hint: str = ""
    anchor: str = ""  # an element id for the value (tests and links)
    accent: bool = False  # the headline card (highlighted, not a warning)


@dataclass
class Page:
    title: str
    headline: str
    subtitle: str
    registry_line: str
    kpis: list[Kpi]
    sections: list[Section]
    sources: list[str]
    notes: list[str]
    generated_at: str


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Everything the report reads; ``None`` where an input is missing (see ``notes``)."""

    summary: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    comparison: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None
    importances: pd.DataFrame | None = None
    drift: dict[str, Any] | None = None  # metrics/drift.meta.json (housing drift)
    trackers: list[Collected] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _read_inputs(settings: Settings, project: str | None, env: Mapping[str, str] | None) -> Inputs:
    import pandas as pd

    from housing.io import read_json
    from housing.stages.select_best import SELECTION_VALUE

    paths = settings.paths
    got = Inputs()

    def note(path: Path, text: str) -> None:
        try:
            got.notes.append(f"{path.resolve().relative_to(settings.root.resolve())}: {text}")
        except ValueError:
            got.notes.append(f"{path}: {text}")

    def json_file(path: Path, hint: str) -> dict[str, Any] | None:
        try:
            data = read_json(path)
        except HousingError as exc:
            note(path, hint if "file not found" in str(exc) else str(exc))
            return None
        return data if isinstance(data, dict) else None

    def scored(path: Path, hint: str) -> dict[str, Any] | None:
        # A score file's numbers (also under "metrics") merged into its .meta.json record.
        scores, meta = json_file(path, hint), json_file(paths.meta(path), hint)
        return None if scores is None or meta is None else {**meta, **scores, "metrics": scores}

    def csv(path: Path) -> pd.DataFrame | None:
        if not path.is_file():
            note(path, "not found; run `housing evaluate`")
            return None
        try:
            return pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            note(path, f"unreadable ({first_line(exc, ERROR_CHARS)})")
            return None

    got.summary = scored(paths.train_summary, "not found; run `housing select_best`")
    if got.summary is not None:
        got.summary["best_value"] = got.summary.get(SELECTION_VALUE)
    got.test = scored(paths.test_metrics, "not found; run `housing evaluate`")
    got.comparison = csv(paths.comparison)
    got.predictions = csv(paths.predictions)
    got.importances = csv(paths.importances)
    drift_meta = paths.meta(paths.metrics_dir / "drift.json")
    got.drift = json_file(drift_meta, "") if drift_meta.is_file() else None
    got.trackers = _trackers(settings, project, env, got.notes)
    return got


def _trackers(
    settings: Settings, project: str | None, env: Mapping[str, str] | None, notes: list[str]
) -> list[Collected]:
    from housing.reporting.compare import collect_clearml, collect_mlflow

    found: list[Collected] = []
    readers: tuple[tuple[str, Callable[[], Collected]], ...] = (
        ("MLflow", lambda: collect_mlflow(settings, project=project)),
        ("ClearML", lambda: collect_clearml(settings, project=project, env=env)),
    )
    for label, read in readers:
        try:
            got = read()
        except Exception as exc:  # a tracker problem must never stop the report
            notes.append(
                f"{label}: not read ({type(exc).__name__}: {first_line(exc, ERROR_CHARS)})"
            )
            continue
        if got.error is not None:
            notes.append(f"{label}: not read ({got.error})")
        elif got.empty:
            notes.append(f"{label}: {got.note or 'nothing recorded'}")
        if got.skipped:
            notes.append(f"{label}: {len(got.skipped)} unreadable offline session(s) skipped")
        found.append(got)
    return found


# --------------------------------------------------------------------------- build


def build_report(
    settings: Settings,
    *,
    project: str | None = None,
    last_versions: int = DEFAULT_VERSIONS,
    env: Mapping[str, str] | None = None,
) -> ReportResult:
    """Write ``reports/experiments.html`` and ``.md`` (with figures); see the module docstring."""
    if last_versions < 1:
        raise HousingError(f"--last: must be a positive number of versions, got {last_versions}")
    from housing.tracking.stores import check_stores

    check_stores(settings, ("mlflow", "clearml"))  # never read (so re-create) a damaged store
    inputs = _read_inputs(settings, project, env)
    page = _page(settings, inputs, last_versions)
    reports = settings.paths.reports_dir
    html_path = reports / HTML_NAME
    md_path = reports / MARKDOWN_NAME
    figure_paths = _write_figures(reports / FIGURES_DIR, page)
    from housing.io import write_text

    write_text(html_path, render(page, "report.html.j2"))
    write_text(md_path, render(page, "report.md.j2"))
    return ReportResult(
        html_path, md_path, tuple(figure_paths), tuple(page.notes), *_champion(inputs)
    )


def _write_figures(folder: Path, page: Page) -> list[Path]:
    """Every chart of ``page`` as ``folder/<name>.svg``; other SVG files there removed."""
    from housing.io import write_text

    written = []
    for block in (b for section in page.sections for b in section.blocks):
        for chart in block.charts if isinstance(block, ChartRow) else (block,):
            if isinstance(chart, Chart):
                written.append(write_text(folder / f"{chart.name}.svg", chart.svg))
    keep = {p.name for p in written}
    for stale in folder.glob("*.svg"):  # nothing when the folder does not exist
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return written


def _champion(inputs: Inputs) -> tuple[str | None, float | None]:
    test = inputs.test or {}
    model = test.get("model") or (inputs.summary or {}).get("best_model")
    rmse = as_float((test.get("metrics") or {}).get("test/rmse"))
    return (str(model) if model else None), rmse


def _page(settings: Settings, inputs: Inputs, last_versions: int) -> Page:
    metric = settings.selection.metric
    champion, rmse = _champion(inputs)
    test_metrics = (inputs.test or {}).get("metrics") or {}
    candidates = _candidates(inputs)
    trackers = [t for t in inputs.trackers if t.error is None]
    models = _preferred(trackers, "models")
    experiments = _preferred(trackers, "experiments")
    events = _merge_events([e for t in trackers for e in t.champions])
    best_value = as_float((inputs.summary or {}).get("best_value"))
    n_test = (inputs.test or {}).get("n_test")
    runs = _runs(experiments, metric)
    pipeline_runs = [r for r in runs if r["pipeline"]]

    headline = f"Champion: {champion}" if champion else "No champion evaluated yet"
    if champion:
        subtitle = (
            f"Chosen by select_best on {metric}"
            + (f" = {format_metric(best_value)}" if best_value is not None else "")
            + (f", then scored once on the held-out test split ({n_test} rows)." if n_test else ".")
        )
    else:
        subtitle = "Run the pipeline (`housing run`) to train, select and evaluate a model."
    kpis = [
        Kpi("Test RMSE", format_metric(rmse), "champion, test split", "champion-test-rmse", True),
        Kpi("Test MAE", format_metric(test_metrics.get("test/mae")), "champion"),
        Kpi("Test R²", format_metric(test_metrics.get("test/r2")), "champion"),
        Kpi(metric, format_metric(best_value), "selection metric"),
        Kpi("Pipeline runs", str(len(pipeline_runs)) if experiments else DASH, "tracked"),
        Kpi("Model versions", str(len(models)) if models else DASH, "registered"),
    ]
    sections = [
        _comparison_section(candidates, champion, metric),
        _champion_section(inputs, champion),
        _importance_section(inputs, champion),
        _versions_section(models, metric, last_versions),
        _history_section(events, models),
        _runs_section(runs, metric),
        _drift_section(inputs.drift),
        _tuning_section(settings),
    ]
    sources = [_source_line(t) for t in inputs.trackers]
    return Page(
        title=f"housing experiments: {champion or 'no champion yet'}",
        headline=headline,
        subtitle=subtitle,
        registry_line=_registry_line(events, champion, _algorithms(models)),
        kpis=kpis,
        sections=sections,
        sources=sources,
        notes=list(inputs.notes),
        generated_at=_time(datetime.now(UTC), "%Y-%m-%d %H:%M UTC"),
    )


def _preferred(trackers: Sequence[Collected], kind: str) -> list[dict[str, Any]]:
    """Rows of the tracker with the most of ``kind`` (MLflow first on ties)."""
    rows: list[list[dict[str, Any]]] = [getattr(t, kind) for t in trackers]
    return max(rows, key=len, default=[])


def _source_line(got: Collected) -> str:
    name = "MLflow" if got.backend == "mlflow" else "ClearML"
    if got.error is not None:
        return f"{name} ({got.location}): not read: {got.error}"
    unit = "runs" if got.backend == "mlflow" else "tasks"
    return (
        f"{name} {got.source} ({got.location}), project {got.project!r}: "
        f"{len(got.experiments)} {unit}, {len(got.models)} model versions, "
        f"{len(got.champions)} champion decisions"
    )


# --------------------------------------------------------------------------- candidates


def _candidates(inputs: Inputs) -> list[dict[str, Any]]:
    """One row per candidate: val/CV/test metrics from the comparison CSV and summary."""
    rows: dict[str, dict[str, Any]] = {}
    summary = (inputs.summary or {}).get("candidates") or {}
    for name, record in summary.items():
        metrics = record.get("metrics") or {} if isinstance(record, dict) else {}
        rows[str(name)] = {"model": str(name), **metrics}
    tested = (inputs.test or {}).get("candidates") or {}
    for name, metrics in tested.items():
        if isinstance(metrics, dict):
            rows.setdefault(str(name), {"model": str(name)}).update(metrics)
    if inputs.comparison is not None and "model" in inputs.comparison.columns:
        for record in inputs.comparison.to_dict("records"):
            name = str(record["model"])
            row = rows.setdefault(name, {"model": name})
            for key, value in record.items():
                if key != "model" and as_float(value) is not None:
                    row.setdefault(str(key), value)
    return list(rows.values())


def _comparison_section(
    candidates: list[dict[str, Any]], champion: str | None, metric: str
) -> Section:
    section = Section(
        "comparison",
        "Model comparison",
        "Every candidate's RMSE on the holdout validation split, in cross-validation "
        "(mean ± std) and on the test split. Lower is better; the selection uses "
        f"{metric} only — test scores are reported, never used to choose.",
    )
    if not candidates:
        return section.add(Note("No candidates yet: run `housing select_best`."))
    from housing.config import greater_is_better

    sign = -1.0 if greater_is_better(metric) else 1.0
    ordered = sorted(
        candidates,
        key=lambda r: (
            sign * v if (v := as_float(r.get(metric))) is not None else math.inf,
            r["model"],
        ),
    )

    def cv(r: dict[str, Any]) -> str:
        std = as_float(r.get("cv/rmse_std"))
        return format_metric(r.get("cv/rmse_mean")) + (
            f" ± {format_metric(std)}" if std is not None else ""
        )

    def model(r: dict[str, Any]) -> Cell:
        return Cell(f"★ {r['model']}", "star") if r["model"] == champion else Cell(r["model"])

    def test_rmse(r: dict[str, Any]) -> Cell:
        return Cell(format_metric(r.get("test/rmse")), "good" if r["model"] == champion else "")

    return section.add(
        _render(
            "model_comparison",
            "RMSE per candidate",
            "Bars: validation, CV mean (whisker: ± std) and test RMSE; ★ marks the champion.",
            (10.0, 4.2),
            lambda fig: _draw_comparison(fig, ordered, champion),
        ),
        _table(
            ordered,
            [
                ("Model", model),
                ("Val RMSE", lambda r: format_metric(r.get("val/rmse"))),
                ("CV RMSE", cv),
                ("Test RMSE", test_rmse),
                ("Test MAE", lambda r: format_metric(r.get("test/mae"))),
                ("Test R²", lambda r: format_metric(r.get("test/r2"))),
            ],
            range(1, 6),
        ),
    )


def _draw_comparison(fig: Figure, rows: list[dict[str, Any]], champion: str | None) -> None:
    import numpy as np

    ax = fig.add_subplot()
    x = np.arange(len(rows))
    width = 0.26
    series = (
        ("validation", "val/rmse", VAL_COLOR, None),
        ("CV mean ± std", "cv/rmse_mean", CV_COLOR, "cv/rmse_std"),
        ("test", "test/rmse", TEST_COLOR, None),
    )
    top = 0.0
    for i, (label, key, color, err_key) in enumerate(series):
        values = [as_float(r.get(key)) for r in rows]
        heights = [v if v is not None else 0.0 for v in values]
        errors = [(as_float(r.get(err_key)) or 0.0) if err_key else 0.0 for r in rows]
        bars = ax.bar(
            x + (i - 1) * width,
            heights,
            width * 0.92,
            label=label,
            color=color,
            yerr=errors if err_key else None,
            error_kw={"ecolor": "#6B7280", "elinewidth": 1, "capsize": 3},
        )
        labels = [format_metric(v, 2) if v is not None else "" for v in values]
        ax.bar_label(bars, labels=labels, padding=2, fontsize=8, color="#374151")
        top = max([top, *(h + e for h, e in zip(heights, errors, strict=True))])
    ax.set_xticks(x, [("★ " if r["model"] == champion else "") + r["model"] for r in rows])
    for tick, row in zip(ax.get_xticklabels(), rows, strict=True):
        if row["model"] == champion:
            tick.set_fontweight("bold")
            tick.set_color(CHAMPION)
    ax.set(ylabel="RMSE (lower is better)", ylim=(0, top * 1.15 if top > 0 else 1))
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", ncols=3, bbox_to_anchor=(0, 1.12))


# --------------------------------------------------------------------------- champion


def _champion_section(inputs: Inputs, champion: str | None) -> Section:
    name = champion or "the champion"
    section = Section(
        "champion",
        f"{champion or 'The champion'} on the test split",
        "Each point is one house of the test split. Left: predicted against actual price "
        "(the dashed line is a perfect prediction). Right: the error left over, against "
        "the prediction.",
    )
    table = inputs.predictions
    columns = ("actual", "predicted", "residual")
    if table is None or not set(columns) <= set(table.columns) or table.empty:
        return section.add(
            Note("No test predictions (plots/test_predictions.csv): run `housing evaluate`.")
        )
    actual, predicted, residual = (table[c].astype(float).tolist() for c in columns)
    metrics = (inputs.test or {}).get("metrics") or {}
    rmse = as_float(metrics.get("test/rmse")) or math.sqrt(
        sum(r * r for r in residual) / len(residual)
    )
    beyond = sum(abs(r) > 2 * rmse for r in residual)
    return section.add(
        ChartRow(
            (
                _render(
                    "predicted_vs_actual",
                    "Predicted vs actual",
                    f"{name}: predicted vs actual price on the test split.",
                    (5.2, 4.6),
                    lambda fig: _draw_scatter(fig, actual, predicted, metrics),
                ),
                _render(
                    "residuals",
                    "Residuals",
                    f"{name}: residual (actual {MINUS} predicted) against the prediction; "
                    f"green band: \u00b1 one test RMSE ({format_metric(rmse)}); red: the "
                    f"{beyond} house(s) off by more than 2 {TIMES} RMSE.",
                    (5.2, 4.6),
                    lambda fig: _draw_residuals(fig, predicted, residual, rmse),
                ),
            )
        )
    )


def _draw_scatter(
    fig: Figure, actual: list[float], predicted: list[float], metrics: Mapping[str, Any]
) -> None:
    ax = fig.add_subplot()
    low = min(*actual, *predicted)
    high = max(*actual, *predicted)
    pad = (high - low) * 0.04 or 1.0
    lim = (low - pad, high + pad)
    ax.plot(lim, lim, "--", color=MUTED, lw=1.2)
    ax.scatter(actual, predicted, s=22, color=VAL_COLOR, alpha=0.75, edgecolors="white", lw=0.5)
    ax.set(xlim=lim, ylim=lim, aspect="equal", xlabel="actual", ylabel="predicted")
    ax.set_title("Predicted vs actual")
    text = "\n".join(
        f"{label} {format_metric(metrics.get(key))}"
        for label, key in (("RMSE", "test/rmse"), ("MAE", "test/mae"), ("R²", "test/r2"))
        if as_float(metrics.get(key)) is not None
    )
    if text:
        ax.text(
            0.04,
            0.96,
            text,
            transform=ax.transAxes,
            va="top",
            fontsize=9,
            bbox={"boxstyle": "round,pad=0.4", "fc": "#F3F4F6", "ec": "none"},
        )


def _draw_residuals(
    fig: Figure, predicted: list[float], residual: list[float], rmse: float
) -> None:
    ax = fig.add_subplot()
    ax.axhspan(-rmse, rmse, color=TEST_COLOR, alpha=0.10, lw=0)
    ax.axhline(0, color=MUTED, lw=1.2, ls="--")
    outside = [abs(r) > 2 * rmse for r in residual]
    colors = [ACCENT if o else VAL_COLOR for o in outside]
    ax.scatter(predicted, residual, s=22, c=colors, alpha=0.75, edgecolors="white", lw=0.5)
    ax.set(xlabel="predicted", ylabel=f"actual {MINUS} predicted", title="Residuals")


# --------------------------------------------------------------------------- importances


def _importance_section(inputs: Inputs, champion: str | None) -> Section:
    section = Section(
        "importances",
        "Feature importances",
        f"What {champion or 'the champion'} relies on: impurity importances for tree "
        "ensembles, absolute scaled coefficients for linear models.",
    )
    table = inputs.importances
    if table is None or not {"feature", "importance"} <= set(table.columns) or table.empty:
        return section.add(
            Note("No feature importances (plots/feature_importances.csv): run `housing evaluate`.")
        )
    pairs = sorted(
        ((str(f), float(v)) for f, v in zip(table["feature"], table["importance"], strict=True)),
        key=lambda kv: kv[1],
        reverse=True,
    )[:15]
    return section.add(
        _render(
            "feature_importances",
            "Feature importances",
            f"Top {len(pairs)} features of {champion or 'the champion'}.",
            (10.0, 0.9 + 0.27 * len(pairs)),
            lambda fig: _draw_importances(fig, pairs),
        )
    )


def _draw_importances(fig: Figure, pairs: list[tuple[str, float]]) -> None:
    ax = fig.add_subplot()
    names = [p[0] for p in reversed(pairs)]
    values = [p[1] for p in reversed(pairs)]
    colors = [VAL_COLOR if i >= len(values) - 3 else "#A7BCD6" for i in range(len(values))]
    bars = ax.barh(names, values, color=colors, height=0.7)
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=3, fontsize=8)
    ax.grid(axis="y", visible=False)
    ax.set(xlabel="importance", xlim=(0, max(values) * 1.12 if values and max(values) > 0 else 1))


# --------------------------------------------------------------------------- versions


def _versions_section(models: list[dict[str, Any]], metric: str, last: int) -> Section:
    section = Section(
        "versions",
        "Metrics across model versions",
        f"How {metric} and the validation RMSE moved over the last {last} registered versions "
        "of each model (a new version per pipeline run); ★ marks the version holding the "
        "champion.",
    )
    if not models:
        return section.add(
            Note("No registered model versions: tracking is off or nothing was registered yet.")
        )
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in models:
        if str(row.get("version") or "").isdigit():
            by_name.setdefault(str(row["name"]), []).append(row)
    series = {
        name: sorted(rows, key=lambda r: int(r["version"]))[-last:]
        for name, rows in sorted(
            by_name.items(), key=lambda kv: (not kv[0].endswith("-best"), kv[0])
        )
    }
    keys = list(dict.fromkeys((metric, "val/rmse")))
    chart = _render(
        "version_metrics",
        "Metrics by version",
        f"{' and '.join(keys)} per registered model, by version.",
        (10.0, 4.0),
        lambda fig: _draw_versions(fig, series, keys),
    )

    def version(r: dict[str, Any]) -> Cell:
        return Cell(f"★ v{r['version']}", "star") if r.get("champion") else Cell(f"v{r['version']}")

    return section.add(
        chart,
        _table(
            [r for versions in series.values() for r in reversed(versions)],
            [
                ("Registry name", lambda r: str(r["name"])),
                ("Version", version),
                ("Algorithm", lambda r: str(r.get("algorithm") or "")),
                ("Registered (UTC)", lambda r: Cell(_time(r.get("created")), "nowrap")),
                *((k, lambda r, k=k: format_metric(r.get(k))) for k in keys),
                ("Data", lambda r: Cell(str(r.get("data_md5") or "")[:8], "muted")),
                ("Git", lambda r: Cell(str(r.get("git_commit") or "")[:10], "muted")),
            ],
            {1, *range(4, 4 + len(keys))},
        ),
    )


def _draw_versions(
    fig: Figure, series: Mapping[str, list[dict[str, Any]]], keys: Sequence[str]
) -> None:
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(1, len(keys), sharex=True, squeeze=False)[0]
    for j, (ax, key) in enumerate(zip(axes, keys, strict=True)):
        for i, (name, rows) in enumerate(series.items()):
            values = [(int(r["version"]), as_float(r.get(key))) for r in rows]
            points = [(x, y) for x, y in values if y is not None]
            if not points:
                continue
            best = name.endswith("-best")
            shift = (i - (len(series) - 1) / 2) * DODGE
            xs = [x + shift for x, _ in points]
            ys = [y for _, y in points]
            color = INK if best else LINE_COLORS[i % len(LINE_COLORS)]
            ax.plot(
                xs,
                ys,
                marker="o" if best else MARKERS[i % len(MARKERS)],
                ms=6 if best else 5,
                mfc="white" if not best else color,
                lw=2.4 if best else 1.6,
                ls="-" if best else DASHES[i % len(DASHES)],
                color=color,
                label=name,
                zorder=3 if best else 2,
                gid=f"series-{j}-{i}",  # tests find each line by it
            )
            for r, (x, y) in zip(rows, values, strict=True):
                if r.get("champion") and y is not None:
                    ax.plot(
                        [x + shift],
                        [y],
                        marker="*",
                        ms=15,
                        color=CHAMPION_STAR,
                        mec=CHAMPION,
                        mew=0.8,
                        zorder=4,
                        lw=0,
                    )
        ax.set(title=key, xlabel="version")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(x=0.08, y=0.15)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5))


# --------------------------------------------------------------------------- champion history


def _merge_events(events: Iterable[ChampionEvent]) -> list[ChampionEvent]:
    """One decision per (registry, version, outcome); ``backend`` lists all that recorded it."""
    merged: dict[tuple[str, str, bool], ChampionEvent] = {}
    for event in sorted(events, key=lambda e: (e.backend != "mlflow", e.decided_at)):
        key = (event.registry_name, event.version, event.promoted)
        first = merged.setdefault(key, event)
        if first is not event:
            merged[key] = replace(first, backend=f"{first.backend}, {event.backend}")
    return sorted(merged.values(), key=lambda e: (e.decided_at, e.registry_name))


def _history_section(decisions: list[ChampionEvent], models: list[dict[str, Any]]) -> Section:
    section = Section(
        "history",
        "Champion history",
        "Every champion decision: the challenger (the run's best model), the champion it "
        "faced, the change in the selection metric, and whether it took over.",
    )
    if not decisions:
        return section.add(
            Note("No champion decisions recorded (MLflow champion.* tags, ClearML champions.json).")
        )
    algorithm = _algorithms(models)

    def label(name: str, version: str | None, fallback: str = "") -> str:
        algo = algorithm.get((name, version or "")) or fallback
        return "—" if version is None else _version(version, algo)

    by_name: dict[str, list[ChampionEvent]] = {}
    for e in decisions:
        by_name.setdefault(e.registry_name, []).append(e)
    several = len(by_name) > 1
    per_row_source = len({e.backend for e in decisions}) > 1
    section.add(
        _render(
            "champion_history",
            "Champion history",
            "Challengers by decision; filled: promoted, hollow: rejected; the step line is "
            "the champion's value.",
            (10.0, 3.2),
            lambda fig: _draw_history(fig, by_name),
        )
    )

    def change(e: ChampionEvent) -> str:
        if e.change is None:
            return "first"
        rel = f" ({signed(100 * e.change / e.previous_value, 1)}%)" if e.previous_value else ""
        return signed(e.change) + rel

    def faced(e: ChampionEvent) -> str:
        faced = label(e.registry_name, e.previous_version)
        return faced + (
            f": {format_metric(e.previous_value)}" if e.previous_value is not None else ""
        )

    columns: list[tuple[str, Callable[[Any], Cell | str]]] = [
        ("Decided (UTC)", lambda e: Cell(_time(e.decided_at), "nowrap")),
        ("Challenger", lambda e: label(e.registry_name, e.version, e.model)),
        (decisions[-1].metric or "value", lambda e: format_metric(e.value)),
        ("Champion faced", faced),
        ("Change", change),
        (
            "Decision",
            lambda e: Cell("promoted", "good") if e.promoted else Cell("rejected", "muted"),
        ),
        ("Reason", lambda e: Cell(e.reason, "wrap")),
    ]
    if several:
        columns.insert(1, ("Registry name", lambda e: e.registry_name))
    if per_row_source:
        columns.append(("Source", lambda e: Cell(e.backend, "muted")))
    caption = _history_caption(decisions, several, per_row_source)
    return section.add(_table(reversed(decisions), columns, {2 + several, 4 + several}, caption))


def _history_caption(decisions: Sequence[ChampionEvent], several: bool, per_row: bool) -> str:
    parts = [] if several else [f"Registry: {decisions[0].registry_name}"]
    if not per_row:
        names = {"mlflow": "MLflow", "clearml": "ClearML"}
        backends = decisions[0].backend.split(", ")
        parts.append("recorded by " + " and ".join(names.get(b, b) for b in backends))
    return "; ".join(parts)


def _draw_history(fig: Figure, by_name: Mapping[str, list[ChampionEvent]]) -> None:
    ax = fig.add_subplot()
    ticks: list[str] = []
    x = 0
    for i, (name, decisions) in enumerate(by_name.items()):
        color = LINE_COLORS[i % len(LINE_COLORS)] if len(by_name) > 1 else VAL_COLOR
        champion_x: list[float] = []
        champion_y: list[float] = []
        current: float | None = None
        for e in decisions:
            if e.previous_value is not None and current is None:
                current = e.previous_value
            if e.promoted and e.value is not None:
                current = e.value
            if current is not None:
                champion_x.append(x)
                champion_y.append(current)
            if e.value is not None:
                ax.scatter(
                    [x],
                    [e.value],
                    s=70,
                    zorder=3,
                    color=TEST_COLOR if e.promoted else "white",
                    edgecolors=TEST_COLOR if e.promoted else MUTED,
                    linewidths=1.6,
                )
                change = e.change
                verdict = "promoted" if e.promoted else "rejected"
                note = f"{verdict}: " + ("first" if change is None else signed(change))
                ax.annotate(
                    f"{note}\n{format_metric(e.value)}",
                    (x, e.value),
                    textcoords="offset points",
                    xytext=(9, 0),
                    ha="left",
                    va="center",
                    fontsize=8,
                    color=TEST_COLOR if e.promoted else "#6B7280",
                )
            date = _time(e.decided_at, "%m-%d %H:%M", "")
            ticks.append(f"{name.rsplit('-', 1)[-1]} v{e.version}\n{date}")
            x += 1
        if champion_x:
            ax.step(
                champion_x, champion_y, where="post", color=color, lw=1.8, alpha=0.7, label=name
            )
    ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
    metric = next((e.metric for es in by_name.values() for e in es if e.metric), "")
    ax.set(ylabel=metric or "selection metric", xlim=(-0.5, max(len(ticks), 3) - 0.3))
    ax.margins(y=0.25)
    ax.grid(axis="x", visible=False)
    if len(by_name) > 1:
        ax.legend(loc="upper right")


def _registry_line(
    decisions: list[ChampionEvent], champion: str | None, algorithms: Mapping[tuple[str, str], str]
) -> str:
    """Who holds the champion in the registry now, since when, and the latest decision."""
    best = [e for e in decisions if e.registry_name.endswith("-best")] or decisions
    if not best:
        return ""
    promoted = [e for e in best if e.promoted]
    latest = best[-1]
    parts = []
    if promoted:
        holder = promoted[-1]
        parts.append(
            f"Registry: {holder.registry_name} {_version(holder.version, holder.model)} holds "
            f"the champion since {_time(holder.decided_at, '%Y-%m-%d %H:%M UTC')}"
        )
        if holder.previous_version is not None and holder.change is not None:
            before = algorithms.get((holder.registry_name, holder.previous_version), "")
            parts[-1] += (
                f", replacing {_version(holder.previous_version, before)}: {holder.metric} "
                f"{format_metric(holder.previous_value)} → {format_metric(holder.value)} "
                f"({signed(holder.change)})"
            )
        if champion and holder.model and holder.model != champion:
            parts.append(
                f"the evaluated model ({champion}) is not the registry champion: the last "
                "run's best was not promoted"
            )
    if not latest.promoted:
        parts.append(f"latest challenger v{latest.version} rejected: {latest.reason}")
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------- runs


def _runs(experiments: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Tracked runs (tasks grouped by pipeline_run_id), newest first; ``pipeline``: it ran
    more than one stage (a stage run by hand is a run of its own, not a pipeline run)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in experiments:
        key = str(row.get("pipeline_run_id") or row.get("task_id"))
        groups.setdefault(key, []).append(row)
    runs = []
    for run_id, rows in groups.items():
        starts = [t for r in rows if (t := parse_time(r.get("started"))) is not None]
        ends = [t for r in rows if (t := parse_time(r.get("completed"))) is not None]
        select = next((r for r in rows if r.get("stage") == "select_best"), None)
        evaluate = next((r for r in rows if r.get("stage") == "evaluate"), None)
        statuses = [str(r.get("status") or "") for r in rows]
        runs.append(
            {
                "run_id": run_id,
                "started": min(starts) if starts else None,
                "seconds": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
                "tasks": len(rows),
                "pipeline": len({r.get("stage") for r in rows}) > 1,
                "failed": sum(s == "failed" for s in statuses),
                "open": sum(s in ("open", "in_progress") for s in statuses),
                "model": str((select or evaluate or {}).get("model") or ""),
                "metric": as_float((select or {}).get(metric)),
                "test_rmse": as_float((evaluate or {}).get("test/rmse")),
            }
        )
    return sorted(
        runs, key=lambda r: r["started"] or datetime.min.replace(tzinfo=UTC), reverse=True
    )


def _runs_section(runs: list[dict[str, Any]], metric: str) -> Section:
    section = Section(
        "runs",
        "Recent pipeline runs",
        "Each run: its stages as tracked, the model select_best picked, and its test score.",
    )
    pipeline_runs = [r for r in runs if r["pipeline"]]
    single = len(runs) - len(pipeline_runs)
    caption = f"Not listed: {single} single-stage run(s) (a stage run by hand)." if single else ""
    if not pipeline_runs:
        return section.add(
            Note("No tracked pipeline runs (tracking off or not run yet). " + caption)
        )

    def status(r: dict[str, Any]) -> Cell:
        if r["failed"]:
            return Cell(f"{r['failed']} failed", "bad")
        return Cell(f"{r['open']} open", "muted") if r["open"] else Cell("completed", "good")

    return section.add(
        _table(
            pipeline_runs[:15],
            [
                ("Run", lambda r: Cell(r["run_id"], "id")),
                ("Started (UTC)", lambda r: Cell(_time(r["started"]), "nowrap")),
                (
                    "Duration",
                    lambda r: f"{r['seconds']:.1f} s" if r["seconds"] is not None else DASH,
                ),
                ("Stages", lambda r: str(r["tasks"])),
                ("Status", status),
                ("Selected", lambda r: r["model"] or DASH),
                (metric, lambda r: format_metric(r["metric"])),
                ("Test RMSE", lambda r: format_metric(r["test_rmse"])),
            ],
            {2, 3, 6, 7},
            caption,
        )
    )


# --------------------------------------------------------------------------- drift


_DRIFT_ORIGINS: Final = {"drift": "housing drift", "predict": "housing predict"}


def _drift_section(meta: dict[str, Any] | None) -> Section:
    section = Section(
        "drift",
        "Drift",
        "The last drift check (metrics/drift.json): each feature of the checked data "
        "against the reference profile of the data the model was trained on. PSI compares "
        "the shares of rows in the reference's quantile bins; a feature drifts when its PSI "
        "reaches the threshold and a two-sample KS test says the shift is not noise.",
    )
    if not meta or not isinstance(meta.get("features"), dict) or not meta["features"]:
        return section.add(Note("No drift check yet: run `housing drift --input FILE`."))
    features: dict[str, dict[str, Any]] = meta["features"]
    model = f"{meta.get('model') or DASH} v{meta.get('version') or DASH}"
    drifting = [str(n) for n in meta.get("drifting") or []]
    verdict = f"drifting: {', '.join(drifting)}" if drifting else "no feature drifts"
    section.add(
        Note(
            f"{meta.get('input')} ({meta.get('rows')} rows, checked by "
            f"{_DRIFT_ORIGINS.get(str(meta.get('origin')), meta.get('origin'))}) against "
            f"{model}'s reference ({meta.get('n_reference')} rows): {verdict} "
            f"(PSI ≥ {meta.get('psi_threshold')} and KS p < {meta.get('p_value')}); "
            f"{_time(meta.get('created_at'))}."
        )
    )
    ranked = sorted(features.items(), key=lambda kv: -(as_float(kv[1].get("psi")) or 0.0))

    def flag(item: tuple[str, dict[str, Any]]) -> Cell:
        return Cell("drifting", "bad") if item[1].get("drifting") else Cell("stable", "muted")

    columns: list[tuple[str, Callable[[Any], Cell | str]]] = [
        ("feature", lambda kv: kv[0]),
        ("PSI", lambda kv: format_metric(kv[1].get("psi"))),
        ("KS p-value", lambda kv: f"{as_float(kv[1].get('ks_pvalue')) or 0.0:.3g}"),
        ("", flag),
    ]
    section.add(_table(ranked, columns, {1, 2}))
    charts = [
        drift_chart(
            name,
            [str(b) for b in item.get("bins") or []],
            [float(v) for v in item.get("reference") or []],
            [float(v) for v in item.get("current") or []],
            as_float(item.get("psi")) or 0.0,
        )
        for name, item in ranked
        if item.get("drifting")
    ]
    for start in range(0, len(charts), 2):
        section.add(ChartRow(tuple(charts[start : start + 2])))
    return section


def drift_chart(
    feature: str,
    bins: Sequence[str],
    reference: Sequence[float],
    current: Sequence[float],
    psi: float,
) -> Chart:
    """One feature's share of rows per reference bin, reference against current data
    (``housing drift`` writes it to ``plots/drift/``; the report's Drift section shows it)."""
    from housing.drift import plot_stem

    return _render(
        f"drift-{plot_stem(feature)}",
        f"Drift: {feature}",
        f"{feature}: share of rows per reference quantile bin, training data against the "
        f"checked data (PSI {psi:.3f}).",
        (5.2, 3.6),
        lambda fig: _draw_drift(fig, bins, reference, current),
    )


def _draw_drift(
    fig: Figure, bins: Sequence[str], reference: Sequence[float], current: Sequence[float]
) -> None:
    ax = fig.add_subplot()
    positions = list(range(len(bins)))
    width = 0.4
    ax.bar([p - width / 2 for p in positions], reference, width, label="reference", color=VAL_COLOR)
    ax.bar([p + width / 2 for p in positions], current, width, label="current", color=CV_COLOR)
    ax.set_xticks(positions, bins, rotation=45, ha="right", fontsize=7)
    ax.set(ylabel="share of rows")
    ax.legend(loc="upper left", fontsize=8)


# --------------------------------------------------------------------------- rendering figures


def _tuning_section(settings: Settings) -> Section:
    """The latest study of each model in the Optuna journal: best vs default CV RMSE, the
    optimization history and the parameter importances."""
    from housing.io import relpath
    from housing.tuning import load_studies

    journal = settings.tune.storage
    section = Section(
        "tuning",
        "Hyperparameter tuning",
        "Optuna studies (`housing tune`), scored by the same CV RMSE as selection on the "
        f"train split; the latest study per model from {relpath(journal, settings.root)}.",
    )
    latest = {s.model: s for s in load_studies(journal)}  # oldest first: the last one wins
    studies = [s for s in latest.values() if s.best is not None]
    if not studies:
        return section.add(Note("No tuning studies yet: run `housing tune model=NAME`."))

    def value(v: float | None) -> str:
        return format_metric(v) if v is not None else DASH

    def params(s: Any) -> Cell:
        best = s.best.params if s.best else {}
        text = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items()
        )
        return Cell(text, "wrap")

    def gain(s: Any) -> str:
        best = s.best.value if s.best else None
        return (
            signed(s.default_value - best)
            if s.default_value is not None and best is not None
            else DASH
        )

    columns: list[tuple[str, Callable[[Any], Cell | str]]] = [
        ("model", lambda s: s.model),
        ("trials", lambda s: f"{sum(t.value is not None for t in s.trials)} / {len(s.trials)}"),
        ("best cv/rmse_mean", lambda s: value(s.best.value if s.best else None)),
        ("default", lambda s: value(s.default_value)),
        ("improvement", gain),
        ("best params", params),
        ("study", lambda s: Cell(s.name, "id")),
    ]
    caption = "trials: complete / all (pruned and failed ones have no value)."
    section.add(_table(studies, columns, {1, 2, 3, 4}, caption))
    for study in studies:
        charts = [
            _render(
                f"tuning_history_{study.model}",
                f"{study.model}: optimization history",
                "CV RMSE per complete trial and the best so far; dashed: the defaults.",
                (6.0, 3.2),
                functools.partial(_draw_tuning_history, study=study),
            )
        ]
        if study.importances:
            pairs = list(study.importances.items())[:10]
            charts.append(
                _render(
                    f"tuning_importances_{study.model}",
                    f"{study.model}: parameter importances",
                    "Optuna's fANOVA importances of the searched parameters.",
                    (6.0, 0.9 + 0.27 * len(pairs)),
                    functools.partial(_draw_importances, pairs=pairs),
                )
            )
        section.add(ChartRow(tuple(charts)))
    return section


def _draw_tuning_history(fig: Figure, study: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax = fig.add_subplot()
    done = [t for t in study.trials if t.value is not None]
    numbers = [t.number for t in done]
    values = [float(t.value) for t in done]
    best = [min(values[: i + 1]) for i in range(len(values))]
    ax.scatter(numbers, values, s=16, color="#A7BCD6", label="trial")
    ax.step(numbers, best, where="post", color=VAL_COLOR, label="best so far")
    if study.default_value is not None:
        ax.axhline(study.default_value, color=ACCENT, ls="--", lw=1, label="defaults")
    ax.set(xlabel="trial", ylabel="cv/rmse_mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper right", fontsize=8)


def _render(
    name: str,
    title: str,
    caption: str,
    size: tuple[float, float],
    draw: Callable[[Figure], None],
) -> Chart:
    """Draw on a fresh matplotlib Figure (no pyplot) and keep it as an SVG document."""
    import matplotlib as mpl
    from matplotlib.figure import Figure

    salt: Any = {"svg.hashsalt": f"housing-{name}"}  # deterministic, distinct ids
    with mpl.rc_context(salt, fname=Path(__file__).with_name("templates") / "report.mplstyle"):
        fig = Figure(figsize=size, layout="constrained")
        draw(fig)
        buffer = io.StringIO()
        fig.savefig(
            buffer,
            format="svg",
            metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
        )
    return Chart(name=name, title=title, caption=caption, svg=buffer.getvalue())


_XMLNS = re.compile(r'\s+xmlns(?::\w+)?="[^"]*"')
_SIZE = re.compile(r'\s+(width|height)="[^"]*pt"')


def inline_svg(svg: str, prefix: str, label: str) -> str:
    """An SVG document as an element for HTML: no prolog, ids scoped by ``prefix``, fluid."""
    body = svg[svg.index("<svg") :]
    ids = set(re.findall(r'\sid="([^"]+)"', body))
    body = re.sub(r'(\sid=")([^"]+)"', lambda m: f'{m[1]}{prefix}-{m[2]}"', body)
    body = re.sub(
        r'((?:xlink:)?href)="#([^"]+)"',
        lambda m: f'{m[1]}="#{prefix}-{m[2]}"' if m[2] in ids else m[0],
        body,
    )
    body = re.sub(
        r"url\(#([^)]+)\)",
        lambda m: f"url(#{prefix}-{m[1]})" if m[1] in ids else m[0],
        body,
    )
    head_end = body.index(">")
    head = _SIZE.sub("", _XMLNS.sub("", body[:head_end]))
    attrs = f' class="chart" role="img" aria-label="{html.escape(label, quote=True)}"'
    return head + attrs + body[head_end:]


# --------------------------------------------------------------------------- pages


def render(page: Page, template: str) -> str:
    """``page`` through ``templates/<template>`` (HTML autoescaped, CSS inlined)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
    from markupsafe import Markup

    env = Environment(
        loader=PackageLoader("housing.reporting"),
        autoescape=select_autoescape(("html.j2",)),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["svg"] = lambda c: Markup(inline_svg(c.svg, c.name, c.title))
    env.filters["md"] = _md
    return env.get_template(template).render(page=page, figures=FIGURES_DIR)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- helpers


def format_metric(value: Any, digits: int = 3) -> str:
    """A metric as the report prints it (``2.801``); an en dash when missing."""
    number = as_float(value)
    return DASH if number is None else f"{number:.{digits}f}"


def _table(
    items: Iterable[Any],
    columns: Sequence[tuple[str, Callable[[Any], Cell | str]]],
    numeric: Iterable[int],
    caption: str = "",
) -> Table:
    """One row per item, one cell per (header, cell of an item) column."""
    rows = tuple(
        tuple(c if isinstance(c := cell(item), Cell) else Cell(c) for _, cell in columns)
        for item in items
    )
    return Table(tuple(h for h, _ in columns), rows, frozenset(numeric), caption)


def _algorithms(models: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], str]:
    """(registry name, version) -> algorithm."""
    return {(str(m["name"]), str(m["version"])): str(m.get("algorithm") or "") for m in models}


def _version(version: str, algorithm: str) -> str:
    """``v3 (ridge)``, or ``v3`` when the algorithm is unknown."""
    return f"v{version}" + (f" ({algorithm})" if algorithm else "")


def signed(value: float, digits: int = 3) -> str:
    """``+0.120`` / ``-1.178`` with a real minus sign (U+2212)."""
    return f"{value:+.{digits}f}".replace("-", MINUS)


def _time(value: Any, fmt: str = "%Y-%m-%d %H:%M", missing: str = DASH) -> str:
    """``value`` (as :func:`parse_time` reads it) in UTC as ``fmt``; ``missing`` when unknown."""
    parsed = parse_time(value)
    return parsed.astimezone(UTC).strftime(fmt) if parsed else missing
