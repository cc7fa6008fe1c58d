"""The experiments report (housing.reporting.report): content, graceful degradation, and
how it renders in headless Chromium (no console errors, figures drawn as checked by
tests/browser.py's FIGURE_CHECK, champion RMSE shown).

The tracked project comes from the real pipeline runs of tests/test_compare.py (run once
per session).
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from housing.cli import main
from housing.config import load_settings
from housing.reporting.report import ReportResult, build_report, format_metric
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
    run = browser.dump_dom(executable, report.html_path, script=browser.FIGURE_CHECK)
    assert run.errors == [], run.errors
    body = re.search(r"<body[^>]*>", run.dom)
    assert body is not None
    assert f'data-figures="{len(FIGURES)}/{len(FIGURES)}"' in body.group(0), body.group(0)
    assert 'data-render-check="ok"' in body.group(0)
    shown = format_metric(tracked.files["run-2"]["test_metrics.json"]["metrics"]["test/rmse"])
    assert re.search(rf'id="champion-test-rmse"[^>]*>{re.escape(shown)}<', run.dom)

    png = browser.screenshot(executable, report.html_path, tmp_path / "report.png", (1200, 3000))
    assert browser.png_size(png) == (1200, 3000)
    # A blank or unstyled page has a handful of colors; charts and the hero add thousands.
    assert browser.distinct_colors(png) > 500
