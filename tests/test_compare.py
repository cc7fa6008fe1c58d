"""Exports of tracked experiments and models (housing.reporting.compare).

Inputs come from REAL pipeline runs (``run_all`` with MLflow on a sqlite store and ClearML
offline sessions, in a temporary root), run once per test session by
:func:`tracked_project` (test_report.py uses it too). The server path runs in a subprocess
against the recording fake of the ClearML API.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from housing.cli import main
from housing.config import Settings, load_settings
from housing.io import file_lock, write_json
from housing.reporting.compare import (
    EXPERIMENT_COLUMNS,
    MODEL_COLUMNS,
    MODEL_METRIC_COLUMNS,
    compare,
)
from tests.conftest import metrics_records
from tests.fakes.clearml_api import FakeClearMLServer
from tests.helpers import run_all

from .conftest import CONF, PROJECT

# Run 1 trains two candidates (ridge wins, first champion); run 2 adds random_forest on
# another validation split: new versions of every model, and a champion that replaces v1.
RUNS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("run-1", ("linear_regression", "ridge"), ()),
    ("run-2", ("linear_regression", "ridge", "random_forest"), ("train.random_state=7",)),
)
COMMON = ("tracking=both", "clearml.mode=offline")
TRAIN_METRICS = MODEL_METRIC_COLUMNS  # train/val/CV metrics, as the train stage writes them
TABLES = ("clearml_experiments", "clearml_models", "mlflow_experiments", "mlflow_models")


@dataclass(frozen=True)
class Tracked:
    """A project root after the RUNS, and the metrics files as each run left them."""

    root: Path
    files: dict[str, dict[str, Any]]  # run id -> {metrics file name -> content}

    def settings(self, *overrides: str, root: Path | None = None) -> Settings:
        return load_settings(
            ["clearml.mode=offline", *overrides], config_dir=CONF, root=root or self.root
        )

    def copy(self, target: Path, *, mlflow: bool = True) -> Path:
        """The tracking stores (not the metrics files) copied under ``target``."""
        shutil.copytree(self.root / ".clearml", target / ".clearml")
        if mlflow:
            shutil.copy2(self.root / "mlflow.db", target / "mlflow.db")
        return target


_CACHE: dict[str, Tracked] = {}


def tracked_project(factory: pytest.TempPathFactory) -> Tracked:
    """The RUNS' project, built once per test session (~20-35 s); this process's own copy.

    Under xdist (test_compare.py and test_report.py land on different workers) the first
    worker builds it in a folder the workers share, under a file lock; the others wait
    and copy it; each process works in its copy. (MLflow's artifact location is absolute:
    runs a test adds to a copy's store put their artifacts in new folders of the shared
    ``mlruns``, which no copy's store lists.)
    """
    if "tracked" in _CACHE:
        return _CACHE["tracked"]
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        root = factory.mktemp("tracked-project")
        _CACHE["tracked"] = Tracked(root, _build_tracked(root))
        return _CACHE["tracked"]
    shared = factory.getbasetemp().parent / "tracked-project"
    done = shared / "files.json"  # written last: the build finished
    with file_lock(shared.with_name("tracked-project.lock")):
        if not done.is_file():
            shutil.rmtree(shared / "root", ignore_errors=True)  # a failed build's leftovers
            (shared / "root").mkdir(parents=True)
            write_json(done, _build_tracked(shared / "root"))
    root = factory.mktemp("tracked-project")
    shutil.copytree(shared / "root", root, dirs_exist_ok=True, symlinks=True)
    _CACHE["tracked"] = Tracked(root, json.loads(done.read_text()))
    return _CACHE["tracked"]


def _build_tracked(root: Path) -> dict[str, dict[str, Any]]:
    """Run the pipeline twice with tracking in ``root``; the metrics files after each run."""
    mp = pytest.MonkeyPatch()
    files: dict[str, dict[str, Any]] = {}
    try:
        mp.chdir(root)
        for key in [k for k in os.environ if k.startswith(("CLEARML_", "TRAINS_", "MLFLOW_"))]:
            mp.delenv(key)
        for run_id, candidates, extra in RUNS:
            mp.setenv("HOUSING_RUN_ID", run_id)
            run_all([*COMMON, f"selection.candidates=[{','.join(candidates)}]", *extra], CONF)
            files[run_id] = metrics_records(root / "metrics")
    finally:
        mp.undo()
    return files


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    return tracked_project(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tracked: Tracked) -> dict[str, pd.DataFrame]:
    """compare() on the tracked project, the four tables read back."""
    result = compare(tracked.settings())
    assert result.ok, result.summary_lines()
    return {name: read(tracked.root / "metrics" / f"{name}.csv") for name in TABLES}


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() reconfigures the root logger (like the housing CLI); undo it after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(
        path,
        float_precision="round_trip",
        keep_default_na=False,
        na_values=[""],
        dtype={"version": "string", "pipeline_run_id": "string"},
    )


def header(path: Path) -> str:
    return path.read_text().splitlines()[0]


def rows_of(frame: pd.DataFrame, **where: Any) -> list[dict[str, Any]]:
    mask = pd.Series(True, index=frame.index)
    for key, value in where.items():
        mask &= frame[key] == value
    return [{str(k): v for k, v in row.items()} for row in frame[mask].to_dict("records")]


def one(frame: pd.DataFrame, **where: Any) -> dict[str, Any]:
    found = rows_of(frame, **where)
    assert len(found) == 1, (where, found)
    return found[0]


# --------------------------------------------------------------------------- server (fake)

SERVER_TASKS = 1200


def _server_tasks() -> list[dict[str, Any]]:
    stages = ("prepare", "train", "select_best", "evaluate")
    tasks = []
    for i in range(SERVER_TASKS):
        stage = stages[i % 4]
        stamp = f"2026-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
        tasks.append(
            {
                "id": f"task-{i:05d}",
                "name": f"housing:{stage}",
                "project_name": "housing",
                "status": "completed",
                "type": "training",
                "tags": ["housing", stage],
                "created": f"{stamp}.000+00:00",
                "started": f"{stamp}.000+00:00",
                "completed": f"{stamp}.750+00:00",
                "hyperparams": {
                    "properties": {
                        "pipeline_run_id": {"name": "pipeline_run_id", "value": f"run-{i // 4}"},
                        "stage": {"name": "stage", "value": stage},
                    }
                },
                "last_metrics": {
                    "m1": {"v1": {"metric": "val", "variant": "rmse", "value": 3.0 + i / 1000}},
                    "m2": {"v2": {"metric": "Summary", "variant": "test/rmse", "value": 2.5}},
                },
            }
        )
    tasks.append({"id": "other-project", "name": "x", "project_name": "elsewhere"})
    return tasks


def _server_models() -> list[dict[str, Any]]:
    comment = {
        "version": "7",
        "algorithm": "ridge",
        "metrics": {"cv/rmse_mean": 4.25},
        "metadata": {"data_md5": "d" * 32, "model_sha256": "s" * 64},
        "pipeline_run_id": "run-299",
    }
    return [
        {
            "id": "model-best",
            "name": "housing-best",
            "project_name": "housing",
            "tags": ["housing", "champion", "version:7"],
            "framework": "ScikitLearn",
            "uri": "http://files/housing-best-v7.joblib",
            "comment": "Created by task id: task-01198\n" + json.dumps(comment),
            "task": "task-01198",
        },
        {"id": "model-ridge", "name": "housing-ridge", "project_name": "housing"},
    ]


def compare_against(
    server: FakeClearMLServer, cwd: Path, access: str, secret: str
) -> subprocess.CompletedProcess[str]:
    """``clearml_compare.py`` in a fresh process (the SDK keeps per-process state) against
    ``server``, with its keys and no ``~/clearml.conf``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLEARML_", "TRAINS_"))}
    env.update(server.env(access_key=access, secret_key=secret))
    env["PYTHONPATH"] = str(PROJECT / "src")
    env["HOME"] = str(cwd)  # no ~/clearml.conf of the user
    return subprocess.run(
        [
            sys.executable,
            str(PROJECT / "scripts" / "clearml_compare.py"),
            "--config-dir",
            str(CONF),
            f"clearml.server.api_host={server.api_host}",
            f"clearml.server.web_host={server.web_host}",
            f"clearml.server.files_host={server.files_host}",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.integration
def test_server_export_pages_through_every_task(tmp_path: Path) -> None:
    access, secret = "fake-access", "fake-secret-7d1c"
    server = FakeClearMLServer(
        tasks=_server_tasks(), models=_server_models(), access_key=access, secret_key=secret
    )
    with server:
        proc = compare_against(server, tmp_path, access, secret)
        assert proc.returncode == 0, proc.stderr[-3000:]
        task_calls = server.calls_to("tasks.get_all")
        model_pages = [c["page"] for c in server.calls_to("models.get_all")]
        model_reads = server.calls_to("models.get_by_id")
        project_id = server.project_id("housing")
        api_host = server.api_host
    # The SDK's query API pages (500, the server's cap), every page filtered to the project
    # and projected to the fields the rows need.
    assert [(c["page"], c["page_size"]) for c in task_calls] == [(0, 500), (1, 500), (2, 500)]
    assert all(c["project"] == [project_id] for c in task_calls), task_calls
    assert all({"hyperparams", "last_metrics"} <= set(c["only_fields"]) for c in task_calls)
    assert model_pages == [0]
    assert sorted(c["model"] for c in model_reads) == ["model-best", "model-ridge"]
    experiments = read(tmp_path / "metrics" / "clearml_experiments.csv")
    assert len(experiments) == SERVER_TASKS
    assert set(experiments["task_id"]) == {f"task-{i:05d}" for i in range(SERVER_TASKS)}
    assert set(experiments["source"]) == {"server"}
    assert set(experiments["pipeline_run_id"]) == {f"run-{i}" for i in range(SERVER_TASKS // 4)}
    first = one(experiments, task_id="task-00001")
    assert (first["stage"], first["val/rmse"], first["test/rmse"]) == ("train", 3.001, 2.5)
    assert first["duration_sec"] == 0.75
    models = read(tmp_path / "metrics" / "clearml_models.csv")
    best = one(models, model_id="model-best")
    assert (best["version"], best["champion"], best["algorithm"]) == ("7", True, "ridge")
    assert (best["cv/rmse_mean"], best["data_md5"], best["task_id"]) == (
        4.25,
        "d" * 32,
        "task-01198",
    )
    assert not one(models, model_id="model-ridge")["champion"]
    assert f"clearml (server, {api_host}): {SERVER_TASKS} task(s)" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()  # reading MLflow never creates a store


@pytest.mark.slow
@pytest.mark.integration
def test_server_error_is_one_line_naming_the_call_and_server(tmp_path: Path) -> None:
    with FakeClearMLServer(tasks=_server_tasks()[:8], access_key="k", secret_key="s") as server:
        server.fail("tasks.get_all", times=5, status=500, message="index unavailable")
        proc = compare_against(server, tmp_path, "k", "s")
        api_host = server.api_host
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: clearml: ClearML tasks.get_all on {api_host}: HTTP 500 index unavailable"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics" / "clearml_experiments.csv").exists()  # nothing half-written


# --------------------------------------------------------------------------- offline + MLflow


@pytest.mark.slow
@pytest.mark.integration
def test_one_row_per_task_and_per_registration(
    tracked: Tracked, exported: dict[str, pd.DataFrame]
) -> None:
    stages = sum(len(candidates) + 3 for _, candidates, _ in RUNS)  # prepare, select, evaluate
    registrations = sum(len(candidates) + 1 for _, candidates, _ in RUNS)  # + the -best one
    for backend, source in (("clearml", "offline"), ("mlflow", "local")):
        experiments = exported[f"{backend}_experiments"]
        models = exported[f"{backend}_models"]
        assert list(experiments.columns) == list(EXPERIMENT_COLUMNS)
        assert list(models.columns) == list(MODEL_COLUMNS)
        assert len(experiments) == stages, backend
        assert len(models) == registrations, backend
        assert set(experiments["source"]) == {source} == set(models["source"])
        assert set(experiments["status"]) == {"completed"}
        assert set(experiments["project"]) == {"housing"}
        assert set(experiments["pipeline_run_id"]) == {"run-1", "run-2"}
        assert (experiments["duration_sec"] >= 0).all()
        assert (experiments["started"] <= experiments["completed"]).all()
        for run_id, candidates, _ in RUNS:
            stages_of_run = rows_of(experiments, pipeline_run_id=run_id)
            assert sorted(r["stage"] for r in stages_of_run) == sorted(
                ["prepare", "select_best", "evaluate", *["train"] * len(candidates)]
            )
        # Sorted by the selection metric (cv/rmse_mean, lower first); tasks without it last.
        values = experiments["cv/rmse_mean"]
        with_metric = sum(len(c) + 1 for _, c, _ in RUNS)  # train + select_best tasks
        assert list(values.notna()) == [True] * with_metric + [False] * (stages - with_metric)
        assert list(values[:with_metric]) == sorted(values[:with_metric])


@pytest.mark.slow
@pytest.mark.integration
def test_exported_metrics_equal_the_metrics_files(
    tracked: Tracked, exported: dict[str, pd.DataFrame]
) -> None:
    for backend in ("clearml", "mlflow"):
        experiments = exported[f"{backend}_experiments"]
        models = exported[f"{backend}_models"]
        for run_id, candidates, _ in RUNS:
            files = tracked.files[run_id]
            for name in candidates:
                record = files[f"train_{name}.json"]
                task = one(experiments, pipeline_run_id=run_id, stage="train", model=name)
                for metric in TRAIN_METRICS:
                    assert task[metric] == record["metrics"][metric], (backend, name, metric)
                assert pd.isna(task["test/rmse"])
                version = one(models, pipeline_run_id=run_id, name=f"housing-{name}")
                for metric in MODEL_METRIC_COLUMNS:
                    assert version[metric] == record["metrics"][metric], (backend, name, metric)
                assert version["sha256"] == record["model_sha256"]
                assert version["data_md5"] == record["data_md5"]
                assert version["task_id"] == task["task_id"]
                assert version["algorithm"] == name
            summary = files["train_metrics.json"]
            select = one(experiments, pipeline_run_id=run_id, stage="select_best")
            assert select["model"] == summary["best_model"]
            assert select["cv/rmse_mean"] == summary["best_value"]
            evaluate = one(experiments, pipeline_run_id=run_id, stage="evaluate")
            test = files["test_metrics.json"]
            assert evaluate["model"] == test["model"] == summary["best_model"]
            for metric in ("test/rmse", "test/mae", "test/r2"):
                assert evaluate[metric] == test["metrics"][metric], (backend, metric)
            best = one(models, pipeline_run_id=run_id, name="housing-best")
            assert best["algorithm"] == summary["best_model"]
            assert best["sha256"] == summary["best_model_sha256"]


@pytest.mark.slow
@pytest.mark.integration
def test_champion_flags_and_decisions(exported: dict[str, pd.DataFrame]) -> None:
    for backend in ("clearml", "mlflow"):
        models = exported[f"{backend}_models"]
        champions = rows_of(models, champion=True)
        assert [(c["name"], c["version"]) for c in champions] == [("housing-best", "2")]
        assert champions[0]["algorithm"] == "random_forest"
        best = rows_of(models, name="housing-best")
        assert [r["champion_decision"] for r in best] == ["promoted", "promoted"], backend
        assert rows_of(models, name="housing-best", version="1")[0]["algorithm"] == "ridge"
        candidates = models[models["name"] != "housing-best"]
        assert candidates["champion_decision"].isna().all()
        assert not candidates["champion"].any()


@pytest.mark.slow
@pytest.mark.integration
def test_filters_by_stage_last_runs_and_tags(tracked: Tracked, tmp_path: Path) -> None:
    root = tracked.copy(tmp_path)
    settings = tracked.settings(root=root)
    result = compare(settings, stage="train", last_n=1)
    for got in result.backends.values():
        assert {r["pipeline_run_id"] for r in got.experiments} == {"run-2"}
        assert sorted(r["model"] for r in got.experiments) == sorted(RUNS[1][1])
        assert {m["task_id"] for m in got.models} == {r["task_id"] for r in got.experiments}
        assert all(not m["name"].endswith("-best") for m in got.models)
    written = read(root / "metrics" / "clearml_experiments.csv")
    assert len(written) == len(RUNS[1][1])

    result = compare(settings, tags=["select_best"])
    for got in result.backends.values():
        assert [r["stage"] for r in got.experiments] == ["select_best", "select_best"]
        assert sorted(m["name"] for m in got.models) == ["housing-best", "housing-best"]
    both = compare(settings, tags=["select_best", "champion:promoted"]).backends["clearml"]
    assert len(both.experiments) == 2  # every tag is required
    assert not compare(settings, tags=["select_best", "nope"]).backends["clearml"].experiments


@pytest.mark.slow
@pytest.mark.integration
def test_corrupt_session_is_skipped_with_a_warning(
    tracked: Tracked, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    root = tracked.copy(tmp_path / "project", mlflow=False)
    sessions = root / ".clearml" / "offline"
    half = sessions / "offline-half0written"
    half.mkdir()
    (half / "task.json").write_text('{"id": "offline-half0written", "name": "housing:tr')
    (sessions / "offline-badzip.zip").write_bytes(b"PK\x03\x04 not really a zip")
    monkeypatch.chdir(root)
    code = main(["compare", "--config-dir", str(CONF), "clearml.mode=offline"])
    out, err = capsys.readouterr()
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if "offline-half0written" in ln]
    assert len(warnings) == 1 and "skipping" in warnings[0], err
    assert any("offline-badzip" in ln for ln in err.splitlines()), err
    exported = read(root / "metrics" / "clearml_experiments.csv")
    assert len(exported) == sum(len(c) + 3 for _, c, _ in RUNS)  # the rest exported
    assert "2 unreadable session(s) skipped" in out
    # MLflow: no store in this copy -> headers only, and no store created.
    assert header(root / "metrics" / "mlflow_experiments.csv") == ",".join(EXPERIMENT_COLUMNS)
    assert len(read(root / "metrics" / "mlflow_models.csv")) == 0
    assert not (root / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_empty_project_writes_headers_only(
    tracked: Tracked, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    root = tracked.copy(tmp_path / "project")
    monkeypatch.chdir(root)
    code = main(["compare", "--project", "nope", "--config-dir", str(CONF), "clearml.mode=offline"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for name in TABLES:
        lines = (root / "metrics" / f"{name}.csv").read_text().splitlines()
        columns = MODEL_COLUMNS if name.endswith("models") else EXPERIMENT_COLUMNS
        assert lines == [",".join(columns)], name
    lines = out.splitlines()
    assert len(lines) == 2
    assert "nothing found for project 'nope'" in lines[0]
    assert "no MLflow experiment 'nope'" in lines[1]


def test_bad_filters_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compare", "--config-dir", str(CONF), "selection.metric=nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [err[0]] and err[0].startswith("error: selection.metric")
    # Usage errors are return codes too: main() never calls sys.exit (ClearML hooks it).
    assert main(["compare", "--last", "0"]) == 2
    usage = capsys.readouterr().err
    assert usage.startswith("Usage: housing compare ")
    assert "Invalid value for '--last'" in usage
    assert main(["compare", "--help"]) == 0
    assert "--stage" in capsys.readouterr().out


def test_a_local_file_store_with_a_space_in_its_path_is_found(tmp_path: Path) -> None:
    from housing.reporting.compare import _local_store_missing
    from housing.tracking.mlflow import resolve_uri

    store = tmp_path / "my runs" / "mlruns"
    uri = resolve_uri("my runs/mlruns", tmp_path)
    assert "%20" in uri  # file URIs are percent-encoded
    assert _local_store_missing(uri) == store
    store.mkdir(parents=True)
    assert _local_store_missing(uri) is None


def test_offline_json_lines_skip_every_unparsable_line(tmp_path: Path) -> None:
    from housing.tracking.offline import OfflineSession, comment_json, read_events

    huge = '{"n": ' + "1" * 5000 + "}"  # json.loads: ValueError, not JSONDecodeError
    assert comment_json(f"SDK line\n{huge}\n{{cut\n" + '{"ok": 1}') == {"ok": 1}
    (tmp_path / "log.jsonl").write_text(f'{huge}\n\n[{{"a": 1}}, 2]\n{{"b": 2}}\n')
    session = OfflineSession(tmp_path, "t", "", "", (), datetime.now(UTC), None, {})
    assert list(read_events(session, "log.jsonl")) == [{"a": 1}, {"b": 2}]
