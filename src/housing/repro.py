"""The one local engine: ``dvc.yaml`` run by DVC's rules, stages in pre-warmed workers.

``housing repro`` (``make run``) reproduces the pipeline exactly as ``dvc repro``
decides it, but faster:

- DVC's own graph and plan (``get_active_graph`` + ``plan_repro``) give the stages in
  dependency order; a stage is checked with DVC's ``Stage.changed`` once everything
  upstream of it is done, exactly when ``dvc repro`` would check it.
- A changed stage whose command is one of the project's stage scripts
  (``python scripts/<stage>.py [overrides]``) runs as a function call in a worker
  process forked from a ``forkserver`` that imported scikit-learn, pandas, MLflow and
  ClearML once; any other command runs in a shell, as DVC would run it. Independent
  stages (the ``foreach`` train stages) run ``jobs`` at a time.
- Each finished stage is recorded the way ``dvc repro`` records it (``save``,
  ``commit``, dump to ``dvc.lock``), in this process, under DVC's repository lock,
  so ``dvc status`` is clean afterwards and a second run is a no-op.

Workers are forked per stage (``max_tasks_per_child=1``): ClearML keeps one task per
process, and a fresh process cannot carry tracker state from a previous stage.
On a failure no new stage starts; running ones finish and are recorded (as
``dvc repro --keep-going`` would keep them), and the run fails.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from housing.errors import HousingError, Terminated, first_line
from housing.quirks import clearml as clearml_quirks
from housing.runner import STAGES, stop_requested, stop_signals

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.runs import RunContext

log = logging.getLogger("housing")

#: The stage scripts whose commands run as function calls in a warm worker.
STAGE_SCRIPTS: Final = {f"scripts/{name}.py": name for name in STAGES}
#: Imported once by the fork server, so each stage's process starts warm.
PRELOAD_MODULES: Final = (
    "housing.runner",
    "housing.config",
    "housing.stages.prepare",
    "housing.stages.train",
    "housing.stages.select_best",
    "housing.stages.evaluate",
    "housing.tracking.recorder",
    "housing.tracking.mlflow",
    "housing.tracking.clearml",
    "pandas",
    "pyarrow.csv",
    "joblib",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "sklearn.model_selection",
    "mlflow",
    "mlflow.sklearn",
    "mlflow.store.tracking.sqlalchemy_store",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "clearml",
    # imported on first use by the stages and the trackers
    "housing.features",
    "housing.runs",
    "sklearn.impute",
    "mlflow.pyfunc",
    "mlflow.store.model_registry.sqlalchemy_store",
    "mlflow.tracing.processor.otel",
    "sqlalchemy.dialects.sqlite",
    "alembic.command",
    "alembic.config",
    "clearml.utilities.pigar.reqs",
    *clearml_quirks.SERVICE_MODULES,
    "PIL.PngImagePlugin",
    # last: first-use work (ClearML's config, fonts); see housing.tracking.warmup
    "housing.tracking.preload",
)

StageStatus = Literal["ran", "skipped", "failed", "running", "not run"]


class ReproError(HousingError):
    """A stage failed or DVC refused; the message names the stage."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class StageJob:
    """What a worker needs to run one DVC stage."""

    name: str  # DVC addressing, e.g. train@ridge
    cmd: str
    wdir: str
    root: str
    context: RunContext
    overrides: tuple[str, ...] = ()  # tracking-only overrides appended to the stage's
    verbosity: int = 0
    threads: int = 0  # OpenMP/BLAS threads of the stage (its share of the cores); 0: all


@dataclass(frozen=True)
class StageOutcome:
    name: str
    ok: bool
    seconds: float
    error: str | None = None
    exit_code: int = 0


@dataclass
class ReproResult:
    """What one ``housing repro`` did."""

    run_id: str
    stages: dict[str, StageStatus] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 0
    killed: bool = False  # stopped by Ctrl-C or SIGTERM

    @property
    def ok(self) -> bool:
        return self.error is None

    def named(self, status: StageStatus) -> list[str]:
        return [name for name, s in self.stages.items() if s == status]


