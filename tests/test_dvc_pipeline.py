"""The DVC pipeline in a temporary copy of the repository, with the real dvc."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from housing.config import compose
from tests.conftest import CONF, PROJECT, is_score_file, metrics_records
from tests.helpers import ran_stages, run_tool
from tests.scratch import make_scratch_repo


def test_dvc_yaml_candidates_match_the_config() -> None:
    """select_best depends on exactly the models listed in selection.candidates."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    candidates = compose(["tracking=none"], CONF)["selection"]["candidates"]
    deps = set(stages["select_best"]["deps"])
    for name in candidates:
        assert f"models/{name}.joblib" in deps
        assert f"metrics/train_{name}.json" in deps
        assert f"metrics/train_{name}.meta.json" in deps
    listed = {d.split("/")[-1].removesuffix(".joblib") for d in deps if d.startswith("models/")}
    assert listed == set(candidates)
    evaluated = {
        d.split("/")[-1].removesuffix(".joblib")
        for d in stages["evaluate"]["deps"]
        if d.startswith("models/") and d != "models/best_model.joblib"
    }
    assert evaluated == set(candidates)
    assert stages["train"]["foreach"] == "${selection.candidates}"


def test_dvc_params_name_existing_config_keys() -> None:
    cfg = compose(["tracking=none"], CONF)
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for stage in ("prepare", "select_best"):
        for entry in stages[stage]["params"]:
            for file, keys in entry.items():
                assert file == "conf/pipeline.yaml"
                for key in keys:
                    top = yaml.safe_load((PROJECT / file).read_text())
                    assert key in top or key in cfg, key


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tool("dvc", repo, *args)


