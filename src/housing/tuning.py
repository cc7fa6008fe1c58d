"""Hyperparameter search (``housing tune``): one Optuna study per model, data and space.

The objective is the train stage's own CV RMSE (:func:`housing.stages.train.cross_validate_rmse`
on the train split, ``train.cv_folds`` folds, ``train.random_state``): the number
``select_best`` ranks by (``cv/rmse_mean``). Only the train split is read. A trial reports
the running mean RMSE after each fold, so the median pruner stops a poor trial early.

The study lives in an Optuna journal file (``tune.storage``), written trial by trial, so a
rerun continues it and Ctrl-C loses no finished trial; its name is the model plus a digest
of what the objective depends on (train split, estimator, fixed params, space, folds), so a
changed space or split starts a new study. ``tune.n_jobs`` > 1 runs the trials in that many
forked processes sharing the journal. ``apply`` writes the best params to
``conf/tuned/<model>.yaml``, which Hydra merges over the model's params in every command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing import io
from housing.data import schema
from housing.errors import ConfigError, DataError, HousingError, first_line
from housing.models import build_estimator, build_pipeline, check_params

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from housing.config import ParamRange, Settings

log = logging.getLogger(__name__)

#: The config group whose option ``<model>`` holds the tuned params (``conf/tuned``).
TUNED_GROUP = "tuned"
#: The override that leaves the tuned params out: a study searches from the defaults.
WITHOUT_TUNED = f"~{TUNED_GROUP}@model.{TUNED_GROUP}"
#: The stage name tuning runs are tracked under.
STAGE = "tune"
#: Study attribute: trials numbered below it were sent to the trackers.
TRACKED_ATTR = "tracked_through"
#: A worker process gets this long to stop after Ctrl-C before it is killed.
STOP_GRACE_SEC = 10.0


@dataclass(frozen=True)
class TrialRecord:
    """One finished (or failed, pruned) trial of a study."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING
    value: float | None  # CV RMSE mean (complete trials)
    params: dict[str, Any]
    fold_rmse: list[float]  # the running mean after each fold, as reported
    seconds: float | None


@dataclass(frozen=True)
class TuneResult:
    """What a ``housing tune`` run found; ``applied`` is the params file it wrote, if any."""

    model: str
    estimator: str
    study_name: str
    storage: Path
    cv_folds: int
    new_trials: int
    trials: list[TrialRecord]
    best: TrialRecord
    default_value: float
    default_params: dict[str, Any]
    importances: dict[str, float]
    seconds: float
    first_untracked: int = 0  # trials from this number on are not in the trackers yet
    applied: Path | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Trials of the study by state."""
        out: dict[str, int] = {}
        for trial in self.trials:
            out[trial.state] = out.get(trial.state, 0) + 1
        return out

    @property
    def best_params(self) -> dict[str, Any]:
        """The best trial's searched params (what ``--apply`` writes)."""
        return dict(self.best.params)

    @property
    def untracked(self) -> list[TrialRecord]:
        """The finished trials no earlier run of the study sent to the trackers."""
        return [t for t in self.trials if t.number >= self.first_untracked and t.state != "RUNNING"]

    @property
    def improvement(self) -> float:
        """Default CV RMSE minus the best one (positive: tuning helped)."""
        return self.default_value - float(self.best.value or math.nan)


@dataclass(frozen=True)
class _Objective:
    """Everything a trial needs; built once in the parent, inherited by forked workers."""

    estimator: str
    base_params: dict[str, Any]
    space: Mapping[str, ParamRange]
    scale: bool
    x: pd.DataFrame
    y: pd.Series
    folds: int
    random_state: int
    n_jobs: int | None

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from housing.stages.train import cross_validate_rmse

        params = {**self.base_params, **suggest(trial, self.space)}
        pipeline = build_pipeline(
            self.estimator, params, list(self.x.columns), scale=self.scale, n_jobs=self.n_jobs
        )
        running: list[float] = []
        fold_rmse: list[float] = []

        def on_fold(fold: int, rmse: float) -> None:
            fold_rmse.append(rmse)
            running.append(sum(fold_rmse) / len(fold_rmse))
            trial.report(running[-1], fold)
            if trial.should_prune():
                trial.set_user_attr("running_rmse", running)
                raise optuna.TrialPruned(f"fold {fold}: running CV RMSE {running[-1]:.4f}")

        mean, std = cross_validate_rmse(
            pipeline, self.x, self.y, self.folds, self.random_state, on_fold=on_fold
        )
        trial.set_user_attr("running_rmse", running)
        trial.set_user_attr("cv_rmse_std", std)
        trial.set_user_attr("pid", os.getpid())
        return mean

    def default_value(self) -> float:
        """The CV RMSE of the model's own params (what train runs without tuning)."""
        from housing.stages.train import cross_validate_rmse

        pipeline = build_pipeline(
            self.estimator,
            self.base_params,
            list(self.x.columns),
            scale=self.scale,
            n_jobs=self.n_jobs,
        )
        return cross_validate_rmse(pipeline, self.x, self.y, self.folds, self.random_state)[0]