def stage_call(cmd: str) -> tuple[str, list[str]] | None:
    """``(stage, overrides)`` when ``cmd`` runs one of the project's stage scripts."""
    try:
        argv = shlex.split(cmd)
    except ValueError:
        return None
    if len(argv) < 2 or Path(argv[0]).name not in ("python", "python3"):
        return None
    stage = STAGE_SCRIPTS.get(Path(argv[1]).as_posix().removeprefix("./"))
    return (stage, argv[2:]) if stage else None


def run_job(job: StageJob) -> StageOutcome:
    """Worker side: run one stage (a function call, or the command in a shell)."""
    import signal

    from housing.entry import configure_logging

    t0 = time.monotonic()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # an idle worker ignores it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(job.wdir)
    configure_logging(job.verbosity)
    call = stage_call(job.cmd)
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    # Ctrl-C / SIGTERM: the stage's runs and events say killed. Parallel stages share
    # the cores: OpenMP (histogram boosting) oversubscribed is many times slower.
    with stop_signals(), threadpool_limits(limits=job.threads or None):
        return _run_call(job, call, t0)


def _run_call(job: StageJob, call: tuple[str, list[str]] | None, t0: float) -> StageOutcome:
    import subprocess

    try:
        if call is None:
            env = {**os.environ, "DVC_ROOT": job.root, "DVC_STAGE": job.name}
            code = subprocess.call(job.cmd, shell=True, cwd=job.wdir, env=env)
            error = None if code == 0 else f"command exited with code {code}"
            return StageOutcome(job.name, code == 0, time.monotonic() - t0, error, code)
        from housing.config import load_settings
        from housing.entry import settle_clearml
        from housing.runner import execute_stage

        stage, overrides = call
        settings = load_settings([*overrides, *job.overrides], root=Path(job.wdir))
        settle_clearml(settings)  # this worker's start-up: it runs this one stage
        execute_stage(stage, settings, context=job.context)
    except HousingError as exc:
        return StageOutcome(job.name, False, time.monotonic() - t0, str(exc), exc.exit_code)
    except Exception as exc:
        if stop_requested():  # a library turned the Ctrl-C / SIGTERM into another error
            return StageOutcome(job.name, False, time.monotonic() - t0, "interrupted", 130)
        log.exception("stage %s crashed", job.name)
        error = first_line(exc, typed=True)
        return StageOutcome(job.name, False, time.monotonic() - t0, error, 1)
    return StageOutcome(job.name, True, time.monotonic() - t0)


def finish_job(job: StageJob, status: str) -> None:
    """Worker side: close the pipeline run in the trackers (the engine owns it)."""
    from housing.config import load_settings
    from housing.tracking.recorder import finish_pipeline

    os.chdir(job.root)
    finish_pipeline(load_settings(job.overrides, root=Path(job.root)), job.context, status)


def fork_server_env(settings: Settings | None) -> dict[str, str]:
    """What the fork server's environment needs, for the workers forked from it: the
    run's MLflow HTTP budget (``mlflow.timeout_sec`` / ``retries``, see
    :mod:`housing.entry`) and, for its warm-up (:mod:`housing.tracking.warmup`), the
    ClearML variables the stages' trackers will use with ``settings`` (None: the config
    is broken, the stages will say so)."""
    import json

    from housing.entry import mlflow_http_env
    from housing.tracking.recorder import clearml_env
    from housing.tracking.warmup import ENV_VARIABLE, WARM_VARIABLES

    if settings is None:
        return {}
    budget = mlflow_http_env(settings.mlflow.timeout_sec, settings.mlflow.retries, os.environ)
    try:
        env = clearml_env(settings)
        env = {k: env[k] for k in WARM_VARIABLES if env.get(k)}
    except (HousingError, ValueError, OSError) as exc:  # the stages report it
        log.debug("fork server warm-up without ClearML's config: %s", exc)
        return budget
    return {**budget, ENV_VARIABLE: json.dumps(env)} if env else budget


def preload(settings: Settings | None) -> None:
    """Import and warm up in this process what the fork server does (for a process that
    forks stages itself: the stage server, the stage-cost benchmark)."""
    import importlib

    from housing.entry import start_up_environment

    with start_up_environment(fork_server_env(settings)):
        for module in PRELOAD_MODULES:
            importlib.import_module(module)