def _housing(
    repo: Path, *args: str, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return run_tool("housing", repo, *args, unset=unset)


_ran = ran_stages


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC copy of the project, tracking off, reproduced once."""
    root = make_scratch_repo(tmp_path_factory.mktemp("repo"), defaults={"tracking": "none"})
    result = _dvc(root, "repro")
    assert result.returncode == 0, result.stderr
    expected = ["prepare", "train@linear_regression", "train@ridge", "train@random_forest",
                "train@gradient_boosting", "select_best", "evaluate"]  # fmt: skip
    assert sorted(_ran(result.stdout)) == sorted(expected)
    return root


@pytest.mark.slow
@pytest.mark.integration
def test_fresh_repro_produces_every_output(repo: Path) -> None:
    for rel in ["data/raw/housing.csv", "data/processed/train.csv", "data/processed/test.csv",
                "models/best_model.joblib", "metrics/train_metrics.json",
                "metrics/test_metrics.json", "plots/test_predictions.csv"]:  # fmt: skip
        assert (repo / rel).is_file(), rel
    test_rmse = json.loads((repo / "metrics/test_metrics.json").read_text())
    assert test_rmse["test/rmse"] < 3.0
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    raw = next(o for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/raw/housing.csv")
    fingerprint = json.loads((repo / "metrics/data_fingerprint.json").read_text())
    assert raw["md5"] == fingerprint["raw"]["md5"]  # the raw version is its DVC hash


@pytest.mark.slow
@pytest.mark.integration
def test_second_repro_is_a_noop(repo: Path) -> None:
    result = _dvc(repo, "repro")
    assert result.returncode == 0, result.stderr
    assert _ran(result.stdout) == []
    assert "up to date" in result.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_metrics_and_plots_are_declared(repo: Path) -> None:
    metrics = _dvc(repo, "metrics", "show", "--json")
    assert metrics.returncode == 0, metrics.stderr
    shown = json.loads(metrics.stdout)
    (files,) = [entry["data"] for entry in shown.values()]
    assert list(files) == ["metrics.json"]  # the one DVC metrics file
    assert set(files["metrics.json"]["data"]) == {"rmse", "mae", "r2"}
    plots = _dvc(repo, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    for name in ("predicted_vs_actual", "residuals", "feature_importances"):
        assert name in plots.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_metrics_show_fits_in_40_columns(repo: Path) -> None:
    shown = _dvc(repo, "metrics", "show")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert any("metrics.json" in line for line in lines), shown.stdout
    assert max(len(line) for line in lines) <= 40, shown.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_score_files_hold_numbers_only(repo: Path) -> None:
    scores = [p for p in (repo / "metrics").glob("*.json") if is_score_file(p)]
    names = {p.name for p in scores}
    assert {"train_ridge.json", "train_metrics.json", "test_metrics.json"} <= names
    for path in [*scores, repo / "metrics.json"]:
        data = json.loads(path.read_text())
        assert isinstance(data, dict) and data, path
        bad = {k: v for k, v in data.items() if type(v) not in (int, float)}
        assert bad == {}, path
        assert path.with_name(f"{path.stem}.meta.json").is_file() or path.name == "metrics.json"
    assert set(json.loads((repo / "metrics.json").read_text())) == {"rmse", "mae", "r2"}
    meta = json.loads((repo / "metrics/train_ridge.meta.json").read_text())
    assert meta["model_path"] == "models/ridge.joblib"
    fingerprint = json.loads((repo / "metrics/data_fingerprint.json").read_text())
    assert fingerprint["origin"] == "mlxtend:boston_housing.csv"
    assert fingerprint["raw"]["path"] == "data/raw/housing.csv"


@pytest.mark.slow
@pytest.mark.integration
def test_versioned_outputs_hold_no_absolute_path(repo: Path) -> None:
    import sysconfig

    written = [repo / "dvc.lock", repo / "metrics.json"]
    for folder in ("metrics", "plots"):
        written += [p for p in (repo / folder).rglob("*") if p.is_file()]
    written += list(repo.glob("*.meta.json"))
    needles = {str(repo), str(repo.resolve()), sysconfig.get_paths()["purelib"], "site-packages"}
    found = [
        f"{p.relative_to(repo)}: {needle}"
        for p in written
        for needle in needles
        if needle in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert found == []
    assert any(p.name == "train_ridge.meta.json" for p in written)


@pytest.mark.slow
@pytest.mark.integration
def test_status_shows_the_selected_model_and_its_test_rmse(repo: Path) -> None:
    status = _housing(repo, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    meta = json.loads((repo / "metrics/test_metrics.meta.json").read_text())
    rmse = json.loads((repo / "metrics.json").read_text())["rmse"]
    assert f"selected model: {meta['model']}" in status.stdout
    assert f"test/rmse={rmse:.3f}" in status.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_push_and_pull_through_the_local_remote(repo: Path) -> None:
    push = _dvc(repo, "push")
    assert push.returncode == 0, push.stderr
    assert any((repo / "dvc-storage").rglob("*"))
    (repo / "models/best_model.joblib").unlink()
    shutil.rmtree(repo / ".dvc/cache")
    pull = _dvc(repo, "pull")
    assert pull.returncode == 0, pull.stderr
    assert (repo / "models/best_model.joblib").is_file()
    status = _dvc(repo, "status")
    assert "up to date" in status.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_parallel_repro_stops_on_a_failing_train_stage(tmp_path: Path) -> None:
    other = make_scratch_repo(tmp_path / "failing", defaults={"tracking": "none"})
    (other / "conf/model/ridge.yaml").write_text(
        "name: ridge\nestimator: ridge\nscale: true\nparams:\n  alpha: -1.0\n"
    )
    done = _housing(other, "repro", "-j", "2")
    assert done.returncode != 0
    assert "model.params.alpha" in done.stderr
    assert "train@ridge" in done.stderr
    assert not (other / "models/best_model.joblib").exists()
    lines = (other / "metrics/pipeline_events.jsonl").read_text().splitlines()
    summary = json.loads(lines[-1])
    assert (summary["stage"], summary["status"]) == ("pipeline", "failed")
    assert "train@ridge" in summary["error"]


@pytest.mark.slow
@pytest.mark.integration
def test_clearml_pipeline_offline_matches_the_dvc_pipeline(repo: Path, tmp_path: Path) -> None:
    """`housing pipeline` with no server (the local engine, train stages in two parallel
    workers) gives the serial DVC pipeline's metrics and winner, and leaves DVC up to date."""
    other = make_scratch_repo(tmp_path / "clearml-pipeline", defaults={"tracking": "clearml"})
    done = _housing(
        other, "pipeline", "--max-workers", "2",
        unset=("CLEARML_API_ACCESS_KEY", "CLEARML_API_SECRET_KEY"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    status = _dvc(other, "status")
    assert "up to date" in status.stdout, status.stdout
    lock = yaml.safe_load((other / "dvc.lock").read_text())["stages"]
    assert {"prepare", "select_best", "evaluate", "train@ridge"} <= set(lock)
    # the console: each line once, the champion decision once, no library banners/warnings
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    assert len(lines) == len(set(lines)), lines
    assert sum("champion decision" in ln for ln in lines) == 1, lines
    assert not [ln for ln in lines if "ClearML Task" in ln or "Warning" in ln], lines
    for name in compose(["tracking=none"], CONF)["selection"]["candidates"]:
        ours = json.loads((other / f"metrics/train_{name}.json").read_text())
        dvcs = json.loads((repo / f"metrics/train_{name}.json").read_text())
        ours.pop("train/fit_seconds")
        dvcs.pop("train/fit_seconds")
        assert ours == dvcs, name
    for rel in ("metrics/train_metrics.meta.json", "metrics/test_metrics.meta.json"):
        ours = json.loads((other / rel).read_text())
        dvcs = json.loads((repo / rel).read_text())
        assert ours.get("best_model", ours.get("model")) == dvcs.get(
            "best_model", dvcs.get("model")
        )
    for rel in ("metrics/test_metrics.json", "metrics.json"):
        assert json.loads((other / rel).read_text()) == json.loads((repo / rel).read_text())
    serial = metrics_records(repo / "metrics")["train_metrics.json"]
    parallel = metrics_records(other / "metrics")["train_metrics.json"]
    assert parallel["best_model"] == serial["best_model"]
    assert parallel["best_value"] == serial["best_value"]
    assert len(list((other / ".clearml" / "offline").glob("offline-*.zip"))) == 7
    shown = _housing(other, "status")
    assert shown.returncode == 0, shown.stdout
    assert "SUCCEEDED" in shown.stdout and "train_ridge" in shown.stdout
    assert f"selected model: {serial['best_model']}" in shown.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_changed_ridge_alpha_reruns_only_ridge_and_downstream(repo: Path) -> None:
    ridge = repo / "conf/model/ridge.yaml"
    ridge.write_text(ridge.read_text().replace("alpha: 1.0", "alpha: 3.0"))
    result = _dvc(repo, "repro")
    assert result.returncode == 0, result.stderr
    ran = _ran(result.stdout)
    assert ran[0] == "train@ridge"
    assert set(ran) <= {"train@ridge", "select_best", "evaluate"}
    assert "train@ridge" in ran
    record = json.loads((repo / "metrics/train_ridge.meta.json").read_text())
    assert record["params"]["alpha"] == 3.0
