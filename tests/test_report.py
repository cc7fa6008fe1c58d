"""The experiments report (housing.reporting.report): content, graceful degradation, and
how it renders in headless Chromium (no console errors, figures drawn as checked by
tests/browser.py's FIGURE_CHECK, champion RMSE shown; at 1400x900, as LAYOUT_CHECK
measures: no table wider than its wrapper, legends inside their figures, metric cards not
in an error colour; a viewport and a full-height screenshot).

The tracked project comes from the real pipeline runs of tests/test_compare.py (run once
per session).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from housing import runs
from housing.cli import main
from housing.config import load_settings
from housing.entry import settle_clearml
from housing.reporting.report import (
    ACCENT,
    CHAMPION,
    ReportResult,
    build_report,
    format_metric,
)
from housing.runner import execute_stage
from tests import browser
from tests.test_compare import Tracked, tracked_project

from .conftest import CONF, require_tool

FIGURES = (
    "model_comparison",
    "predicted_vs_actual",
    "residuals",
    "feature_importances",
    "version_metrics",
    "champion_history",
)
# Anything the page would fetch: src/href to a URL, CSS url()/@import, a protocol-relative link.
EXTERNAL = re.compile(
    r"""(?:\b(?:src|href|xlink:href|action|poster)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//))"""
    r"""|url\(\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//)|@import""",
    re.IGNORECASE,
)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    return tracked_project(tmp_path_factory)


@pytest.fixture(scope="module")
def report(tracked: Tracked) -> ReportResult:
    return build_report(tracked.settings())


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def chromium() -> str:
    executable = browser.find_chromium()
    return executable or require_tool(list(browser.CANDIDATES), browser.INSTALL_HINT)


def test_report_without_inputs_degrades_gracefully(tmp_path: Path) -> None:
    settings = load_settings(["tracking=none", "clearml.mode=offline"], CONF, root=tmp_path)
    result = build_report(settings)
    page = result.html_path.read_text()
    assert result.html_path == tmp_path / "reports" / "experiments.html"
    assert result.markdown_path.is_file()
    assert result.champion is None and result.champion_test_rmse is None
    assert "No champion evaluated yet" in page
    notes = " ".join(result.notes)
    for missing in ("metrics/test_metrics.json", "plots/test_predictions.csv", "MLflow"):
        assert missing in notes
    assert "<script" not in page and "<link" not in page  # no test code, no external file
    assert ".kpi .value {" in page  # templates/report.css, inlined
    assert result.figure_paths == ()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".clearml").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_report_content(tracked: Tracked, report: ReportResult) -> None:
    test = tracked.files["run-2"]["test_metrics.json"]
    assert report.champion == test["model"] == "random_forest"
    assert report.champion_test_rmse == test["metrics"]["test/rmse"]
    page = report.html_path.read_text()
    shown = format_metric(test["metrics"]["test/rmse"])
    assert f'id="champion-test-rmse">{shown}<' in page
    assert page.count("<svg") == len(FIGURES)
    assert EXTERNAL.search(page) is None, EXTERNAL.search(page)
    assert "<link" not in page and "<img" not in page and "<script" not in page
    for name in FIGURES:
        assert f'id="fig-{name}"' in page
    # Every id is unique once the figures are inlined together.
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    # Champion history: ridge (v1) replaced by random_forest (v2), both recorded by both.
    assert "v1 (ridge)" in page and "v2 (random_forest)" in page
    assert "recorded by MLflow and ClearML" in page
    markdown = report.markdown_path.read_text()
    assert shown in markdown
    for name in FIGURES:
        figure = report.markdown_path.parent / "experiments_figures" / f"{name}.svg"
        assert f"(experiments_figures/{name}.svg)" in markdown
        assert figure.is_file() and figure.read_text().lstrip().startswith("<?xml")
    assert len(report.figure_paths) == len(FIGURES)
    # The champion (star, tick label) wears the champion colours, not the error red.
    folder = report.markdown_path.parent / "experiments_figures"
    for name in ("model_comparison", "version_metrics"):
        svg = (folder / f"{name}.svg").read_text().lower()
        assert ACCENT.lower() not in svg, name
        assert CHAMPION.lower() in svg, name
    assert "#f5b400" in (folder / "version_metrics.svg").read_text().lower()


def series_styles(svg: str, axis: int) -> dict[str, tuple[str, str, str]]:
    """Each line of one axes of the version figure: gid -> (path data, stroke, dash)."""
    found = {}
    for gid, body in re.findall(rf'<g id="(series-{axis}-\d+)">(.*?)</g>', svg, re.DOTALL):
        path = re.search(r'<path d="([^"]*)"[^>]*style="([^"]*)"', body)
        assert path is not None, body
        style = dict(
            (k.strip(), v.strip()) for k, v in (p.split(":", 1) for p in path[2].split(";"))
        )
        found[gid] = (path[1], style.get("stroke", ""), style.get("stroke-dasharray", "solid"))
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_coinciding_version_lines_stay_distinguishable(report: ReportResult) -> None:
    # ridge and linear_regression have equal metrics at v1 (same data, both linear): their
    # lines would coincide; each series has its own dash pattern and a small sideways dodge.
    svg = (report.markdown_path.parent / "experiments_figures" / "version_metrics.svg").read_text()
    for axis in (0, 1):
        lines = series_styles(svg, axis)
        assert len(lines) == 4, lines  # housing-best, -linear_regression, -random_forest, -ridge
        paths = [d for d, _, _ in lines.values()]
        looks = [(stroke, dash) for _, stroke, dash in lines.values()]
        assert len(set(paths)) == len(paths) and len(set(looks)) == len(looks), lines
        assert len({dash for _, dash in looks}) == len(looks), looks  # not by colour alone