def suggest(trial: optuna.Trial, space: Mapping[str, ParamRange]) -> dict[str, Any]:
    """One value per searched parameter, drawn by ``trial`` from ``space``."""
    values: dict[str, Any] = {}
    for name, spec in space.items():
        if spec.type == "categorical":
            values[name] = trial.suggest_categorical(name, list(spec.choices or ()))
        elif spec.type == "int":
            step = int(spec.step or 1)
            low, high = int(spec.low or 0), int(spec.high or 0)
            values[name] = trial.suggest_int(name, low, high, step=step, log=spec.log)
        else:
            low_f, high_f = float(spec.low or 0), float(spec.high or 0)
            values[name] = trial.suggest_float(name, low_f, high_f, step=spec.step, log=spec.log)
    return values


def check_space(settings: Settings) -> None:
    """Refuse a space that names no parameter, or one the estimator lacks or refuses."""
    model, space = settings.model, settings.tune.space
    if not space:
        raise ConfigError(
            f"tune.space: no search space for model {model.name}; "
            f"add conf/tune/{model.name}.yaml (see conf/tune/ridge.yaml)"
        )
    for name, spec in space.items():
        if spec.type == "categorical":
            candidates: Sequence[Any] = spec.choices or ()
        elif spec.type == "int":
            candidates = (int(spec.low or 0), int(spec.high or 0))
        else:
            candidates = (spec.low, spec.high)
        for value in candidates:
            params = {**model.params, name: value}
            check_params(model.estimator, {name: value}, prefix="tune.space")
            try:
                build_estimator(model.estimator, params)
            except ConfigError as exc:
                why = str(exc).split(": ", 1)[-1]
                raise ConfigError(f"tune.space.{name}: {value!r}: {why}") from None


def study_name(settings: Settings, train_md5: str, folds: int) -> str:
    """``<model>-<digest>``: the same name exactly when the objective is the same."""
    model = settings.model
    key = {
        "train_md5": train_md5,
        "estimator": model.estimator,
        "params": model.params,
        "scale": model.scale,
        "space": {k: v.model_dump() for k, v in settings.tune.space.items()},
        "folds": folds,
        "random_state": settings.train.random_state,
    }
    text = json.dumps(key, sort_keys=True, default=str)
    return f"{model.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def storage(path: Path, *, check: bool = True) -> optuna.storages.BaseStorage:
    """The Optuna journal storage in ``path`` (folder created; safe across processes).

    ``check``: refuse a journal whose last record was cut short (a writer killed mid-line);
    off where another process may be writing (workers, the report).
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if check and _torn(path):  # Optuna would glue its next record onto the cut one
            raise ValueError(
                "its last line is incomplete (a process was killed while writing); "
                "delete that line or move the file aside"
            )
        return JournalStorage(JournalFileBackend(str(path)))
    except (OSError, ValueError) as exc:
        raise HousingError(
            f"{path}: cannot open the Optuna journal (tune.storage): {first_line(exc)}"
        ) from None


def _torn(path: Path) -> bool:
    """Whether the journal ``path`` ends in the middle of a record."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"


def sampler(seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def _pruner() -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)


def _load_train(settings: Settings) -> pd.DataFrame:
    from housing.stages.train import read_split

    train = read_split(settings.paths.train)
    target = settings.data.target
    if target not in train.columns:
        raise DataError(f"{settings.paths.train}: target column {target!r} not found (data.target)")
    schema.check_split(train, (), target, str(settings.paths.train), "rerun prepare (dvc repro)")
    return train


def _objective(settings: Settings, train: pd.DataFrame, folds: int) -> _Objective:
    model = settings.model
    target = settings.data.target
    features = [c for c in train.columns if c != target]
    if not features:
        raise DataError(f"train split has no feature columns besides the target {target!r}")
    parallel = settings.tune.n_jobs > 1
    return _Objective(
        estimator=model.estimator,
        base_params=dict(model.params),
        space=settings.tune.space,
        scale=model.scale,
        x=train[features],
        y=train[target],
        folds=folds,
        random_state=settings.train.random_state,
        n_jobs=1 if parallel else settings.train.n_jobs,
    )


