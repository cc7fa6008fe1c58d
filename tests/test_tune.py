"""`housing tune`: real Optuna studies in a journal file, on a tiny synthetic split."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import yaml

from housing.cli import main
from housing.config import load_settings
from housing.tuning import storage
from tests.conftest import CONF, PROJECT

TINY = ["tracking=none", "data=synthetic", "data.n_rows=200", "train.cv_folds=3"]
#: gradient_boosting with few trees: a trial in a fraction of a second
FEW_TREES = ["tune.space.n_estimators.low=10", "tune.space.n_estimators.high=40"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root with its own conf/ copy and a prepared tiny split, as the cwd."""
    shutil.copytree(CONF, tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOUSING_CONFIG_DIR", str(tmp_path / "conf"))
    assert main(["-q", "prepare", *TINY]) == 0
    return tmp_path


def _study(root: Path, model: str) -> optuna.Study:
    store = storage(root / ".optuna" / "journal.log")
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    mine = [n for n in names if n.startswith(f"{model}-")]
    assert len(mine) == 1, names
    return optuna.load_study(study_name=mine[0], storage=store)


def test_dry_run_reads_no_test_split_and_rerun_continues_the_study(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / "data/processed/test.csv").unlink()  # tuning must never need it
    tuned = project / "conf/tuned/ridge.yaml"
    before = tuned.read_text()
    assert main(["tune", "model=ridge", *TINY, "tune.n_trials=4"]) == 0
    out = capsys.readouterr().out
    assert "4 new trial(s)" in out and "4 in all (4 complete)" in out, out
    assert "dry run: add --apply" in out, out
    assert tuned.read_text() == before
    study = _study(project, "ridge")
    values = [t.value for t in study.trials]
    assert min(v for v in values if v is not None) == study.best_value
    assert f"cv/rmse_mean {study.best_value:.4f}" in out
    # the default params' CV RMSE is the train stage's own number for the same folds
    assert main(["-q", "train", "model=ridge", *TINY]) == 0
    record = yaml.safe_load((project / "metrics/train_ridge.json").read_text())
    assert f"default: cv/rmse_mean {record['cv/rmse_mean']:.4f}" in out

    assert main(["tune", "model=ridge", *TINY, "tune.n_trials=2"]) == 0
    out = capsys.readouterr().out
    assert "2 new trial(s)" in out and "6 in all" in out, out
    params = [t.params["alpha"] for t in _study(project, "ridge").trials]
    assert len(set(params)) == 6, params  # the rerun drew new points, not the first ones


def test_apply_writes_params_that_train_composes(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tune", "model=ridge", *TINY, "tune.n_trials=3", "--apply"]) == 0
    out = capsys.readouterr().out
    assert "applied: conf/tuned/ridge.yaml" in out, out
    best = _study(project, "ridge").best_params["alpha"]
    settings = load_settings(["model=ridge", *TINY], config_dir=project / "conf", root=project)
    assert settings.model.params["alpha"] == pytest.approx(best)
    # a command-line override still wins over the tuned value
    again = load_settings(["model=ridge", "model.params.alpha=7.5", *TINY], root=project)
    assert again.model.params["alpha"] == 7.5
    # DVC tracks the tuned file as a param of each train stage
    train = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["train"]["do"]
    assert {"conf/tuned/${item}.yaml": None} in train["params"]
    # a rerun searches from the defaults again: the same study, continued
    assert main(["tune", "model=ridge", *TINY, "tune.n_trials=1"]) == 0
    assert "4 in all" in capsys.readouterr().out


def test_every_model_has_a_tuned_params_file() -> None:
    """Any model can be a candidate: its train stage's DVC params file exists."""
    for model in sorted((CONF / "model").glob("*.yaml")):
        tuned = yaml.safe_load((CONF / "tuned" / model.name).read_text())
        assert isinstance(tuned["params"], dict), model.name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model=ridge", "tune.space.alpha.low=500"],
            "tune.space.alpha: low 500 must be < high 100",
        ),
        (["model=ridge", "tune.space.alpha.low=0"], "tune.space.alpha: log scale needs low > 0"),
        (["model=linear_regression"], "tune.space: no search space for model linear_regression"),
        (
            ["model=ridge", "+tune.space.depth={type: int, low: 1, high: 3}"],
            "tune.space.depth: 1: not a parameter of Ridge",
        ),
        (["model=ridge", "tune.n_trials=0"], "tune.n_trials: must be >= 1, got 0"),
        (["model=ridge", "train.cv_folds=0"], "train.cv_folds: tune needs CV"),
        (["model=ridge", "tune.n_trials=null"], "tune.n_trials: null needs a tune.timeout"),
        (
            ["model=ridge", "tune.space.alpha.type=categorical"],
            "tune.space.alpha: categorical needs choices",
        ),
    ],
)
def test_bad_config_is_one_line(
    project: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    assert main(["tune", *TINY, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {message}"), err
    assert not (project / ".optuna").exists()


def test_a_torn_journal_is_refused_untouched(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = project / ".optuna" / "journal.log"
    journal.parent.mkdir()
    journal.write_text('{"op_code": 0, "worker_id": "w", "study_name": "x", "directi')
    before = journal.read_bytes()
    assert main(["tune", "model=ridge", *TINY, "tune.n_trials=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {journal}: cannot open the Optuna journal (tune.storage): its last "
                   "line is incomplete (a process was killed while writing); delete that line "
                   "or move the file aside"], err  # fmt: skip
    assert journal.read_bytes() == before


def test_timeout_alone_bounds_a_run(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    budget = ["tune.n_trials=null", "tune.timeout=1.5"]
    assert main(["tune", "model=ridge", *TINY, *budget]) == 0
    trials = _study(project, "ridge").trials
    assert len(trials) >= 1 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert f"{len(trials)} new trial(s)" in capsys.readouterr().out


def test_parallel_trials_run_in_worker_processes(project: Path) -> None:
    overrides = ["tune.n_jobs=2", "tune.n_trials=4"]
    assert main(["-q", "tune", "model=ridge", *TINY, *overrides]) == 0
    trials = _study(project, "ridge").trials
    assert len(trials) == 4
    pids = {t.user_attrs.get("pid") for t in trials if t.state.name == "COMPLETE"}
    assert len(pids) == 2 and os.getpid() not in pids, pids


@pytest.mark.slow
def test_ctrl_c_keeps_finished_trials(project: Path) -> None:
    """SIGINT to the process group mid-study: 130, one line, every finished trial kept."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    args = [*TINY, "tune.n_jobs=2", "tune.n_trials=500", *FEW_TREES]
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "housing"), "tune", "model=gradient_boosting", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    journal = project / ".optuna" / "journal.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if journal.is_file() and len(_finished(project)) >= 2:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=20)
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted", err
    assert "Traceback" not in err, err
    finished = _finished(project)
    assert len(finished) >= 2
    states = {t.state.name for t in _study(project, "gradient_boosting").trials}
    assert "RUNNING" not in states, states


def _finished(project: Path) -> list[optuna.trial.FrozenTrial]:
    study = _study(project, "gradient_boosting")
    return [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]


@pytest.mark.slow
def test_trials_tracked_once_in_mlflow_and_clearml_offline(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A parent run per tune run with one child run per trial; a rerun adds only its own."""
    from mlflow import MlflowClient

    from housing.tracking.mlflow_spool import create_store
    from housing.tracking.offline import list_sessions, read_events

    create_store(project / "mlflow.db")  # an empty store at once (no schema migrations)
    tracked = [*TINY, "tracking=both", "clearml.mode=offline"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a console shows: no deprecations
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        assert main(["-q", "tune", "model=ridge", *tracked, "tune.n_trials=3"]) == 0
    # the trials table reaches ClearML without a library warning on the console
    assert [str(w.message) for w in caught if "/clearml/" in w.filename] == []
    assert main(["-q", "tune", "model=ridge", *TINY, "tracking=mlflow", "tune.n_trials=2"]) == 0
    study = _study(project, "ridge")
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("housing")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.info.run_name == "tune_ridge"]
    trials = [r for r in runs if r.data.tags.get("housing.run_type") == "trial"]
    assert len(parents) == 2
    assert sorted(int(r.data.tags["housing.tune.trial"]) for r in trials) == [0, 1, 2, 3, 4]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {p.info.run_id for p in parents}
    latest = max(parents, key=lambda r: r.info.start_time)
    assert latest.data.tags["housing.tune.best_trial"] == str(study.best_trial.number)
    assert latest.data.metrics["tune/best_cv_rmse"] == pytest.approx(study.best_value)
    for run in trials:
        number = int(run.data.tags["housing.tune.trial"])
        frozen = study.trials[number]
        assert run.data.params["alpha"] == str(frozen.params["alpha"])
        if frozen.state.name == "COMPLETE":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["cv/rmse_mean"] == pytest.approx(frozen.value)
    sessions = [s for s in list_sessions(project / ".clearml") if s.name.endswith("tune_ridge")]
    assert len(sessions) == 1
    events = list(read_events(sessions[0], "metrics.jsonl"))
    tables = [e for e in events if e.get("type") == "plot" and e.get("metric") == "tune trials"]
    assert len(tables) == 1 and "alpha" in tables[0]["plot_str"]
    per_trial = [
        e["iter"]
        for e in events
        if e.get("metric") == "tune" and e.get("variant") == "cv/rmse_mean"
    ]
    complete = [t.number for t in study.trials[:3] if t.state.name == "COMPLETE"]
    assert sorted(per_trial) == complete


def test_report_has_a_tuning_section(project: Path) -> None:
    from housing.reporting.report import build_report

    assert main(["-q", "tune", "model=ridge", *TINY, "tune.n_trials=3"]) == 0
    settings = load_settings(TINY, root=project)
    result = build_report(settings)
    markdown = result.markdown_path.read_text()
    section = markdown.split("## Hyperparameter tuning", 1)[1].split("\n## ", 1)[0]
    study = _study(project, "ridge")
    row = next(line for line in section.splitlines() if line.startswith("| ridge |"))
    assert f"| 3 / 3 | {study.best_value:.3f} |" in row, row
    assert f"alpha={study.best_params['alpha']:.4g}" in row, row
    names = {p.name for p in result.figure_paths}
    assert {"tuning_history_ridge.svg", "tuning_importances_ridge.svg"} <= names, names
    assert 'id="tuning"' in result.html_path.read_text()