@pytest.mark.slow
@pytest.mark.integration
def test_report_entry_point(
    tracked: Tracked,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tracked.copy(tmp_path / "project")
    shutil.copytree(tracked.root / "metrics", root / "metrics")
    shutil.copytree(tracked.root / "plots", root / "plots")
    monkeypatch.chdir(root)
    assert main(["report", "--config-dir", str(CONF), "--last", "1", "clearml.mode=offline"]) == 0
    out = capsys.readouterr().out
    assert "champion random_forest" in out and (root / "reports" / "experiments.html").is_file()


@pytest.mark.slow
@pytest.mark.integration
def test_report_renders_in_headless_chromium(
    tracked: Tracked, report: ReportResult, tmp_path: Path
) -> None:
    executable = chromium()
    run = browser.dump_dom(
        executable,
        report.html_path,
        script=browser.FIGURE_CHECK + browser.LAYOUT_CHECK,
        size=(1400, 900),
    )
    assert run.errors == [], run.errors
    body = re.search(r"<body[^>]*>", run.dom)
    assert body is not None
    assert f'data-figures="{len(FIGURES)}/{len(FIGURES)}"' in body.group(0), body.group(0)
    assert 'data-render-check="ok"' in body.group(0)
    shown = format_metric(tracked.files["run-2"]["test_metrics.json"]["metrics"]["test/rmse"])
    assert re.search(rf'id="champion-test-rmse"[^>]*>{re.escape(shown)}<', run.dom)

    found = browser.layout(run)
    # At 1400x900 no table is cut behind a scrollbar: each wrapper fits its table.
    assert {"comparison", "versions", "history", "runs"} <= {t["section"] for t in found["tables"]}
    assert [t for t in found["tables"] if t["scroll"] > t["client"]] == [], found["tables"]
    # Legends (model comparison, versions) lie inside their figures.
    assert len(found["legends"]) == 2, found["legends"]
    assert all(legend["inside"] for legend in found["legends"]), found["legends"]
    assert_healthy_cards(found["kpis"])

    top = browser.screenshot(executable, report.html_path, tmp_path / "top.png", (1400, 900))
    assert browser.png_size(top) == (1400, 900)
    full_size = (1400, int(found["height"]))
    png = browser.screenshot(executable, report.html_path, tmp_path / "full.png", full_size)
    assert browser.png_size(png) == full_size
    # A blank or unstyled page has a handful of colors; charts and the hero add thousands.
    assert browser.distinct_colors(png) > 500


ERROR_COLORS = ("rgb(228, 87, 86)", "rgb(180, 35, 24)")  # --accent, --bad


def assert_healthy_cards(kpis: list[dict[str, str]]) -> None:
    """A healthy run's metric cards: values shown, none in an error colour or class."""
    assert [k["label"] for k in kpis][:3] == ["Test RMSE", "Test MAE", "Test R²"], kpis
    for kpi in kpis:
        assert kpi["color"] not in ERROR_COLORS and "bad" not in kpi["cls"], kpi
        assert kpi["text"].strip() not in ("", "\u2013"), kpi


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_runs_count_pipeline_runs_only(
    tracked: Tracked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tracked project's two pipeline runs, then a third with an id as `housing repro`
    # makes them (select_best + evaluate), then evaluate run by hand: a run of its own.
    root = tracked.copy(tmp_path / "project")
    shutil.copytree(tracked.root / "metrics", root / "metrics")
    shutil.copytree(tracked.root / "plots", root / "plots")
    shutil.copytree(tracked.root / "models", root / "models")
    shutil.copytree(tracked.root / "data", root / "data")
    shutil.copytree(tracked.root / "mlruns", root / "mlruns")
    for name in ("mlflow.db.parents.json",):
        if (tracked.root / name).is_file():
            shutil.copy2(tracked.root / name, root / name)
    monkeypatch.chdir(root)
    for key in [k for k in os.environ if k.startswith(("CLEARML_", "TRAINS_", "MLFLOW_"))]:
        monkeypatch.delenv(key)
    settings = tracked.settings(
        "tracking=both", "selection.candidates=[linear_regression,ridge,random_forest]", root=root
    )
    settle_clearml(settings)  # as a stage process's start-up does
    long_id = "20261203T073730473849Z-41951561"
    monkeypatch.setenv("HOUSING_RUN_ID", long_id)
    for stage in ("select_best", "evaluate"):
        execute_stage(stage, settings, context=runs.current())
    monkeypatch.delenv("HOUSING_RUN_ID")
    execute_stage("evaluate", settings, context=runs.current())

    result = build_report(settings)
    page = result.html_path.read_text()
    kpi = re.search(r'Pipeline runs</span><span class="value">(\d+)<', page)
    assert kpi is not None and kpi.group(1) == "3", kpi
    table = page[page.index('id="runs"') :]
    assert "Not listed: 1 single-stage run(s)" in table
    assert [long_id, "run-2", "run-1"] == re.findall(r'<span class="id">([^<]+)</span>', table)
    # The long run id wraps: the table still fits at 1400x900.
    run = browser.dump_dom(chromium(), result.html_path, script=browser.LAYOUT_CHECK)
    found = browser.layout(run)
    assert [t for t in found["tables"] if t["scroll"] > t["client"]] == [], found["tables"]
    assert_healthy_cards(found["kpis"])
