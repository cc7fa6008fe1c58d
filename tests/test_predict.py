"""``housing predict``: the champion (or a version, a candidate) scores a CSV file.

One REAL pipeline run per module (``run_all``: MLflow on a sqlite store and ClearML
offline sessions in a temporary root, 200 synthetic rows, two candidates) gives every
registry a champion; each test calls the ``housing`` entry point on it in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest

from housing.cli import main
from housing.tracking.mlflow import version_record
from housing.tracking.offline import list_sessions
from tests.helpers import in_project, run_all

from .conftest import CONF, PROJECT

TRAINED = (
    "tracking=both",
    "clearml.mode=offline",
    "data=synthetic",
    "data.n_rows=200",
    "selection.candidates=[linear_regression,ridge]",
)
TRACKER_VARS = ("CLEARML_", "TRAINS_", "MLFLOW_")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root after one tracked pipeline run (~14 s)."""
    root = tmp_path_factory.mktemp("predict-project")
    mp = pytest.MonkeyPatch()
    try:
        with in_project(root, mp):
            mp.setenv("HOUSING_RUN_ID", "predict-fixture")
            run_all(TRAINED, CONF)
    finally:
        mp.undo()
    return root


@pytest.fixture
def here(project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in the project root, without the caller's tracker variables or logging."""
    with in_project(project, monkeypatch) as root:
        yield root


def predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``housing predict ARGS``: exit code, stdout, stderr."""
    code = main(["--config-dir", str(CONF), "predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def features_of(project: Path) -> pd.DataFrame:
    """The test split's feature columns (40 rows)."""
    return pd.read_csv(project / "data/processed/test.csv").drop(columns="medv")


def write_input(path: Path, frame: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def predictions(path: Path) -> np.ndarray:
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["prediction"]
    return frame["prediction"].to_numpy()


def best_pipeline(project: Path, name: str = "best_model") -> Any:
    return joblib.load(project / "models" / f"{name}.joblib")


def test_champion_matches_mlflow_pyfunc_and_sidecar(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow
    from mlflow import MlflowClient

    rows = features_of(here)
    extra = rows.assign(note="x", medv=1.0)  # two columns the model does not use
    source = write_input(tmp_path / "new houses.csv", extra)
    output = tmp_path / "out" / "scored.csv"

    code, out, err = predict(
        capsys, "--input", str(source), "--output", str(output),
        "tracking=mlflow", "predict.chunk_rows=16",
    )  # fmt: skip

    assert code == 0, err
    assert out.startswith(f"wrote {output} (40 rows, housing-best v1 (mlflow)"), out
    warnings = [ln for ln in err.splitlines() if "ignoring column" in ln]
    assert warnings == [f"{source}: ignoring column(s) the model does not use: note, medv"]
    uri = f"sqlite:///{here / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/housing-best@champion")
        expected = np.asarray(pyfunc.predict(rows.astype("float64")))
    finally:
        mlflow.set_tracking_uri(None)
    np.testing.assert_array_equal(predictions(output), expected)  # 3 chunks, same floats

    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("housing-best", "champion")
    tags = version_record(client, version)
    sidecar = json.loads(output.with_name("scored.meta.json").read_text())
    best = json.loads((here / "metrics/train_metrics.meta.json").read_text())
    fingerprint = json.loads((here / "metrics/data_fingerprint.json").read_text())
    assert sidecar["model"] == "housing-best"
    assert sidecar["version"] == str(version.version) == "1"
    assert sidecar["source"] == "mlflow"
    assert sidecar["model_uri"] == "models:/housing-best/1"
    assert sidecar["model_sha256"] == tags["model_sha256"] == best["best_model_sha256"]
    assert sidecar["data_md5"] == tags["data_md5"] == fingerprint["raw"]["md5"]
    assert sidecar["git_commit"] == tags["git_commit"]
    assert sidecar["input_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert sidecar["rows"] == 40
    assert sidecar["ignored_columns"] == ["note", "medv"]
    assert sidecar["features"] == list(rows.columns)
    assert 0 < sidecar["seconds"] < 60
    # the schema is the one the model was trained with (data=synthetic), not the composed
    # config's (data=boston by default)
    assert (sidecar["schema"], sidecar["schema_from"]) == ("synthetic", "model run config")
    # drift against the champion's reference profile, read from its MLflow run
    assert sidecar["drift"]["reference"].startswith(f"mlflow:run {version.run_id}/")
    assert sidecar["drift"]["rows"] == 40 and sidecar["drift"]["drifting"] == []

    runs = client.search_runs(
        [client.get_experiment_by_name("housing").experiment_id],
        filter_string="tags.\"housing.stage\" = 'predict'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["predict/rows"] == 40
    assert run.data.params["predict.version"] == "1"
    assert run.data.params["predict.model_sha256"] == sidecar["model_sha256"]


def test_model_by_version_or_candidate(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = features_of(here)
    source = write_input(tmp_path / "houses.csv", rows)
    for spec, label, model in (
        ("1", "housing-best v1 (mlflow)", "best_model"),
        ("linear_regression", "housing-linear_regression v1 (mlflow)", "linear_regression"),
    ):
        output = tmp_path / f"{spec}.csv"
        code, out, err = predict(
            capsys, "--input", str(source), "--output", str(output), "--model", spec,
            "tracking=mlflow",
        )  # fmt: skip
        assert code == 0, err
        assert label in out
        expected = best_pipeline(here, model).predict(rows.astype("float64"))
        np.testing.assert_array_equal(predictions(output), expected)

    code, _, err = predict(capsys, "--input", str(source), "--model", "7", "tracking=mlflow")
    assert code == 4
    assert err.strip().splitlines() == ["error: MLflow model housing-best has no version 7"]


def test_offline_champion_clearml_and_no_tracking(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = features_of(here)
    source = write_input(tmp_path / "houses.csv", rows)
    expected = best_pipeline(here).predict(rows.astype("float64"))
    sessions_before = len(list_sessions(here / ".clearml"))
    for overrides, label, version in (
        (("tracking=clearml", "clearml.mode=offline"), "housing-best v1 (clearml-offline)", "1"),
        (("tracking=none",), "housing-best (local)", None),
    ):
        output = tmp_path / f"{overrides[0]}.csv"
        code, out, err = predict(
            capsys, "--input", str(source), "--output", str(output), *overrides
        )
        assert code == 0, err
        assert label in out
        np.testing.assert_array_equal(predictions(output), expected)
        sidecar = json.loads(output.with_suffix(".meta.json").read_text())
        assert sidecar["version"] == version
        assert (
            sidecar["model_sha256"]
            == hashlib.sha256((here / "models/best_model.joblib").read_bytes()).hexdigest()
        )
    sessions = list_sessions(here / ".clearml")
    assert len(sessions) == sessions_before + 1  # tracking=none recorded nothing
    assert sessions[-1].name == "housing:predict"
    assert sessions[-1].properties["stage"] == "predict"


def test_tampered_model_refused_before_unpickling(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    source = write_input(tmp_path / "houses.csv", features_of(here))
    output = tmp_path / "out" / "scored.csv"
    # tracking=none: the joblib file select_best recorded (a copy of the project)
    copy = tmp_path / "copy"
    for folder in ("models", "metrics"):
        shutil.copytree(here / folder, copy / folder)
    with (copy / "models/best_model.joblib").open("ab") as fh:
        fh.write(b"\0")
    monkeypatch.chdir(copy)
    code, out, err = predict(
        capsys, "--input", str(source), "--output", str(output), "tracking=none"
    )
    assert code == 4
    assert out == ""
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: {copy / 'models/best_model.joblib'}: sha256 ")
    assert line.endswith("refusing to unpickle (re-run the stage that wrote it)")
    assert not output.parent.exists()
    # MLflow: the registered pickle itself (restored afterwards)
    monkeypatch.chdir(here)
    client = MlflowClient(f"sqlite:///{here / 'mlflow.db'}")
    folder = Path(
        client.get_model_version_download_uri("housing-best", "1").removeprefix("file://")
    )
    pickle = folder / "model.pkl"
    original = pickle.read_bytes()
    try:
        pickle.write_bytes(original + b"\0")
        code, out, err = predict(
            capsys, "--input", str(source), "--output", str(output), "tracking=mlflow"
        )
    finally:
        pickle.write_bytes(original)
    assert code == 4
    [line] = err.strip().splitlines()
    assert line.startswith("error: MLflow model housing-best v1: sha256 of model.pkl is ")
    assert line.endswith("refusing to unpickle")
    assert not output.parent.exists()


def test_bad_input_refused_in_one_line(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = features_of(here)
    output = tmp_path / "out" / "scored.csv"
    cases = {
        "missing.csv": (
            rows.drop(columns=["rm", "lstat"]),
            "missing column(s) the model was trained with: rm, lstat",
        ),
        "infinite.csv": (
            rows.assign(
                tax=rows["tax"].where(rows.index >= 10, np.inf),  # rows 0-9
                dis=rows["dis"].where(rows.index >= 5, np.inf),  # rows 0-4
            ),
            "column 'dis': 5 rows not finite (inf or -inf) (+1 more)",  # the first one named
        ),
        "chas.csv": (rows.assign(chas=5), "column 'chas': 40 rows not one of [0, 1]"),
        "header.csv": (rows.iloc[0:0], "no rows to predict (only a header)"),
        "twice.csv": (
            pd.concat([rows, rows[["rm"]]], axis=1),  # pandas would read it as rm, rm.1
            "duplicated column header(s): rm",
        ),
        "text.csv": (
            rows.assign(rm=rows["rm"].astype(object).where(rows.index != 0, "abc")),
            "column 'rm': 1 row not numeric (e.g. 'abc')",
        ),
    }
    for name, (frame, why) in cases.items():
        source = write_input(tmp_path / name, frame)
        code, out, err = predict(
            capsys, "--input", str(source), "--output", str(output), "tracking=none", "data=boston"
        )
        assert (code, out) == (3, ""), (name, err)
        assert err.strip().splitlines() == [f"error: {source}: {why}"]
        assert not output.exists() and not any(output.parent.glob("*"))  # nothing, no temp
    code, _, err = predict(capsys, "--input", str(tmp_path / "absent.csv"), "tracking=none")
    assert (code, err.strip()) == (3, f"error: {tmp_path / 'absent.csv'}: file not found (--input)")
    code, _, err = predict(capsys, "--input", str(source), "--model", "lasso", "tracking=none")
    assert code == 2
    assert err.startswith("error: --model lasso: not a version number, 'champion' or a candidate")


def test_failed_batch_keeps_the_previous_output(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = features_of(here)
    output = tmp_path / "out" / "scored.csv"
    sidecar = output.with_name("scored.meta.json")
    good = write_input(tmp_path / "good.csv", rows)
    code, _, err = predict(capsys, "--input", str(good), "--output", str(output), "tracking=none")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in output.parent.iterdir()}
    assert set(before) == {"scored.csv", "scored.meta.json"}

    late = rows.assign(tax=rows["tax"].where(rows.index != 35, np.inf))  # in the third chunk
    bad = write_input(tmp_path / "bad.csv", late)
    code, _, err = predict(
        capsys, "--input", str(bad), "--output", str(output), "tracking=none",
        "predict.chunk_rows=16",
    )  # fmt: skip
    assert code == 3
    assert err.strip() == f"error: {bad} (rows 33-40): column 'tax': 1 row not finite (inf or -inf)"
    after = {p.name: p.read_bytes() for p in output.parent.iterdir()}
    assert after == before  # no partial file, no temporary left, the old pair intact
    assert (
        json.loads(sidecar.read_text())["input_sha256"]
        == hashlib.sha256(good.read_bytes()).hexdigest()
    )


@pytest.mark.slow
def test_script_writes_the_default_output(here: Path, tmp_path: Path) -> None:
    """``python scripts/predict.py`` as a user runs it (a subprocess; default output)."""
    copy = tmp_path / "copy"
    for folder in ("models", "metrics"):
        shutil.copytree(here / folder, copy / folder)
    write_input(copy / "incoming" / "june.csv", features_of(here))
    env = {k: v for k, v in os.environ.items() if not k.startswith(TRACKER_VARS)}
    env["HOUSING_CONFIG_DIR"] = str(CONF)
    proc = subprocess.run(
        [sys.executable, str(PROJECT / "scripts/predict.py"), "--input", "incoming/june.csv",
         "tracking=none"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "wrote predictions/june.predictions.csv (40 rows, housing-best (local), "
    )
    assert proc.stdout.rstrip().endswith("sidecar predictions/june.predictions.meta.json")
    assert len(predictions(copy / "predictions/june.predictions.csv")) == 40
    assert proc.stderr == ""
