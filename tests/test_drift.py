"""Drift: reference profiles stored at train time, ``housing drift``, drift in predict and
prepare, and the scheduled pipeline's ``retrain: on_change`` skip.

One real project per module (``project``: the bundled Boston table, ``ridge`` trained
without CV and selected on ``val/rmse``, ``tracking=none``, ~4 s) gives a champion whose
reference profile is the train split's; each test runs the ``housing`` entry point on it
in-process with real files. ``rejected`` (a real MLflow store, synthetic 200-row data)
holds a champion and a newer version on other data that the gate rejected: the
``on_change`` baseline is that newer version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from housing import drift, runs
from housing.cli import main
from housing.config import load_settings
from housing.orchestration.pipeline import RetrainDecision, retrain_decision
from housing.runner import execute_stage
from housing.tracking.mlflow_spool import create_store

from .conftest import CONF
from .helpers import in_project

BASE = ("tracking=none", "selection.metric=val/rmse", "selection.candidates=[ridge]")
TRACKER_VARS = ("CLEARML_", "TRAINS_", "MLFLOW_", "HOUSING_RUN")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root where prepare, train (ridge, no CV) and select_best ran: a local champion."""
    root = tmp_path_factory.mktemp("drift-project")
    mp = pytest.MonkeyPatch()
    try:
        with in_project(root, mp, TRACKER_VARS):
            settings = load_settings(BASE, config_dir=CONF)
            context = runs.current()
            execute_stage("prepare", settings, context=context)
            trained = load_settings([*BASE, "model=ridge", "train.cv_folds=0"], config_dir=CONF)
            execute_stage("train", trained, context=context)
            execute_stage("select_best", settings, context=context)
            raw = pd.read_csv(root / "data/raw/housing.csv")
            train = pd.read_csv(root / "data/processed/train.csv")
            train.sample(len(train), replace=True, random_state=7).to_csv(
                root / "resample.csv", index=False
            )
            raw.assign(rm=raw["rm"] + 1).to_csv(root / "shifted.csv", index=False)
    finally:
        mp.undo()
    return root