def _make_pool(workers: int, env: Mapping[str, str]) -> Any:
    """The workers; the fork server starts now, with ``env`` added to its environment
    (this process's own is restored right after)."""
    import multiprocessing
    from multiprocessing import forkserver

    from housing.entry import start_up_environment
    from housing.quirks.multiprocessing import StoppablePool

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD_MODULES))
    with start_up_environment(env):  # before the pool's threads; it inherits only this
        forkserver.ensure_running()
    return StoppablePool(
        max_workers=workers, mp_context=ctx, max_tasks_per_child=1, initializer=_idle_worker
    )


def _idle_worker() -> None:
    """A new worker ignores Ctrl-C until it runs a stage (:func:`run_job`): CPython's fork
    server hands its children the default SIGINT handler, so one idling in the pool's queue
    printed a ``KeyboardInterrupt`` traceback on Ctrl-C (the engine stops it with SIGTERM)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class _Run:
    """One engine run: where, how wide, the template of its stage jobs, its workers."""

    root: Path
    jobs: int
    force: bool
    template: StageJob
    notify: Callable[[str, str], None]
    pool: Any = None

    @functools.cached_property
    def settings(self) -> Settings | None:
        """The run's settings (``conf/`` + its tracking overrides), loaded once; None if
        they do not load: each stage reports its own config error."""
        from housing.config import load_settings

        try:
            return load_settings(
                list(self.template.overrides), config_dir=self.root / "conf", root=self.root
            )
        except (HousingError, ValueError):
            return None

    def start(self) -> None:
        """Start the workers' fork server; started before planning (when every stage will
        run), it imports and warms up while DVC plans."""
        if self.pool is None:
            self.pool = _make_pool(self.jobs, fork_server_env(self.settings))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.start()
        return self.pool.submit(fn, *args)


def reproduce(
    root: Path,
    *,
    jobs: int | None = None,
    force: bool = False,
    overrides: Sequence[str] = (),
    context: RunContext | None = None,
    verbosity: int = 0,
    on_event: Callable[[str, str], None] | None = None,
) -> ReproResult:
    """Reproduce ``root``'s ``dvc.yaml`` (see the module docstring); never raises for a
    failed stage: the result carries the error. ``overrides`` are tracking-only Hydra
    overrides added to every stage; ``on_event(stage, what)`` hears ``running``,
    ``skipped``, ``done`` and ``failed`` as they happen.

    Ctrl-C (:class:`KeyboardInterrupt`) and SIGTERM (:class:`~housing.errors.Terminated`)
    stop every worker and what it started within seconds, record the runs as killed
    (MLflow KILLED, ClearML failed, ``killed`` events and a summary) and are re-raised."""
    from housing import runs

    root = root.resolve()
    ctx = (context or runs.current()).owned_by_engine()
    result = ReproResult(ctx.run_id)
    jobs = jobs or _default_jobs()
    threads = max(1, _default_jobs() // jobs)
    template = StageJob("", "", str(root), str(root), ctx, tuple(overrides), verbosity, threads)
    run = _Run(root, jobs, force, template, on_event or (lambda s, w: None))
    t0 = time.monotonic()
    try:
        with stop_signals():
            if force or not (root / "dvc.lock").exists():  # everything will run
                run.start()
            _reproduce(run, result)
            if run.pool is not None and (result.named("ran") or result.named("failed")):
                _finish(run, template, "completed" if result.ok else "failed")
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            terminated = isinstance(exc, Terminated)
            result.error = "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"
            result.exit_code = Terminated.exit_code if terminated else 130
            result.killed = True
        elif result.error is None:
            result.error, result.exit_code = first_line(exc, typed=True), 1
        raise
    finally:
        with stop_signals():  # a second Ctrl-C / SIGTERM does not cut the cleanup short
            started = [s for s, v in result.stages.items() if v in ("ran", "failed", "running")]
            if run.pool is not None:
                _shutdown(run.pool, interrupted=result.killed, idle=not started)
            if result.killed and started and not result.named("running"):
                _close_killed(run, template)  # between stages: the parent may be open
            result.seconds = time.monotonic() - t0
            _summarise(run, result)
    return result


def _finish(run: _Run, job: StageJob, status: str) -> None:
    """Close the pipeline run in the trackers, in a worker (warm); here if the pool broke
    (a worker was killed: ``kill -9``)."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        run.submit(finish_job, job, status).result()
    except BrokenProcessPool:
        if run.settings is not None:
            from housing.tracking.recorder import finish_pipeline

            finish_pipeline(run.settings, job.context, status)


