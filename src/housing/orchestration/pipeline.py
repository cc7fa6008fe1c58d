"""The pipeline DAG and its local executor: parallel steps, hand-off by hash, step cache.

One DAG (:func:`build_dag`) serves every execution path::

    prepare -> train_<model> (one per selection.candidates) -> select_best -> evaluate

:func:`run_pipeline` picks the path from the config: ClearML online (a server answers,
``clearml`` among the tracking backends) hands the DAG to a ClearML
``PipelineController`` (:mod:`housing.orchestration.clearml_controller`); otherwise the
local executor below runs it.

Local executor
    Each step runs ``housing.runner.execute_stage`` (events, notifications, trackers) in its
    own worker process, so independent steps (the train steps) run truly in parallel and
    each gets its own ClearML offline session (ClearML keeps one task per process). The
    pool uses the ``forkserver`` start method with ``max_tasks_per_child=1``: every step
    is a fresh process forked from a single-threaded server that has already imported
    scikit-learn, pandas, MLflow and ClearML (no task, no thread: forking it is safe),
    which saves the ~2.5 s of imports a ``spawn`` worker pays per step. Plain ``fork``
    of the coordinator is not used: it has threads (the pool's manager) and could carry
    tracker state into the children. Every worker re-applies the coordinator's
    environment and working directory, so it behaves like a spawned process.

Hand-off by reference
    A step's result lists its output files (relative to the project root) with their
    sha256; the next step receives the hashes of the files it reads and verifies them
    before running (``ArtifactError`` on a mismatch).

Step cache
    A step is skipped when its cache key - sha256 over the step's resolved config
    sections, its input files' hashes and the ``housing`` package's source files (plus
    the versions of the numeric libraries) - equals the key stored with its outputs in
    ``metrics/pipeline_cache.json`` AND those outputs still exist with the recorded
    hashes. A skipped step is logged as ``succeeded`` with ``cached: true``. Disable with
    ``use_cache=False`` (``--no-cache``) or ``clearml.pipeline.cache: false``.

Failure
    A failed step skips every step that depends on it; independent steps still run
    (as ClearML does with ``abort_on_failure=False``), so their results are cached for
    the next run. ``select_best`` runs on the candidates that succeeded only when
    ``selection.allow_missing`` is true. The run's summary line says ``failed`` and
    :class:`PipelineError` names the step and its error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from housing.errors import ArtifactError, ConfigError, HousingError
from housing.io import file_sha256

if TYPE_CHECKING:
    from concurrent.futures import Future

    from housing.config import Settings
    from housing.monitoring import EventLog, Notifier

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FILE",
    "PipelineError",
    "PipelineResult",
    "Step",
    "StepResult",
    "build_dag",
    "run_pipeline",
    "step_inputs",
    "step_outputs",
]

CACHE_FILE: Final = "pipeline_cache.json"
EVENTS_FILE: Final = "pipeline_events.jsonl"
START_METHOD: Final = "forkserver"
#: Imported once by the fork server so each step's process starts warm.
PRELOAD_MODULES: Final = (
    "housing.runner",
    "housing.config",
    "housing.orchestration.pipeline",
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
    "clearml",
)
#: Libraries whose version changes what a step computes (part of every cache key).
_FINGERPRINT_DISTRIBUTIONS: Final = (
    "scikit-learn",
    "numpy",
    "pandas",
    "scipy",
    "joblib",
    "pyarrow",
    "mlxtend",
)
#: Top-level config sections each stage's outputs depend on.
_STAGE_SECTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "prepare": ("data", "prepare", "paths"),
    "train": ("data", "model", "train", "paths"),
    "select_best": ("selection", "paths"),
    "evaluate": ("data", "paths"),
}
_CACHE_VERSION: Final = 1

StepStatus = Literal["succeeded", "failed", "skipped"]


class PipelineError(HousingError):
    """A pipeline step failed; the message names the step and its error.

    ``exit_code`` is the failing step's own (e.g. 2 for a config error), else 1.
    """

    def __init__(self, message: str, *, step: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.step = step
        self.exit_code = exit_code


# --------------------------------------------------------------------------- the DAG


@dataclass(frozen=True)
class Step:
    """One node of the DAG: ``stage`` run with extra Hydra ``overrides`` after ``parents``."""

    name: str
    stage: str
    overrides: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()


def build_dag(settings: Settings) -> list[Step]:
    """prepare -> train_<model> for every candidate -> select_best -> evaluate (topological)."""
    trains = [
        Step(f"train_{name}", "train", (f"model={name}",), ("prepare",))
        for name in settings.selection.candidates
    ]
    return [
        Step("prepare", "prepare"),
        *trains,
        Step("select_best", "select_best", (), tuple(t.name for t in trains)),
        Step("evaluate", "evaluate", (), ("select_best",)),
    ]


def step_outputs(stage: str, settings: Settings) -> list[Path]:
    """The files a stage writes (absolute), as the settings of that step name them."""
    paths = settings.paths
    if stage == "prepare":
        return [paths.raw, paths.train, paths.test, paths.fingerprint]
    if stage == "train":
        name = settings.model.name
        return [paths.model(name), paths.train_metrics(name)]
    if stage == "select_best":
        return [paths.best_model, paths.train_summary]
    if stage == "evaluate":
        return [paths.test_metrics, paths.predictions, paths.importances]
    raise ValueError(f"unknown stage {stage!r}")


def step_inputs(stage: str, settings: Settings) -> list[Path]:
    """The files a stage reads: other steps' outputs, or the raw CSV for ``data=csv``."""
    paths = settings.paths
    if stage == "prepare":
        if settings.data.source == "csv" and settings.data.path is not None:
            return [settings.data.path.resolve()]
        return []
    if stage == "train":
        return [paths.train, paths.fingerprint]
    if stage == "select_best":
        files: list[Path] = []
        for name in settings.selection.candidates:
            files += [paths.model(name), paths.train_metrics(name)]
        return files
    if stage == "evaluate":
        return [paths.best_model, paths.train_summary, paths.test]
    raise ValueError(f"unknown stage {stage!r}")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class StepResult:
    """What one step did in a run; ``outputs`` maps root-relative paths to sha256."""

    name: str
    status: StepStatus
    cached: bool = False
    outputs: Mapping[str, str] = field(default_factory=dict)
    inputs: Mapping[str, str] = field(default_factory=dict)
    cache_key: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    duration_sec: float | None = None
    error: str | None = None
    pid: int | None = None
    exit_code: int = 0


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of one pipeline run."""

    run_id: str
    status: Literal["succeeded", "failed"]
    executor: str  # local | clearml-local | clearml-queue
    steps: Mapping[str, StepResult]
    duration_sec: float
    best_model: str | None = None
    test_rmse: float | None = None
    controller_task_id: str | None = None

    @property
    def cached_steps(self) -> list[str]:
        """Steps skipped because their outputs were up to date."""
        return [n for n, r in self.steps.items() if r.cached]

    @property
    def executed_steps(self) -> list[str]:
        """Steps that ran in this run (succeeded or failed)."""
        return [n for n, r in self.steps.items() if not r.cached and r.status != "skipped"]

    @property
    def failed_steps(self) -> list[str]:
        return [n for n, r in self.steps.items() if r.status == "failed"]

    @property
    def skipped_steps(self) -> list[str]:
        return [n for n, r in self.steps.items() if r.status == "skipped"]

    def summary_line(self) -> str:
        """One human line: status, duration, best model, test rmse, cached steps."""
        rmse = f"{self.test_rmse:.4f}" if self.test_rmse is not None else "-"
        cached = len(self.cached_steps)
        return (
            f"pipeline {self.run_id}: {self.status} in {self.duration_sec:.1f}s "
            f"({self.executor}; {len(self.executed_steps)} run, {cached} cached, "
            f"{len(self.skipped_steps)} skipped) best_model={self.best_model or '-'} "
            f"test_rmse={rmse}"
        )


# --------------------------------------------------------------------------- hashing


def _rel(path: Path, root: Path) -> str:
    """Root-relative POSIX path when inside ``root``, else the absolute path."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _abs(rel: str, root: Path) -> Path:
    path = Path(rel)
    return path if path.is_absolute() else root / path