@pytest.fixture
def here(project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in the project root, without tracker variables; logging restored afterwards."""
    with in_project(project, monkeypatch, TRACKER_VARS) as root:
        yield root


def _copy_of(here: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project to change, as the current directory, without drift.json."""
    copy = tmp_path / "copy"
    shutil.copytree(here, copy)
    monkeypatch.chdir(copy)
    (copy / "metrics/drift.json").unlink(missing_ok=True)
    return copy


def housing(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``housing ARGS`` in-process: exit code, stdout, stderr."""
    code = main(["--config-dir", str(CONF), *args])
    out, err = capsys.readouterr()
    return code, out, err


def events(root: Path, stage: str) -> list[dict[str, object]]:
    lines = (root / "metrics/pipeline_events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["stage"] == stage]


def test_profile_is_stored_beside_the_model(here: Path) -> None:
    meta = json.loads((here / "metrics/train_ridge.meta.json").read_text())
    path = here / meta["reference_profile"]
    assert path == here / "models/ridge.profile.json"
    assert meta["reference_profile_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    reference = drift.read_profile(path)
    assert reference.model_sha256 == meta["model_sha256"]
    assert reference.n_rows == 404  # the train split
    assert list(reference.features) == meta["features"]
    rm = reference.features["rm"]
    assert len(rm.shares) == 10 and abs(sum(rm.shares) - 1) < 1e-9
    assert len(rm.sample) == 404  # <= drift.sample_size: every value
    assert len(reference.features["chas"].shares) == 2  # one bin per value (0, 1)


def test_a_resample_of_the_training_data_does_not_drift(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = housing(capsys, "drift", "--input", "resample.csv", *BASE)
    assert code == 0, err
    assert out.startswith("no drift (PSI >= 0.2 and KS p < 0.01): max PSI "), out
    scores = json.loads((here / "metrics/drift.json").read_text())
    assert all(type(v) in (int, float) for v in scores.values()), scores
    assert scores["drift/max_psi"] < 0.1
    assert scores["drift/n_drifting"] == 0
    assert not list((here / "plots/drift").glob("*.svg"))
    assert events(here, "drift")[-1]["status"] == "succeeded"


def test_rm_plus_one_drifts_warns_and_notifies(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = housing(capsys, "drift", "--input", "shifted.csv", *BASE)
    assert code == 0, err  # a warning, not a failure
    assert out.startswith("warning: drift in 1 feature(s) (PSI >= 0.2 and KS p < 0.01): rm ("), out
    scores = json.loads((here / "metrics/drift.json").read_text())
    assert all(type(v) in (int, float) for v in scores.values()), scores
    assert scores["drift/n_drifting"] == 1
    assert scores["psi/rm"] >= 0.2 and scores["ks_pvalue/rm"] < 0.01
    meta = json.loads((here / "metrics/drift.meta.json").read_text())
    shifted = here / "shifted.csv"
    assert meta["drifting"] == ["rm"]
    assert meta["input"] == "shifted.csv"
    assert meta["input_sha256"] == hashlib.sha256(shifted.read_bytes()).hexdigest()
    assert (meta["model"], meta["source"]) == ("housing-best", "local")
    assert (meta["psi_threshold"], meta["p_value"]) == (0.2, 0.01)
    assert meta["plots"] == ["plots/drift/rm.svg"]
    assert (here / "plots/drift/rm.svg").read_text().lstrip().startswith("<?xml")
    last = events(here, "drift")[-1]
    assert (last["status"], last["drifting"], last["origin"]) == ("drifted", "rm", "drift")
    notes = (here / "reports/pipeline_notifications.log").read_text().splitlines()
    assert "stage drift DRIFTED" in notes[-1] and notes[-1].endswith("drifting=rm"), notes[-1]

    code, out, _ = housing(capsys, "drift", "--input", "shifted.csv", "--fail-on-drift", *BASE)
    assert code == 1 and out.startswith("warning: drift in 1 feature(s)")


def test_report_has_a_drift_section(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = housing(capsys, "drift", "--input", "shifted.csv", *BASE)
    assert code == 0, err
    code, _, err = housing(capsys, "report", *BASE)
    assert code == 0, err
    page = (here / "reports/experiments.html").read_text()
    section = page[page.index('id="drift"') :]
    assert "shifted.csv (506 rows, checked by housing drift) against housing-best" in section
    assert "drifting: rm" in section and 'aria-label="Drift: rm"' in section
    markdown = (here / "reports/experiments.md").read_text()
    assert "## Drift" in markdown and "| rm |" in markdown


def test_missing_feature_refused_in_one_line(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "no_rm.csv"
    pd.read_csv(here / "shifted.csv").drop(columns="rm").to_csv(source, index=False)
    before = {p: p.read_bytes() for p in (here / "metrics").glob("drift*.json")}
    code, out, err = housing(capsys, "drift", "--input", str(source), *BASE)
    assert code == 3
    assert out == ""
    assert err.strip().splitlines() == [
        f"error: {source}: missing column(s) the model was trained with: rm"
    ]
    assert {p: p.read_bytes() for p in (here / "metrics").glob("drift*.json")} == before


def test_damaged_profile_refused_in_one_line(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = _copy_of(here, tmp_path, monkeypatch)
    (copy / "models/ridge.profile.json").write_text('{"format": 1, "features": [')
    code, out, err = housing(capsys, "drift", "--input", "shifted.csv", *BASE)
    assert code == 4 and out == ""
    assert err.strip().splitlines() == [
        "error: housing-best (local): no reference profile of its training data "
        f"({copy / 'models/ridge.profile.json'}: not valid JSON (Expecting value at line 1)); "
        "retrain it (housing repro)"
    ]
    assert not (copy / "metrics/drift.json").exists()
    code, _, err = housing(capsys, "predict", "--input", "shifted.csv", *BASE)
    assert code == 0, err  # predict still scores, without drift
    assert "predict: drift not computed (housing-best (local): no reference profile" in err
    sidecar = json.loads((copy / "predictions/shifted.predictions.meta.json").read_text())
    assert sidecar["drift"] is None


def test_predict_sidecar_carries_drift(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "scored.csv"
    code, out, err = housing(
        capsys, "predict", "--input", "shifted.csv", "--output", str(output),
        "predict.chunk_rows=100", *BASE,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith(f"wrote {output} (506 rows, housing-best (local), "), out
    assert err.splitlines()[-1] == (
        "predict: shifted.csv: drift in 1 feature(s) (PSI >= 0.2 and KS p < 0.01): "
        f"rm (PSI {_psi(output, 'rm'):.3f})"
    )
    sidecar = json.loads(output.with_suffix(".meta.json").read_text())["drift"]
    assert sidecar["drifting"] == ["rm"]
    assert sidecar["rows"] == 506  # streamed over 6 chunks
    assert sidecar["reference"] == "models/ridge.profile.json"
    assert sidecar["max_psi"] == sidecar["psi"]["rm"] >= 0.2
    last = events(here, "drift")[-1]
    assert (last["origin"], last["input"], last["status"]) == ("predict", "shifted.csv", "drifted")


def _psi(output: Path, feature: str) -> float:
    return float(json.loads(output.with_suffix(".meta.json").read_text())["drift"]["psi"][feature])


def test_accumulator_streams_with_bounded_memory() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=5000), "k": rng.integers(0, 3, 5000)})
    reference = drift.profile(frame, ["x", "k"], bins=10, sample_size=200, seed=1)
    assert len(reference.features["k"].edges) == 2  # three values, three bins
    whole = drift.current_of(reference, [frame], sample_size=300)
    chunks = drift.current_of(reference, [frame[i : i + 700] for i in range(0, 5000, 700)], 300)
    assert whole.counts == chunks.counts and whole.n_rows == chunks.n_rows == 5000
    assert all(len(s) == 300 for s in chunks.samples.values())
    thresholds = load_settings(["tracking=none"], config_dir=CONF).drift
    same = drift.compare(reference, chunks, thresholds)
    assert same.max_psi < 0.01 and same.drifting == []
    moved = drift.current_of(reference, [frame.assign(x=frame["x"] + 0.5)], 300)
    result = drift.compare(reference, moved, thresholds)
    assert result.drifting == ["x"]
    assert drift.psi([0.5, 0.5], [1.0, 0.0]) == pytest.approx(
        0.5 * np.log(2) + (1e-4 - 0.5) * np.log(1e-4 / 0.5)
    )


def test_prepare_on_a_new_snapshot_records_drift(
    here: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = _copy_of(here, tmp_path, monkeypatch)
    code, _, err = housing(capsys, "prepare", "data.path=shifted.csv", *BASE)
    assert code == 0, err
    assert "prepare: shifted.csv: drift in 1 feature(s)" in err
    meta = json.loads((copy / "metrics/drift.meta.json").read_text())
    assert (meta["origin"], meta["input"], meta["drifting"]) == ("prepare", "shifted.csv", ["rm"])
    assert json.loads((copy / "metrics/drift.json").read_text())["drift/n_drifting"] == 1

    fresh = tmp_path / "fresh"  # no champion: prepare says nothing and writes no drift
    fresh.mkdir()
    shutil.copy(here / "shifted.csv", fresh)
    monkeypatch.chdir(fresh)
    code, _, err = housing(capsys, "prepare", "data.path=shifted.csv", *BASE)
    assert code == 0, err
    assert "drift" not in err
    assert not (fresh / "metrics/drift.json").exists()


def test_retrain_decision(here: Path, tmp_path: Path) -> None:
    same = retrain_decision(load_settings(BASE, config_dir=CONF))
    fingerprint = json.loads((here / "metrics/data_fingerprint.json").read_text())
    assert not same.retrain
    assert same.data_md5 == fingerprint["raw"]["md5"]
    assert same.reason.startswith("skipped: no change (data md5 ")

    changed = load_settings([*BASE, "data.path=shifted.csv"], config_dir=CONF)
    decision = retrain_decision(changed)
    assert decision.retrain and decision.reason.startswith("new data: md5 "), decision

    fresh = load_settings(BASE, config_dir=CONF, root=tmp_path)
    assert retrain_decision(fresh) == RetrainDecision(True, "no registered model yet")


def test_on_change_pipeline_skips_when_nothing_changed(
    here: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = housing(
        capsys, "pipeline", "tracking=none", "clearml.pipeline.retrain=on_change"
    )
    assert code == 0, err
    [line] = out.splitlines()
    assert line.startswith("pipeline ") and ": skipped: no change (data md5 " in line, line
    summary = events(here, "pipeline")[-1]
    assert summary["status"] == "skipped"
    assert str(summary["reason"]).startswith("skipped: no change")


# --------------------------------------------------------------------------- on_change baseline

#: Synthetic data, tracked in a real MLflow store (the project's own conf/, copied).
MLFLOW = ("tracking=mlflow", "selection.metric=val/rmse", "selection.candidates=[ridge]")


def _trained(extra: tuple[str, ...], conf: Path) -> None:
    """prepare, train ridge (no CV), select_best: one registered version of housing-best."""
    settings = load_settings([*MLFLOW, *extra], config_dir=conf)
    context = runs.current()
    execute_stage("prepare", settings, context=context)
    model = load_settings([*MLFLOW, *extra, "model=ridge", "train.cv_folds=0"], config_dir=conf)
    execute_stage("train", model, context=context)
    execute_stage("select_best", settings, context=context)


@pytest.fixture(scope="module")
def rejected(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1 (200 rows) the champion; v2 on newer data (240 rows, conf/'s data), which the
    gate rejected (``registry.min_improvement`` out of reach)."""
    root = tmp_path_factory.mktemp("rejected")
    conf = root / "conf"
    shutil.copytree(CONF, conf)
    defaults = conf / "pipeline.yaml"
    defaults.write_text(defaults.read_text().replace("  - data: boston\n", "  - data: synthetic\n"))
    synthetic = conf / "data" / "synthetic.yaml"
    synthetic.write_text(synthetic.read_text().replace("n_rows: 100000", "n_rows: 240"))
    create_store(root / "mlflow.db")  # MLflow's empty schema, without its ~6 s migrations
    mp = pytest.MonkeyPatch()
    try:
        with in_project(root, mp, TRACKER_VARS):
            _trained(("data.n_rows=200",), conf)
            _trained(("registry.min_improvement=1e9",), conf)
    finally:
        mp.undo()
    return root


@pytest.fixture
def in_rejected(rejected: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with in_project(rejected, monkeypatch, TRACKER_VARS) as root:
        yield root


@pytest.mark.slow  # the rejected fixture: ~9 s (six tracked stages)
def test_on_change_baseline_is_the_newest_version_not_the_champion(in_rejected: Path) -> None:
    from mlflow import MlflowClient

    rejected = in_rejected
    client = MlflowClient(f"sqlite:///{rejected}/mlflow.db")
    assert str(client.get_model_version_by_alias("housing-best", "champion").version) == "1"
    assert client.get_model_version("housing-best", "2").tags["champion"] == "rejected"

    conf = rejected / "conf"
    same = retrain_decision(load_settings(MLFLOW, config_dir=conf))
    fingerprint = json.loads((rejected / "metrics/data_fingerprint.json").read_text())
    assert same.data_md5 == fingerprint["raw"]["md5"]  # v2's data, not the champion's
    assert not same.retrain, same
    assert same.reason.startswith(f"skipped: no change (data md5 {same.data_md5[:12]} is "
                                  "housing-best v2 (mlflow)'s; no drift"), same  # fmt: skip

    newer = retrain_decision(load_settings([*MLFLOW, "data.n_rows=260"], config_dir=conf))
    assert newer.retrain and newer.reason == (
        f"new data: md5 {(newer.data_md5 or '')[:12]}, housing-best v2 (mlflow) was trained "
        f"on {same.data_md5[:12]}"
    ), newer

    (rejected / "fresh").mkdir()
    empty = load_settings(MLFLOW, config_dir=conf, root=rejected / "fresh")
    assert retrain_decision(empty) == RetrainDecision(True, "no registered model yet")


@pytest.mark.slow  # the rejected fixture: ~9 s (six tracked stages)
def test_on_change_pipeline_after_a_rejected_challenger_skips(
    in_rejected: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rejected = in_rejected
    code = main(["--config-dir", str(rejected / "conf"), "pipeline", "tracking=mlflow",
                 "clearml.pipeline.retrain=on_change"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    [line] = out.splitlines()
    assert ": skipped: no change (data md5 " in line and "housing-best v2 (mlflow)'s" in line, line
    summary = events(rejected, "pipeline")[-1]
    assert summary["status"] == "skipped"
    assert str(summary["data_md5"]).startswith(line.split("data md5 ")[1][:12])


@pytest.mark.slow  # the rejected fixture
def test_on_change_without_the_newest_reference_compares_with_the_champions(
    in_rejected: Path,
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{in_rejected}/mlflow.db")
    run = client.get_run(str(client.get_model_version("housing-best", "2").run_id))
    artifact = Path(run.info.artifact_uri.removeprefix("file://")) / drift.PROFILE_ARTIFACT
    kept = [artifact, in_rejected / "models/ridge.profile.json"]  # v2's, both
    for path in kept:
        path.rename(path.with_name(path.name + ".kept"))
    try:
        decision = retrain_decision(load_settings(MLFLOW, config_dir=in_rejected / "conf"))
    finally:
        for path in kept:
            path.with_name(path.name + ".kept").rename(path)
    assert not decision.retrain, decision
    assert decision.reason.endswith(
        "; drift against housing-best v1 (mlflow)'s reference: housing-best v2 (mlflow): no "
        "reference profile of its training data (trained before drift profiles existed, or "
        "gone); retrain it (housing repro))"
    ), decision.reason