def _close_killed(run: _Run, job: StageJob) -> None:
    """After an interrupt between stages: close the pipeline's parent run as KILLED (a
    stage that was running closes its own run and the parent, as killed)."""
    if run.settings is None:
        return
    from housing.tracking.recorder import finish_pipeline

    try:
        finish_pipeline(run.settings, job.context, "killed")
    except Exception as exc:  # the next run's orphan sweep closes it
        log.warning("could not close the interrupted pipeline run: %s", first_line(exc))


def _reproduce(run: _Run, result: ReproResult) -> None:
    """The scheduling loop: check, dispatch and record each stage in DVC's order."""
    from concurrent.futures import FIRST_COMPLETED, Future, wait

    from dvc.exceptions import DvcException
    from dvc.repo import Repo, lock_repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    quiet_dvc()
    try:
        repo = Repo(str(run.root))
        with lock_repo(repo):
            graph = get_active_graph(repo.index.graph)
            pending = plan_repro(graph, collect_stages(repo, ["dvc.yaml"]))
            running: dict[Future[StageOutcome], Any] = {}
            for stage in pending:
                result.stages[stage.addressing] = "not run"
            while pending or running:
                for stage in list(pending) if result.ok else []:
                    if len(running) >= run.jobs:  # no queued work: an interrupt leaves
                        break  # only running stages, each in its own worker
                    upstream = list(graph.successors(stage))
                    waiting = ("not run", "running")
                    if any(result.stages.get(u.addressing) in waiting for u in upstream):
                        continue
                    pending.remove(stage)
                    if not run.force and not stage.changed(upstream=upstream):
                        result.stages[stage.addressing] = "skipped"
                        run.notify(stage.addressing, "skipped")
                        continue
                    if not stage.cmd or stage.frozen:  # data sources: DVC checks them
                        stage.reproduce(force=run.force, upstream=upstream)
                        stage.dump(update_pipeline=False)
                        result.stages[stage.addressing] = "ran"
                        continue
                    stage.remove_outs(ignore_remove=False, force=False)
                    job = replace(
                        run.template, name=stage.addressing, cmd=stage.cmd, wdir=stage.wdir
                    )
                    run.notify(stage.addressing, "running")
                    running[run.submit(run_job, job)] = stage
                    result.stages[stage.addressing] = "running"
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    stage = running.pop(future)
                    outcome = _outcome(future, stage.addressing)
                    if outcome.ok:
                        _record(stage)
                        result.stages[stage.addressing] = "ran"
                        run.notify(stage.addressing, "done")
                    else:
                        result.stages[stage.addressing] = "failed"
                        if result.error is None:
                            result.error = f"stage {stage.addressing} failed: {outcome.error}"
                            result.exit_code = outcome.exit_code or 1
                        run.notify(stage.addressing, "failed")
    except DvcException as exc:  # whole: a lock message names the blocking process below
        result.error = f"dvc: {first_line(exc, whole=True)}"
        result.exit_code = 1


def quiet_dvc() -> None:
    """DVC sets up its console logging when imported: keep its warnings, once each; its
    record of a full disk (``ERROR: failed to transfer ...``) is dropped (the command's
    one line says it)."""
    import dvc  # noqa: F401 - the import configures the "dvc" logger

    from housing.entry import NoDiskFullTraceback

    dvc_log = logging.getLogger("dvc")
    dvc_log.setLevel(logging.WARNING)
    dvc_log.propagate = False
    for name in ("dvc", "dvc_data", "dvc_objects"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, NoDiskFullTraceback) for f in handler.filters):
                handler.addFilter(NoDiskFullTraceback())


def _outcome(future: Any, name: str) -> StageOutcome:
    from concurrent.futures.process import BrokenProcessPool

    try:
        outcome: StageOutcome = future.result()
    except BrokenProcessPool:
        return StageOutcome(name, False, 0.0, "its worker process died", 1)
    return outcome