@dataclass(frozen=True)
class _Run:
    """One process's share of a run: the study, its sampler seed and budget."""

    path: Path
    name: str
    seed: int
    n_trials: int | None
    timeout: float | None


def _optimize(objective: _Objective, run: _Run) -> None:
    import optuna

    study = optuna.load_study(
        study_name=run.name,
        storage=storage(run.path, check=False),  # the parent checked it; workers write now
        sampler=sampler(run.seed),
        pruner=_pruner(),
    )
    study.optimize(objective, n_trials=run.n_trials, timeout=run.timeout, gc_after_trial=True)


def _worker(objective: _Objective, run: _Run, errors: Any) -> None:
    """A forked worker: its share of the trials; a user error goes back through ``errors``."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    try:
        with threadpool_limits(limits=1):
            _optimize(objective, run)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole group: the parent reports it
        os._exit(130)
    except HousingError as exc:
        errors.put(exc)
        os._exit(1)


def _run_parallel(objective: _Objective, run: _Run, n_jobs: int) -> None:
    """Split the trials over ``n_jobs`` forked processes; Ctrl-C stops every one."""
    import multiprocessing
    from dataclasses import replace

    context = multiprocessing.get_context("fork")
    errors = context.SimpleQueue()
    n_trials = run.n_trials
    shares: list[int | None] = (
        [n_trials // n_jobs + (i < n_trials % n_jobs) for i in range(n_jobs)]
        if n_trials is not None
        else [None] * n_jobs
    )
    processes = [
        context.Process(
            target=_worker,
            args=(objective, replace(run, seed=run.seed + i, n_trials=share), errors),
            name=f"housing-tune-{i}",
        )
        for i, share in enumerate(shares)
        if share != 0
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        _stop(processes)
        raise
    if not errors.empty():
        raise errors.get()
    failed = [p for p in processes if p.exitcode != 0]
    if failed:
        raise HousingError(
            f"tune: worker {failed[0].name} ended with exit code {failed[0].exitcode} "
            "(its message is above); finished trials are kept in the study"
        )


def _stop(processes: Sequence[Any]) -> None:
    """SIGINT to each live worker (its running trial is recorded failed), then SIGKILL."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_SEC
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def tune(settings: Settings) -> TuneResult:
    """Run ``tune.n_trials`` new trials (or until ``tune.timeout``) of the model's study.

    ``settings`` must be composed without the tuned params (:data:`WITHOUT_TUNED`), so the
    study searches around the model's own defaults. Raises ConfigError / DataError for bad
    input before any trial; KeyboardInterrupt (Ctrl-C) after the finished trials are saved.
    """
    import optuna

    from housing.runner import stop_signals

    cfg = settings.tune
    check_space(settings)
    train = _load_train(settings)
    if len(train) > settings.train.large_table_rows and settings.model.large is not None:
        raise ConfigError(
            f"train.large_table_rows: the train split has {len(train)} rows, so train would run "
            f"model {settings.model.name}'s large profile, which tune does not search; "
            "raise train.large_table_rows to tune the default profile"
        )
    folds = settings.train.folds_for(len(train))
    if folds < 2:
        raise ConfigError("train.cv_folds: tune needs CV (at least 2 folds), got 0")
    if folds > len(train):
        raise DataError(f"train split has {len(train)} rows, fewer than train.cv_folds={folds}")
    name = study_name(settings, io.file_md5(settings.paths.train), folds)
    objective = _objective(settings, train, folds)
    started = time.perf_counter()
    study = optuna.create_study(
        study_name=name,
        storage=storage(cfg.storage),
        direction="minimize",
        load_if_exists=True,
    )
    study.set_user_attr("model", settings.model.name)
    study.set_user_attr("estimator", settings.model.estimator)
    before = len(study.trials)
    # Distinct seeds per run and worker: a resumed study does not redraw its first points.
    seed = cfg.seed + 1000 * before
    run = _Run(cfg.storage, name, seed, cfg.n_trials, cfg.timeout)
    with stop_signals():
        if cfg.n_jobs == 1:
            _optimize(objective, run)
        else:
            _run_parallel(objective, run, cfg.n_jobs)
        study = optuna.load_study(study_name=name, storage=storage(cfg.storage, check=False))
        default = study.user_attrs.get("default_cv_rmse")
        if not isinstance(default, float):
            default = objective.default_value()
            study.set_user_attr("default_cv_rmse", default)
    tracked = study.user_attrs.get(TRACKED_ATTR, 0)
    trials = [_record(t) for t in study.trials]
    complete = [t for t in trials if t.state == "COMPLETE" and t.value is not None]
    if not complete:
        raise HousingError(
            f"tune: no trial of study {name} completed ({len(trials)} failed or pruned); "
            f"see {io.relpath(cfg.storage, settings.root)}"
        )
    best = min(complete, key=lambda t: float(t.value or math.inf))
    return TuneResult(
        model=settings.model.name,
        estimator=settings.model.estimator,
        study_name=name,
        storage=cfg.storage,
        cv_folds=folds,
        new_trials=len(study.trials) - before,
        trials=trials,
        best=best,
        default_value=float(default),
        default_params={k: v for k, v in settings.model.params.items() if k in cfg.space},
        importances=importances(study),
        seconds=time.perf_counter() - started,
        first_untracked=tracked if isinstance(tracked, int) else 0,
    )


