"""New data snapshots: a later stage refuses a data problem in one line, and under DVC a
new snapshot (conf/pipeline.yaml data.path) reruns the pipeline and versions new models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from housing import io
from housing.data.sources import load_boston
from housing.errors import DataError
from housing.stages import evaluate, prepare, select_best, train
from tests.helpers import ran_stages, run_tool
from tests.scratch import make_scratch_repo

from .conftest import SettingsFactory, csv_overrides

SNAPSHOT = "snapshots/boston-2026-12.csv"
FAST = ["selection.candidates=[ridge]", "train.cv_folds=0", "selection.metric=val/rmse"]


@pytest.fixture
def selected(make_settings: SettingsFactory, csv_file: Path) -> SettingsFactory:
    """A root where prepare, train (ridge, no CV) and select_best ran on the small CSV."""
    base = csv_overrides(csv_file, *FAST)
    prepare.run(make_settings(base))
    train.run(make_settings([*base, "model=ridge"]))
    select_best.run(make_settings(base))

    def factory(extra: list[str] | tuple[str, ...] = ()) -> Any:
        return make_settings([*base, *extra])

    return factory


def _one_line(err: pytest.ExceptionInfo[DataError], path: Path) -> str:
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


def test_evaluate_names_a_feature_missing_from_the_test_split(selected: SettingsFactory) -> None:
    """It used to die in scikit-learn: ``ValueError: columns are missing: {'b'}``."""
    settings = selected()
    test = pd.read_csv(settings.paths.test)
    test.drop(columns=["b"]).to_csv(settings.paths.test, index=False)
    with pytest.raises(DataError) as err:
        evaluate.run(settings)
    message = _one_line(err, settings.paths.test)
    assert "column 'b': 24 rows missing: required column not in the table" in message
    assert message.endswith("; rerun the pipeline (dvc repro)")
    assert not settings.paths.test_metrics.exists()


def test_train_names_a_non_finite_value_in_the_train_split(selected: SettingsFactory) -> None:
    """It used to die in scikit-learn: ``Input X contains infinity``."""
    settings = selected(["model=ridge"])
    kept = io.file_sha256(settings.paths.model("ridge"))
    split = pd.read_csv(settings.paths.train)
    split.loc[[2, 5], "a"] = np.inf
    split.loc[7, "price"] = np.nan
    split.to_csv(settings.paths.train, index=False)
    with pytest.raises(DataError) as err:
        train.run(settings)
    message = _one_line(err, settings.paths.train)
    assert "column 'a': 2 rows not finite (inf or -inf) (+1 more: price)" in message
    assert io.file_sha256(settings.paths.model("ridge")) == kept


# --- under DVC, with the real MLflow registry ----------------------------------------


def _snapshot(seed: int) -> pd.DataFrame:
    """The Boston rows resampled with ``seed``: a new snapshot of the same table."""
    boston = load_boston().frame
    rows = np.random.default_rng(seed).integers(0, len(boston), len(boston))
    return boston.iloc[rows].reset_index(drop=True)


def _versions(repo: Path, name: str) -> dict[int, str]:
    """A registered model's versions and their data_md5 tags, read back from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    found = client.search_model_versions(f"name='{name}'")
    return {int(v.version): v.tags["data_md5"] for v in found}


def _raw_md5(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]
    return str(next(o["md5"] for o in lock["outs"] if o["path"] == "data/raw/housing.csv"))


def _ridge_only(repo: Path) -> None:
    """One candidate, ridge (conf and dvc.yaml agree), 2-fold CV: for speed."""
    conf, dvc_yaml = repo / "conf" / "pipeline.yaml", repo / "dvc.yaml"
    text = conf.read_text().replace("cv_folds: 5 ", "cv_folds: 2 ")
    candidates = "[linear_regression, ridge, random_forest, gradient_boosting]"
    conf.write_text(text.replace(candidates, "[ridge]"))
    others = ("linear_regression", "random_forest", "gradient_boosting")
    lines = dvc_yaml.read_text().splitlines(keepends=True)
    dvc_yaml.write_text("".join(ln for ln in lines if not any(o in ln for o in others)))
    subprocess.run(["git", "commit", "-qam", "ridge only"], cwd=repo, check=True)


