"""Damaged local tracking stores are refused with one line and left byte for byte."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from housing.config import load_settings
from housing.doctor import diagnose
from housing.errors import ArtifactError
from housing.reporting.compare import compare
from housing.reporting.report import build_report
from housing.tracking.offline import ClearMLError, locked_json
from housing.tracking.recorder import build_trackers
from housing.tracking.stores import (
    StoreError,
    check_clearml_store,
    check_mlflow_store,
    mlflow_store_problem,
)
from tests.conftest import CONF

URI = "sqlite:///mlflow.db"
#: Tests on a real recorded store share one (MLflow's import and migrations: ~5-9 s).
on_a_real_store = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLflow store holding one experiment with three runs."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-recorded") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{path}")
    experiment = client.create_experiment("housing")
    for value in (1.0, 2.0, 3.0):
        run = client.create_run(experiment)
        client.log_metric(run.info.run_id, "val/rmse", value)
        client.set_terminated(run.info.run_id)
    return path


@pytest.fixture
def project(tmp_path: Path, recorded_db: Path) -> Path:
    """A project that recorded runs: mlflow.db plus its mlruns/ artifacts."""
    shutil.copyfile(recorded_db, tmp_path / "mlflow.db")
    (tmp_path / "mlruns" / "1").mkdir(parents=True)
    return tmp_path


def refused(root: Path) -> str:
    """The one line :func:`check_mlflow_store` refuses the project's store with."""
    with pytest.raises(StoreError) as excinfo:
        check_mlflow_store(URI, root)
    message = str(excinfo.value)
    assert "\n" not in message
    assert str(root / "mlflow.db") in message
    assert "restore it from a backup" in message
    return message


@on_a_real_store
def test_a_recorded_store_and_a_new_project_pass(project: Path) -> None:
    assert mlflow_store_problem(URI, project) is None
    fresh = project / "fresh"
    fresh.mkdir()
    assert mlflow_store_problem(URI, fresh) is None  # nothing recorded yet: MLflow creates it
    (fresh / "mlflow.db").touch()  # being created by another run right now
    assert mlflow_store_problem(URI, fresh) is None
    assert not (fresh / "mlflow.db-journal").exists()
    assert mlflow_store_problem("http://127.0.0.1:5000", fresh) is None  # not a local store


@on_a_real_store
@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (lambda data: b"", "empty (0 bytes) but mlruns/ show recorded runs"),
        (lambda data: data[: len(data) // 3], "truncated"),
        (lambda data: b"not a database\n" * 100, "not an SQLite database"),
        (lambda data: data[:100] + b"\xff" * (len(data) - 100), "unreadable"),
    ],
    ids=["empty", "truncated", "garbage", "scrambled-pages"],
)
def test_a_damaged_store_is_refused_and_left_as_it_is(
    project: Path, damage: object, what: str
) -> None:
    db = project / "mlflow.db"
    db.write_bytes(damage(db.read_bytes()))  # type: ignore[operator]
    before = db.read_bytes()
    assert what in refused(project)
    assert db.read_bytes() == before
    assert sorted(p.name for p in project.iterdir()) == ["mlflow.db", "mlruns"]


@on_a_real_store
def test_a_missing_store_with_history_is_refused_and_not_created(project: Path) -> None:
    (project / "mlflow.db").unlink()
    (project / "mlflow.db.parents.json").write_text("{}\n")
    message = refused(project)
    assert "missing but mlruns/ and mlflow.db.parents.json show recorded runs" in message
    assert not (project / "mlflow.db").exists()


def test_an_sqlite_file_without_mlflow_tables_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "mlflow.db") as conn:
        conn.execute("CREATE TABLE notes (text)")
    conn.close()
    assert "not an MLflow store (no experiments, metrics, params, runs, tags table)" in refused(
        tmp_path
    )


@on_a_real_store
def test_a_stage_refuses_a_damaged_store_before_any_work(project: Path) -> None:
    db = project / "mlflow.db"
    db.write_bytes(b"")
    settings = load_settings(["tracking=mlflow"], config_dir=CONF, root=project)
    with pytest.raises(StoreError) as excinfo:
        build_trackers(settings)
    assert isinstance(excinfo.value, ArtifactError) and excinfo.value.exit_code == 4
    assert db.read_bytes() == b""
    # the readers refuse too (they would re-create the store)
    for reader in (compare, build_report):
        with pytest.raises(StoreError):
            reader(settings)  # type: ignore[operator]
    assert db.read_bytes() == b""
    assert not settings.paths.metrics_dir.exists() and not settings.paths.reports_dir.exists()


@on_a_real_store
def test_doctor_fails_on_a_damaged_store_within_seconds(project: Path) -> None:
    (project / "mlflow.db").write_bytes(b"garbage")
    settings = load_settings(["tracking=mlflow"], config_dir=CONF, root=project)
    started = time.monotonic()
    checks = diagnose(
        {}, settings.clearml, tracking_backends=["mlflow"], mlflow_uri=URI, root=project
    )
    assert time.monotonic() - started < 5
    mlflow = next(c for c in checks if c.name == "mlflow")
    assert mlflow.status == "fail" and "not an SQLite database" in mlflow.detail
    assert (project / "mlflow.db").read_bytes() == b"garbage"


@pytest.mark.parametrize(
    ("content", "what"),
    [("", "empty"), ('{"sessions": {"offline-1', "corrupt JSON"), ("[]", "not a JSON object")],
    ids=["empty", "cut-off", "list"],
)
def test_a_corrupt_clearml_ledger_is_refused_and_never_rewritten(
    tmp_path: Path, content: str, what: str
) -> None:
    index = tmp_path / "imported.json"
    index.write_text(content)
    with pytest.raises(StoreError) as excinfo:
        check_clearml_store(tmp_path)
    message = str(excinfo.value)
    assert str(index) in message and what in message and "\n" not in message
    with pytest.raises(ClearMLError), locked_json(index, dict) as data:
        data["sessions"] = {}
    assert index.read_text() == content
    index.write_text(json.dumps({"sessions": {}}))
    check_clearml_store(tmp_path)


def test_a_store_left_mid_transaction_by_a_killed_writer_is_not_refused(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as conn:
        for table in ("experiments", "runs", "metrics", "params", "tags"):
            conn.execute(f"CREATE TABLE {table} (value)")
    conn.close()
    writer = (
        "import os, sqlite3; c = sqlite3.connect('mlflow.db', isolation_level=None); "
        "c.execute('PRAGMA cache_size=1'); c.execute('BEGIN'); "
        "[c.execute('INSERT INTO runs VALUES (randomblob(10000))') for _ in range(100)]; "
        "os._exit(9)"
    )
    subprocess.run([sys.executable, "-c", writer], cwd=tmp_path, check=False, timeout=60)
    assert (tmp_path / "mlflow.db-journal").stat().st_size > 0  # a hot journal
    assert mlflow_store_problem(URI, tmp_path) is None  # MLflow's next open rolls it back
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (0,)
    conn.close()