def run(settings: Settings, *, apply_best: bool = False) -> TuneResult:
    """:func:`tune`, then :func:`apply` (``apply_best``), then the study's new trials to the
    trackers as a ``tune`` stage run (opened after the trials: forked workers must not
    inherit a tracker's session)."""
    from housing import runs
    from housing.runner import stop_signals
    from housing.tracking.base import StageRun
    from housing.tracking.recorder import record, tracked

    result = tune(settings)
    if apply_best:
        result = replace(result, applied=apply(settings, result))
    if not settings.tracking:
        return result
    context = runs.current()
    stage = StageRun(
        stage=STAGE,
        name=f"{STAGE}_{result.model}",
        pipeline_run_id=context.run_id,
        tags=(STAGE, result.model),
        context=context,
    )
    with stop_signals(), tracked(settings, stage) as tset:
        record(tset, STAGE, settings, result)
    finished = [t.number for t in result.trials if t.state != "RUNNING"]
    if finished:
        import optuna

        study = optuna.load_study(
            study_name=result.study_name, storage=storage(result.storage, check=False)
        )
        study.set_user_attr(TRACKED_ATTR, max(finished) + 1)
    return result


def _record(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    running = trial.user_attrs.get("running_rmse")
    if not isinstance(running, list):
        running = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
    seconds = trial.duration.total_seconds() if trial.duration is not None else None
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        value=trial.value if trial.state.name == "COMPLETE" else None,  # pruned: last report
        params=dict(trial.params),
        fold_rmse=[float(v) for v in running],
        seconds=seconds,
    )


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) of the complete trials; {} when too few."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}
    try:
        found = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # one distinct value, a single param drawn once
        return {}
    return {k: float(v) for k, v in found.items()}


def tuned_path(settings: Settings) -> Path:
    """``conf/tuned/<model>.yaml``: the tuned params every command merges (Hydra)."""
    return settings.config_dir / TUNED_GROUP / f"{settings.model.name}.yaml"


def apply(settings: Settings, result: TuneResult) -> Path:
    """Write the best params to :func:`tuned_path` (atomically); returns the path."""
    import yaml

    path = tuned_path(settings)
    value = float(result.best.value or math.nan)
    header = (
        "# @package model\n"
        f"# Tuned params of {result.model}, merged over conf/model/{result.model}.yaml's\n"
        f"# params by every command (a DVC param of train@{result.model}). Written by\n"
        f"# `housing tune model={result.model} --apply`: study {result.study_name},\n"
        f"# trial {result.best.number}, CV RMSE {value:.4f} ({result.cv_folds} folds; "
        f"defaults {result.default_value:.4f}).\n"
    )
    body = yaml.safe_dump({"params": result.best_params}, sort_keys=True)
    io.write_text(path, header + body)
    return path


@dataclass(frozen=True)
class StudySummary:
    """A stored study as the report shows it."""

    name: str
    model: str
    trials: list[TrialRecord]
    default_value: float | None
    importances: dict[str, float]

    @property
    def best(self) -> TrialRecord | None:
        done = [t for t in self.trials if t.value is not None]
        return min(done, key=lambda t: float(t.value or math.inf)) if done else None


def load_studies(path: Path) -> list[StudySummary]:
    """Every study in the journal ``path`` (none when it does not exist), oldest first."""
    import optuna

    if not path.is_file():
        return []
    store = storage(path, check=False)  # a running study may be mid-write
    out = []
    for summary in optuna.get_all_study_summaries(store, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=store)
        default = study.user_attrs.get("default_cv_rmse")
        out.append(
            StudySummary(
                name=summary.study_name,
                model=str(study.user_attrs.get("model", summary.study_name.rsplit("-", 1)[0])),
                trials=[_record(t) for t in study.trials],
                default_value=float(default) if isinstance(default, int | float) else None,
                importances=importances(study),
            )
        )
    return out