@pytest.mark.slow
@pytest.mark.integration
def test_a_new_snapshot_reruns_dvc_repro_and_versions_models_on_its_data(
    tmp_path: Path,
) -> None:
    from housing.tracking.mlflow_spool import create_store

    repo = make_scratch_repo(tmp_path / "repo", defaults={"tracking": "mlflow"})
    _ridge_only(repo)
    create_store(repo / "mlflow.db")  # an empty store at once (no schema migrations)
    first = run_tool("dvc", repo, "repro", "train@ridge")
    assert first.returncode == 0, first.stderr[-2000:]
    bundled_md5 = _raw_md5(repo)
    assert _versions(repo, "housing-ridge") == {1: bundled_md5}

    # a new snapshot, named in conf/pipeline.yaml: DVC sees it and reruns the pipeline
    snapshot = repo / SNAPSHOT
    snapshot.parent.mkdir()
    _snapshot(7).to_csv(snapshot, index=False)
    conf = repo / "conf" / "pipeline.yaml"
    conf.write_text(conf.read_text().replace("path: conf/data", f"path: {SNAPSHOT}"))
    second = run_tool("dvc", repo, "repro")
    assert second.returncode == 0, second.stderr[-2000:]
    assert ran_stages(second.stdout) == ["prepare", "train@ridge", "select_best", "evaluate"]
    new_md5 = _raw_md5(repo)
    assert new_md5 != bundled_md5
    assert _versions(repo, "housing-ridge") == {1: bundled_md5, 2: new_md5}
    assert _versions(repo, "housing-best") == {1: new_md5}
    fingerprint = json.loads((repo / "metrics/data_fingerprint.json").read_text())
    assert (fingerprint["origin"], fingerprint["raw"]["md5"]) == (SNAPSHOT, new_md5)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["prepare"]
    assert {d["path"]: d["md5"] for d in lock["deps"]}[SNAPSHOT] == io.file_md5(snapshot)

    # the same file replaced by a bad one: DVC notices, prepare refuses it in one line
    outputs = [repo / "data/raw/housing.csv", repo / "metrics/data_fingerprint.json"]
    kept = {p: io.file_md5(p) for p in outputs}
    bad = _snapshot(8)
    bad.loc[[1, 2], "chas"] = 5
    bad.to_csv(snapshot, index=False)
    status = run_tool("dvc", repo, "status")
    assert f"modified:           {SNAPSHOT}" in status.stdout, status.stdout
    third = run_tool("dvc", repo, "repro")
    assert third.returncode != 0
    assert f"error: {SNAPSHOT}: column 'chas': 2 rows not one of [0, 1]" in third.stderr
    assert "Traceback" not in third.stdout + third.stderr
    assert {p: io.file_md5(p) for p in outputs} == kept
    assert _versions(repo, "housing-best") == {1: new_md5}


def test_dvc_exp_run_set_param_names_a_snapshot_hydra_reads(tmp_path: Path) -> None:
    """``dvc exp run -S conf/pipeline.yaml:data.path=FILE`` rewrites the file with DVC's own
    writer (it drops the quotes around ``"on"``); the config still loads, with the path."""
    import shutil

    from dvc.utils.hydra import apply_overrides

    from housing.config import load_settings

    from .conftest import CONF

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    apply_overrides(conf / "pipeline.yaml", [f"data.path={SNAPSHOT}"])
    settings = load_settings(["tracking=none"], conf, tmp_path)
    assert settings.data.path == Path(SNAPSHOT)
    assert settings.notifications.on == ("failed", "pipeline")
    assert settings.resolved["notifications"]["on"] == ["failed", "pipeline"]
    apply_overrides(conf / "pipeline.yaml", ["data.path=conf/data"])
    assert load_settings(["tracking=none"], conf, tmp_path).data.path is None