def hash_files(paths: Sequence[Path], root: Path) -> dict[str, str]:
    """``{relative path: sha256}``; a missing file is an :class:`ArtifactError`."""
    out: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise ArtifactError(f"{path}: expected output is missing")
        out[_rel(path, root)] = file_sha256(path)
    return out


def verify_files(expected: Mapping[str, str], root: Path) -> None:
    """Check every file against its recorded sha256 (the hand-off between steps)."""
    for rel, sha in expected.items():
        path = _abs(rel, root)
        if not path.is_file():
            raise ArtifactError(f"{path}: input missing (its producing step recorded it)")
        actual = file_sha256(path)
        if actual != sha:
            raise ArtifactError(
                f"{path}: sha256 {actual[:12]}... differs from the {sha[:12]}... its producing "
                "step recorded (changed since; re-run the pipeline)"
            )


def code_fingerprint() -> str:
    """sha256 over the ``housing`` package's ``*.py`` files and key library versions."""
    from importlib import metadata

    import housing

    package = Path(housing.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    versions = {"python": platform.python_version()}
    for dist in _FINGERPRINT_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "-"
    digest.update(json.dumps(versions, sort_keys=True).encode())
    return digest.hexdigest()


def cache_key(step: Step, settings: Settings, inputs: Mapping[str, str], code: str) -> str:
    """The step's cache key: its config sections, its inputs' hashes and the code."""
    sections = {k: settings.resolved.get(k) for k in _STAGE_SECTIONS[step.stage]}
    payload = {
        "step": step.name,
        "stage": step.stage,
        "config": sections,
        "inputs": dict(sorted(inputs.items())),
        "code": code,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- cache index


class StepCache:
    """``metrics/pipeline_cache.json``: per step, the key and the outputs it produced.

    Reads and read-modify-writes hold an ``fcntl`` lock on ``<file>.lock``; writes are
    atomic (temp file + rename). A corrupt index is treated as empty (logged).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_name(self.path.name + ".lock").open("a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"version": _CACHE_VERSION, "steps": {}}
        except (OSError, ValueError) as exc:
            log.warning("pipeline cache %s unreadable (%s); starting afresh", self.path, exc)
            return {"version": _CACHE_VERSION, "steps": {}}
        if not isinstance(data, dict) or not isinstance(data.get("steps"), dict):
            return {"version": _CACHE_VERSION, "steps": {}}
        return data

    def entry(self, name: str) -> dict[str, Any] | None:
        """The stored entry of step ``name`` (key, outputs, run id), if any."""
        with self._locked():
            entry = self._read()["steps"].get(name)
        return entry if isinstance(entry, dict) else None

    def store(self, name: str, key: str, outputs: Mapping[str, str], run_id: str) -> None:
        """Record the outputs a step produced under ``key``."""
        from housing.io import write_json

        with self._locked():
            data = self._read()
            data["version"] = _CACHE_VERSION
            data["steps"][name] = {
                "key": key,
                "outputs": dict(outputs),
                "run_id": run_id,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            write_json(self.path, data)

    def lookup(self, name: str, key: str, expected: Sequence[str], root: Path) -> dict[str, str]:
        """The recorded outputs when ``key`` matches and every output is intact, else {}."""
        entry = self.entry(name)
        if entry is None or entry.get("key") != key:
            return {}
        outputs = entry.get("outputs")
        if not isinstance(outputs, dict) or set(outputs) != set(expected):
            return {}
        for rel, sha in outputs.items():
            path = _abs(str(rel), root)
            if not path.is_file() or file_sha256(path) != sha:
                return {}
        return {str(k): str(v) for k, v in outputs.items()}


# --------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class _Job:
    """Everything a worker process needs to run one step (picklable)."""

    step: Step
    settings: Settings
    run_id: str
    inputs: Mapping[str, str]
    outputs: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str
    log_level: int


@dataclass(frozen=True)
class _Outcome:
    """What a worker reports back."""

    name: str
    ok: bool
    outputs: Mapping[str, str]
    error: str | None
    exit_code: int
    recorded: bool  # a failed event was already written by the worker
    pid: int
    started_at: str
    finished_at: str
    duration_sec: float


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error_text(exc: BaseException) -> str:
    from housing.monitoring import one_line_error

    if isinstance(exc, HousingError):
        return " ".join(str(exc).split()) or type(exc).__name__
    return one_line_error(exc)


def _run_job(job: _Job) -> _Outcome:
    """Worker entry: verify inputs, ``execute_stage``, hash outputs (never raises)."""
    os.environ.clear()
    os.environ.update(job.env)
    os.environ["HOUSING_RUN_ID"] = job.run_id
    os.chdir(job.cwd)
    logging.basicConfig(level=job.log_level, format="%(message)s", stream=sys.stderr, force=True)
    started, t0 = _now_iso(), time.monotonic()
    root = job.settings.root
    recorded = False

    def outcome(ok: bool, outputs: Mapping[str, str], exc: BaseException | None) -> _Outcome:
        code = exc.exit_code if isinstance(exc, HousingError) else (0 if ok else 1)
        return _Outcome(
            name=job.step.name,
            ok=ok,
            outputs=dict(outputs),
            error=None if exc is None else _error_text(exc),
            exit_code=code,
            recorded=recorded,
            pid=os.getpid(),
            started_at=started,
            finished_at=_now_iso(),
            duration_sec=time.monotonic() - t0,
        )

    try:
        from housing.runner import execute_stage

        try:
            verify_files(job.inputs, root)
        except ArtifactError as exc:
            recorded = _record_failure(job.settings, job.run_id, job.step.name, exc)
            raise
        recorded = True  # from here on, execute_stage's track_stage records failures
        execute_stage(job.step.stage, job.settings, job.run_id)
        recorded = False
        outputs = hash_files([_abs(r, root) for r in job.outputs], root)
        return outcome(True, outputs, None)
    except BaseException as exc:  # reported to the coordinator, never raised across processes
        return outcome(False, {}, exc)


def _notifier(settings: Settings) -> Notifier:
    from housing.monitoring import build_notifiers

    try:
        return build_notifiers(settings.section("notifications"), base_dir=settings.root)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _events(settings: Settings) -> EventLog:
    from housing.monitoring import EventLog

    return EventLog(settings.paths.metrics_dir / EVENTS_FILE)


def _record_failure(settings: Settings, run_id: str, name: str, exc: BaseException) -> bool:
    """Write ``started`` + ``failed`` events for a step that failed outside its stage."""
    from housing.monitoring import track_stage

    try:
        with track_stage(_events(settings), run_id, name, _notifier(settings)):
            raise exc
    except BaseException as raised:
        if raised is not exc:
            log.warning("could not record the failure of %s: %s", name, raised)
            return False
    return True


# --------------------------------------------------------------------------- coordinator


@dataclass
class _Plan:
    """The coordinator's view of one run."""

    base: Settings
    steps: list[Step]
    settings: dict[str, Settings]
    overrides: tuple[str, ...]
    config_dir: Path
    run_id: str
    use_cache: bool
    cache: StepCache
    code: str
    events: EventLog
    notifier: Notifier
    producers: dict[str, str] = field(default_factory=dict)  # output rel path -> step


def _pipeline_section(settings: Settings) -> Mapping[str, Any]:
    pipeline = settings.section("clearml").get("pipeline") or {}
    return pipeline if isinstance(pipeline, Mapping) else {}


def cache_enabled(settings: Settings) -> bool:
    """``clearml.pipeline.cache`` (default true); a non-boolean is a ConfigError."""
    value = _pipeline_section(settings).get("cache", True)
    if not isinstance(value, bool):
        raise ConfigError(f"clearml.pipeline.cache: expected true or false, got {value!r}")
    return value


def _step_settings(
    step: Step, overrides: Sequence[str], config_dir: Path, root: Path, base: Settings
) -> Settings:
    from housing.config import load_settings

    if not step.overrides:
        return base
    return load_settings([*overrides, *step.overrides], config_dir=config_dir, root=root)


def _ready(step: Step, plan: _Plan, results: Mapping[str, StepResult]) -> str:
    """``wait`` | ``run`` | ``skip`` (a parent failed or was skipped)."""
    if any(p not in results for p in step.parents):
        return "wait"
    bad = [p for p in step.parents if results[p].status != "succeeded"]
    if not bad:
        return "run"
    tolerant = step.stage == "select_best" and plan.base.selection.allow_missing
    if tolerant and len(bad) < len(step.parents):
        return "run"
    return "skip"


def _effective_settings(step: Step, plan: _Plan, results: Mapping[str, StepResult]) -> Settings:
    """``select_best`` with failed candidates (allow_missing): only the ones that succeeded."""
    settings = plan.settings[step.name]
    if step.stage != "select_best":
        return settings
    ok = [p.removeprefix("train_") for p in step.parents if results[p].status == "succeeded"]
    if tuple(ok) == settings.selection.candidates:
        return settings
    from housing.config import load_settings

    log.warning(
        "pipeline: select_best runs on %s only (selection.allow_missing=true)", ", ".join(ok)
    )
    return load_settings(
        [*plan.overrides, f"selection.candidates=[{','.join(ok)}]"],
        config_dir=plan.config_dir,
        root=plan.base.root,
    )


def _resolve_inputs(
    step: Step, settings: Settings, plan: _Plan, known: Mapping[str, str]
) -> dict[str, str]:
    root = settings.root
    inputs: dict[str, str] = {}
    for path in step_inputs(step.stage, settings):
        rel = _rel(path, root)
        if rel in known:
            inputs[rel] = known[rel]
        elif rel in plan.producers:  # produced by a step of this DAG that did not run
            raise ArtifactError(f"{path}: not produced in this run (step {plan.producers[rel]})")
        elif path.is_file():  # an external input (the raw CSV)
            inputs[rel] = file_sha256(path)
        else:
            raise ArtifactError(f"{path}: input not found")
    return inputs


def _cached_metrics(step: Step, settings: Settings) -> dict[str, Any]:
    """Metrics a cached step reports in its event (read from its outputs)."""
    from housing.io import read_json

    paths = settings.paths
    with contextlib.suppress(HousingError, KeyError, TypeError):
        if step.stage == "train":
            return dict(read_json(paths.train_metrics(settings.model.name))["metrics"])
        if step.stage == "select_best":
            summary = read_json(paths.train_summary)
            return dict(summary["candidates"][summary["best_model"]]["metrics"])
        if step.stage == "evaluate":
            return dict(read_json(paths.test_metrics)["metrics"])
    return {}


def _cached_result(
    step: Step, settings: Settings, plan: _Plan, inputs: Mapping[str, str], key: str
) -> StepResult | None:
    from housing.monitoring import track_stage

    expected = [_rel(p, settings.root) for p in step_outputs(step.stage, settings)]
    outputs = plan.cache.lookup(step.name, key, expected, settings.root)
    if not outputs:
        return None
    started, t0 = _now_iso(), time.monotonic()
    with track_stage(plan.events, plan.run_id, step.name, plan.notifier) as handle:
        handle.set(cached=True, cache_key=key[:16])
        metrics = _cached_metrics(step, settings)
        if metrics:
            handle.set(metrics=metrics)
    log.info("pipeline: %s cached (outputs unchanged)", step.name)
    return StepResult(
        name=step.name,
        status="succeeded",
        cached=True,
        outputs=outputs,
        inputs=dict(inputs),
        cache_key=key,
        started_at=started,
        finished_at=_now_iso(),
        duration_sec=time.monotonic() - t0,
        pid=os.getpid(),
    )


def _worker_count(max_workers: int | None, steps: Sequence[Step]) -> int:
    if max_workers is not None:
        if max_workers < 1:
            raise ConfigError(f"max_workers: must be >= 1, got {max_workers}")
        return max_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    width = sum(1 for s in steps if s.stage == "train")
    return max(1, min(cores, width))


def _make_pool(workers: int) -> Any:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context(START_METHOD)
    ctx.set_forkserver_preload(list(PRELOAD_MODULES))
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1)


def _execute(plan: _Plan, workers: int) -> dict[str, StepResult]:
    """Run the DAG: cached steps in place, the others in worker processes.

    With MLflow on, the first step that runs in this run runs alone: it creates the
    run's MLflow parent, which concurrent first steps could otherwise both create.
    """
    from concurrent.futures import FIRST_COMPLETED, wait

    results: dict[str, StepResult] = {}
    known: dict[str, str] = {}
    pending = list(plan.steps)
    waiting: list[_Job] = []
    running: dict[Future[_Outcome], _Job] = {}
    gate = "mlflow" in plan.base.tracking
    pool: Any = None
    try:
        while True:
            progressed = True
            while progressed:
                progressed = False
                for step in list(pending):
                    state = _ready(step, plan, results)
                    if state == "wait":
                        continue
                    pending.remove(step)
                    progressed = True
                    if state == "skip":
                        failed = [p for p in step.parents if results[p].status != "succeeded"]
                        log.warning(
                            "pipeline: %s skipped (%s did not succeed)",
                            step.name,
                            ", ".join(failed),
                        )
                        results[step.name] = StepResult(
                            step.name, "skipped", error=f"upstream {failed[0]} did not succeed"
                        )
                        continue
                    job = _prepare_job(step, plan, results, known)
                    if isinstance(job, StepResult):  # cached, or failed while preparing
                        results[step.name] = job
                        known.update(job.outputs)
                        continue
                    waiting.append(job)
            while waiting and not (gate and running):
                job = waiting.pop(0)
                if pool is None:
                    pool = _make_pool(workers)
                log.info("pipeline: %s started", job.step.name)
                running[pool.submit(_run_job, job)] = job
            if not running:
                return results
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            gate = False
            for future in done:
                job = running.pop(future)
                result = _collect(future, job, plan)
                results[job.step.name] = result
                known.update(result.outputs)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _prepare_job(
    step: Step, plan: _Plan, results: Mapping[str, StepResult], known: Mapping[str, str]
) -> _Job | StepResult:
    try:
        settings = _effective_settings(step, plan, results)
        inputs = _resolve_inputs(step, settings, plan, known)
    except HousingError as exc:
        _record_failure(plan.base, plan.run_id, step.name, exc)
        return StepResult(step.name, "failed", error=_error_text(exc), exit_code=exc.exit_code)
    key = cache_key(step, settings, inputs, plan.code)
    if plan.use_cache:
        cached = _cached_result(step, settings, plan, inputs, key)
        if cached is not None:
            return cached
    outputs = tuple(_rel(p, settings.root) for p in step_outputs(step.stage, settings))
    return _Job(
        step=step,
        settings=settings,
        run_id=plan.run_id,
        inputs=inputs,
        outputs=outputs,
        env=dict(os.environ),
        cwd=str(Path.cwd()),
        log_level=logging.getLogger().getEffectiveLevel(),
    )


def _collect(future: Future[_Outcome], job: _Job, plan: _Plan) -> StepResult:
    """Turn a worker's outcome (or its crash) into a StepResult; update the cache."""
    key = cache_key(job.step, job.settings, job.inputs, plan.code)
    try:
        outcome = future.result()
    except BaseException as exc:  # the worker process died (killed, out of memory)
        error = f"worker process failed: {_error_text(exc)}"
        _record_failure(job.settings, plan.run_id, job.step.name, RuntimeError(error))
        log.error("pipeline: %s failed: %s", job.step.name, error)
        return StepResult(
            job.step.name, "failed", inputs=job.inputs, cache_key=key, error=error, exit_code=1
        )
    if not outcome.ok:
        if not outcome.recorded:
            _record_failure(
                job.settings, plan.run_id, job.step.name, RuntimeError(outcome.error or "failed")
            )
        log.error("pipeline: %s failed: %s", job.step.name, outcome.error)
    else:
        plan.cache.store(job.step.name, key, outcome.outputs, plan.run_id)
        log.info("pipeline: %s succeeded in %.1fs", job.step.name, outcome.duration_sec)
    return StepResult(
        name=job.step.name,
        status="succeeded" if outcome.ok else "failed",
        outputs=outcome.outputs,
        inputs=job.inputs,
        cache_key=key,
        started_at=outcome.started_at,
        finished_at=outcome.finished_at,
        duration_sec=outcome.duration_sec,
        error=outcome.error,
        pid=outcome.pid,
        exit_code=outcome.exit_code,
    )


def _final_metrics(
    plan: _Plan, results: Mapping[str, StepResult]
) -> tuple[str | None, float | None]:
    """Best model and test rmse when evaluate succeeded (ran or cached) in this run."""
    from housing.io import read_json

    evaluate = next((s for s in plan.steps if s.stage == "evaluate"), None)
    if (
        evaluate is None
        or results.get(evaluate.name, StepResult("", "skipped")).status != "succeeded"
    ):
        return None, None
    try:
        record = read_json(plan.base.paths.test_metrics)
        return str(record["model"]), float(record["metrics"]["test/rmse"])
    except (HousingError, KeyError, TypeError, ValueError):
        return None, None


# --------------------------------------------------------------------------- entry points


def run_pipeline(
    overrides: Sequence[str] = (),
    config_dir: Path | None = None,
    *,
    root: Path | None = None,
    max_workers: int | None = None,
    use_cache: bool | None = None,
) -> PipelineResult:
    """Run the whole DAG on the path the config selects (see the module docstring).

    ``use_cache`` None follows ``clearml.pipeline.cache`` (default true). Raises
    :class:`PipelineError` when a step fails (after the summary line is written).
    """
    from housing.config import default_config_dir, load_settings

    cdir = (config_dir or default_config_dir()).resolve()
    root = (root or Path.cwd()).resolve()
    settings = load_settings(overrides, config_dir=cdir, root=root)
    enabled = cache_enabled(settings) if use_cache is None else use_cache
    mode = clearml_mode(settings)
    if mode == "online":
        from housing.orchestration.clearml_controller import run_controller

        return run_controller(settings, overrides, cdir)
    return run_local(settings, overrides, cdir, max_workers=max_workers, use_cache=enabled)


def clearml_mode(settings: Settings) -> str:
    """``online`` when ClearML is a tracking backend and a server answers (or this runs as
    a ClearML task on an agent), else ``offline``."""
    if "clearml" not in settings.tracking:
        return "offline"
    if os.environ.get("CLEARML_TASK_ID"):  # executed as a ClearML task (agent): online
        return "online"
    from housing.tracking.clearml import clearml_settings, resolve_mode

    mode, reason = resolve_mode(clearml_settings(settings.section("clearml"), settings.root))
    log.debug("pipeline: ClearML %s (%s)", mode, reason)
    return mode


def run_local(
    settings: Settings,
    overrides: Sequence[str],
    config_dir: Path,
    *,
    max_workers: int | None = None,
    use_cache: bool = True,
) -> PipelineResult:
    """The local executor: parallel worker processes, hash hand-off, step cache."""
    from housing.monitoring import current_run_id, record_pipeline_summary

    t0, started_at = time.monotonic(), _now_iso()
    run_id = current_run_id()
    steps = build_dag(settings)
    plan = _Plan(
        base=settings,
        steps=steps,
        settings={
            s.name: _step_settings(s, overrides, config_dir, settings.root, settings) for s in steps
        },
        overrides=tuple(overrides),
        config_dir=config_dir,
        run_id=run_id,
        use_cache=use_cache,
        cache=StepCache(settings.paths.metrics_dir / CACHE_FILE),
        code=code_fingerprint(),
        events=_events(settings),
        notifier=_notifier(settings),
    )
    for step in steps:
        for path in step_outputs(step.stage, plan.settings[step.name]):
            plan.producers[_rel(path, settings.root)] = step.name
    workers = _worker_count(max_workers, steps)
    log.info(
        "pipeline %s: %d steps, %d worker(s), cache %s",
        run_id,
        len(steps),
        workers,
        "on" if use_cache else "off",
    )
    try:
        results = _execute(plan, workers)
    except BaseException as exc:
        record_pipeline_summary(
            plan.events,
            run_id,
            "failed",
            time.monotonic() - t0,
            notifier=plan.notifier,
            started_at=started_at,
            error=_error_text(exc),
            extra={"executor": "local"},
        )
        raise
    ordered = {s.name: results[s.name] for s in steps if s.name in results}
    failed = [r for r in ordered.values() if r.status == "failed"]
    skipped = [r for r in ordered.values() if r.status == "skipped"]
    best, rmse = _final_metrics(plan, ordered)
    status: Literal["succeeded", "failed"] = "failed" if skipped or best is None else "succeeded"
    first = min(failed, key=lambda r: r.finished_at or "") if failed else None
    error = f"step {first.name} failed: {first.error}" if first else None
    if status == "failed" and error is None:
        error = "pipeline produced no evaluated model"
    duration = time.monotonic() - t0
    record_pipeline_summary(
        plan.events,
        run_id,
        status,
        duration,
        notifier=plan.notifier,
        best_model=best,
        test_rmse=rmse,
        started_at=started_at,
        error=error,
        extra={
            "executor": "local",
            "cached_steps": [r.name for r in ordered.values() if r.cached],
            "failed_steps": [r.name for r in failed],
            "skipped_steps": [r.name for r in skipped],
        },
    )
    result = PipelineResult(
        run_id=run_id,
        status=status,
        executor="local",
        steps=ordered,
        duration_sec=duration,
        best_model=best,
        test_rmse=rmse,
    )
    if status == "failed":
        culprit = first or next(iter(ordered.values()))
        more = f" (+{len(failed) - 1} more failed)" if len(failed) > 1 else ""
        raise PipelineError(
            f"pipeline step {culprit.name} failed: {culprit.error}{more}",
            step=culprit.name,
            exit_code=first.exit_code if first and first.exit_code else 1,
        )
    if failed:
        log.warning(
            "pipeline: completed without %s (selection.allow_missing=true)",
            ", ".join(r.name for r in failed),
        )
    return result