def _record(stage: Any) -> None:
    """Record a finished stage as ``dvc repro`` does: save, commit, dump to dvc.lock.

    A full disk raises :class:`~housing.io.DiskFullError` naming the file, else DVC's
    cache (DVC raises the ``OSError`` without its path)."""
    from housing.io import disk_full, is_disk_full, written_path

    no_cache_outs = any(
        not out.use_cache for out in stage.outs if not (out.is_metric or out.is_plot)
    )
    try:
        stage.save(allow_missing=False, run_cache=not no_cache_outs)
        stage.commit(allow_missing=False)
        stage.dump(update_pipeline=False)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full(written_path(exc) or stage.repo.cache.local.path) from None


#: After Ctrl-C / SIGTERM: how long a stage gets to close its runs as killed.
STOP_GRACE_SECONDS: Final = 5.0


def _shutdown(pool: Any, interrupted: bool, idle: bool) -> None:
    """Stop the workers; after an interrupt stop them (SIGTERM, then SIGKILL after
    :data:`STOP_GRACE_SECONDS`), the fork server and everything they started.

    ``idle``: no stage started, so the fork server (maybe still warming up) is killed at once.
    """
    import signal

    import psutil

    if not interrupted and not idle:
        pool.shutdown(wait=True)
        return
    descendants: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):  # whatever the workers started, too
        descendants = psutil.Process().children(recursive=True)
    from housing.quirks.multiprocessing import pool_processes, run_exit_finalizers

    processes = pool_processes(pool)
    pool.stopping = True  # no replacement workers
    for process in processes:  # a SIGTERM to this process only reached no worker
        with contextlib.suppress(OSError, ValueError):
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning(
                "stage worker %s did not stop in %gs: killed", process.pid, STOP_GRACE_SECONDS
            )
            process.kill()
            process.join(timeout=1.0)
    pool.shutdown(wait=False, cancel_futures=True)
    with contextlib.suppress(psutil.Error):  # and a replacement worker started meanwhile
        descendants += psutil.Process().children(recursive=True)
    # release the pool's semaphores now (as at exit), so the resource tracker stops
    # with nothing to clean up and is reaped here rather than after us
    with contextlib.suppress(Exception):
        run_exit_finalizers()
    _stop_helpers()
    descendants = list({p.pid: p for p in descendants}.values())
    _, alive = psutil.wait_procs(descendants, timeout=1.0)
    for leftover in alive:
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    psutil.wait_procs(alive, timeout=1.0)


def _stop_helpers() -> None:
    """Stop multiprocessing's fork server (killed: it may still be warming up) and
    resource tracker, else they outlive us briefly."""
    import signal

    from housing.quirks.multiprocessing import helper_pid, stop_helpers

    pid = helper_pid("forkserver")
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    stop_helpers()


def _summarise(run: _Run, result: ReproResult) -> None:
    """Append the run's summary event (best model and test rmse when it succeeded)."""
    if not any(s in ("ran", "failed", "running") for s in result.stages.values()):
        return

    from housing.monitoring import EventLog, build_notifiers, record_pipeline_summary

    settings = run.settings
    if settings is None:
        return  # the stages already reported the config problem
    try:
        notifier = build_notifiers(settings.notifications)
    except (HousingError, ValueError):
        return
    best = rmse = None
    if result.ok and settings.paths.test_metrics.is_file():
        from housing.stages.evaluate import read_outcome

        with contextlib.suppress(HousingError, KeyError):
            best, scores = read_outcome(settings.paths)
            rmse = scores.get("test/rmse")
    record_pipeline_summary(
        EventLog(settings.paths.metrics_dir / "pipeline_events.jsonl"),
        result.run_id,
        "killed" if result.killed else "succeeded" if result.ok else "failed",
        result.seconds,
        notifier=notifier,
        best_model=best,
        test_rmse=rmse,
        error=result.error,
        extra={
            "stages_run": result.named("ran"),
            "stages_skipped": result.named("skipped"),
            **({"stages_killed": result.named("running")} if result.killed else {}),
        },
    )


__all__: Sequence[str] = (
    "ReproError",
    "ReproResult",
    "StageJob",
    "StageOutcome",
    "fork_server_env",
    "reproduce",
    "run_job",
    "stage_call",
)
