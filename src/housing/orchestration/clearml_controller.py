"""The DAG on a ClearML server: a ``PipelineController`` with one function step per node.

Used by :func:`housing.orchestration.pipeline.run_pipeline` when ClearML is online.

- ``clearml.pipeline.run_locally: true``: the controller runs here and
  ``start_locally(run_pipeline_steps_locally=True)`` runs each step as a local
  subprocess (each its own ClearML task on the server).
- ``run_locally: false``: every step is enqueued on ``clearml.pipeline.execution_queue``
  for agents. The controller itself goes to ``clearml.pipeline.controller_queue``
  (default ``services``) with ``start(queue=...)``; the SDK then ENDS THIS PROCESS
  (exit 0) and the controller continues on the services agent. With
  ``controller_queue: null`` the controller runs here and waits for the agents.

Every step is :func:`run_step`, a self-contained function (ClearML ships its source to
the step's task) that calls :func:`execute_step`: it fetches the files its ancestors
produced (artifacts, sha256-checked) when they are not already on disk, runs
``housing.runner.execute_stage`` with the ClearML tracker off (the step's own task is the
ClearML record; MLflow still runs), reports the stage's metrics, and uploads its outputs
as artifacts with their sha256. Steps cache with ``cache_executed_step=True``: their
parameters include the ids of their ancestors' tasks, so a step reruns exactly when an
ancestor reran, the code (commit) or its config changed.

For agents to rebuild the environment, each step carries the repository, commit and
entry point (the SDK records them from this git checkout) and ``packages=`` the locked
requirements: ``uv export --frozen --no-hashes --no-dev --no-emit-project`` when uv is
available, else the installed versions of the project's dependency closure (this venv
is synced from ``uv.lock``). The step puts ``<checkout>/src`` on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from housing.errors import ArtifactError
from housing.tracking.offline import ClearMLError

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.orchestration.dag import PipelineResult, Step
    from housing.tracking.clearml import ClearMLSettings

log = logging.getLogger(__name__)

__all__ = [
    "build_controller",
    "execute_step",
    "locked_requirements",
    "run_controller",
    "run_step",
]

DEFAULT_POLL_SEC: Final = 5.0  # how often the controller checks its steps (SDK default 12 s)
SHA_METADATA: Final = "housing_sha256"  # artifact metadata key of an output's sha256
CONFIG_FILE: Final = "clearml-pipeline.conf"
_TASK_TYPES: Final = {
    "prepare": "data_processing",
    "train": "training",
    "select_best": "qc",
    "evaluate": "testing",
}


def locked_requirements(root: Path) -> list[str]:
    """Pinned requirements for agents (see the module docstring); [] if none can be found."""
    uv = shutil.which("uv") or str(root / ".tools" / "bin" / "uv")
    if Path(uv).is_file() and (root / "uv.lock").is_file():
        cmd = [uv, "export", "--frozen", "--no-hashes", "--no-dev", "--no-emit-project", "-q"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(
                cmd, cwd=root, capture_output=True, text=True, timeout=60, check=False
            )
            if proc.returncode == 0:
                lines = [ln.strip() for ln in proc.stdout.splitlines()]
                return [ln for ln in lines if ln and not ln.startswith(("#", "-e", "."))]
    return _installed_closure("housing")


def _installed_closure(distribution: str) -> list[str]:
    """``name==version`` for the installed dependency closure of ``distribution``."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    todo = [distribution]
    while todo:
        name = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = canonicalize_name(req.name)
            if key in pins:
                continue
            try:
                pins[key] = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue
            todo.append(req.name)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


# --------------------------------------------------------------------------- environment


@contextlib.contextmanager
def clearml_environment(cml: ClearMLSettings) -> Iterator[None]:
    """SDK environment for the controller: hosts, credentials, a fast client config.

    The generated config (no credentials) turns off the report subprocess and the
    async repository detection that can stall for minutes; restored on exit.
    """
    from housing.tracking.clearml import set_server_env
    from housing.tracking.offline import write_client_config
    from housing.tracking.warmup import scoped_env

    keys = (
        "CLEARML_CONFIG_FILE",
        "CLEARML_API_HOST",
        "CLEARML_WEB_HOST",
        "CLEARML_FILES_HOST",
        "CLEARML_API_ACCESS_KEY",
        "CLEARML_API_SECRET_KEY",
        "CLEARML_OFFLINE_MODE",
    )
    if os.environ.get("CLEARML_TASK_ID"):  # run by an agent: it configured the SDK
        yield
        return
    with scoped_env({}, restore=keys):
        if not os.environ.get("CLEARML_CONFIG_FILE"):
            os.environ["CLEARML_CONFIG_FILE"] = str(
                write_client_config(
                    cml.offline_dir / CONFIG_FILE,
                    retries=2,
                    api_host=cml.api_host,
                    web_host=cml.web_host,
                    files_host=cml.files_host,
                )
            )
        set_server_env(cml)
        os.environ.pop("CLEARML_OFFLINE_MODE", None)
        yield


# --------------------------------------------------------------------------- the steps


def run_step(  # noqa: PLR0917 - ClearML passes the step's kwargs by name
    step_name: str,
    stage: str,
    overrides_json: str,
    config_dir: str,
    root: str,
    upstream_json: str,
) -> str:
    """A pipeline step (self-contained: ClearML runs this function's source as a script)."""
    import sys
    from pathlib import Path

    base = Path(root) if root else Path.cwd()
    src = base / "src"
    if src.is_dir() and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from housing.orchestration.clearml_controller import execute_step

    return execute_step(
        step_name=step_name,
        stage=stage,
        overrides_json=overrides_json,
        config_dir=config_dir,
        root=str(base),
        upstream_json=upstream_json,
    )


def execute_step(
    *,
    step_name: str,
    stage: str,
    overrides_json: str,
    config_dir: str,
    root: str,
    upstream_json: str,
) -> str:
    """Fetch and verify inputs, run the stage, report metrics, upload outputs (JSON of them)."""
    from clearml import Task

    from housing.config import load_settings
    from housing.orchestration.dag import hash_files, step_inputs, step_outputs
    from housing.runner import execute_stage

    base = Path(root)
    task: Any = Task.current_task()
    upstream: dict[str, str] = json.loads(upstream_json or "{}")
    overrides = list(json.loads(overrides_json))
    known, failed = _fetch_upstream(upstream)
    if stage == "select_best" and failed:
        ok = [
            n.removeprefix("train_") for n in upstream if n.startswith("train_") and n not in failed
        ]
        overrides.append(f"selection.candidates=[{','.join(ok)}]")
    cdir = Path(config_dir) if Path(config_dir).is_absolute() else base / config_dir
    settings = load_settings([*overrides, "clearml.enabled=false"], config_dir=cdir, root=base)
    for path in step_inputs(stage, settings):
        rel = _rel(path, base)
        if rel in known:
            _materialize(rel, *known[rel], base)
        elif stage != "prepare":  # every other stage reads only what its ancestors wrote
            raise ArtifactError(f"{path}: no upstream step of {step_name} recorded it")
    run_id = os.environ.get("HOUSING_RUN_ID") or f"clearml-{_parent_id(task)}"
    result = execute_stage(stage, settings, run_id)
    outputs = hash_files(step_outputs(stage, settings), base)
    if task is not None:
        metrics = getattr(result, "metrics", None)
        if isinstance(metrics, Mapping):
            reporter = task.get_logger()
            for key, value in metrics.items():
                with contextlib.suppress(TypeError, ValueError):
                    reporter.report_single_value(name=str(key), value=float(value))
        for rel, sha in outputs.items():
            task.upload_artifact(
                name=rel,
                artifact_object=base / rel,
                metadata={SHA_METADATA: sha},
                wait_on_upload=True,
            )
    log.info("step %s: %d output(s) recorded", step_name, len(outputs))
    return json.dumps(outputs, sort_keys=True)


def _parent_id(task: Any) -> str:
    if task is None:
        return "local"
    return str(getattr(task, "parent", None) or task.id)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _fetch_upstream(upstream: Mapping[str, str]) -> tuple[dict[str, tuple[str, Any]], set[str]]:
    """``{rel: (sha256, artifact)}`` from the ancestors' tasks, and the ancestors that failed.

    Each output artifact carries its sha256 in its metadata (read from the API, nothing
    is downloaded here).
    """
    from clearml import Task

    known: dict[str, tuple[str, Any]] = {}
    failed: set[str] = set()
    for name, task_id in upstream.items():
        if not task_id or task_id.startswith("${"):
            continue
        other: Any = Task.get_task(task_id=task_id)
        if str(other.get_status()) not in ("completed", "published"):
            failed.add(name)
            continue
        for rel, artifact in other.artifacts.items():
            sha = (getattr(artifact, "metadata", None) or {}).get(SHA_METADATA)
            if sha:
                known[str(rel)] = (str(sha), artifact)
    return known, failed


def _materialize(rel: str, sha: str, artifact: Any, root: Path) -> None:
    """Make ``root/rel`` the file with ``sha`` (downloading the artifact if needed)."""
    from housing.io import atomic_path, file_sha256

    path = root / rel
    if path.is_file() and file_sha256(path) == sha:
        return
    if artifact is None:
        raise ArtifactError(f"{path}: not on this machine and no artifact to fetch it from")
    local = Path(str(artifact.get_local_copy()))
    with atomic_path(path) as tmp:
        shutil.copyfile(local, tmp)
    actual = file_sha256(path)
    if actual != sha:
        raise ArtifactError(f"{path}: fetched artifact sha256 {actual[:12]}... != {sha[:12]}...")


# --------------------------------------------------------------------------- controller


def _ancestors(step: Step, by_name: Mapping[str, Step]) -> list[str]:
    seen: list[str] = []
    todo = list(step.parents)
    while todo:
        name = todo.pop(0)
        if name not in seen:
            seen.append(name)
            todo.extend(by_name[name].parents)
    return [n for n in by_name if n in seen]  # DAG order


def build_controller(
    settings: Settings,
    overrides: Sequence[str],
    config_dir: Path,
    *,
    run_locally: bool,
    execution_queue: str,
    packages: Sequence[str] | None = None,
    poll_sec: float = DEFAULT_POLL_SEC,
) -> Any:
    """A ``PipelineController`` with one function step per DAG node (needs a server)."""
    from clearml.automation import PipelineController

    from housing.orchestration.dag import build_dag

    cml = settings.clearml
    reqs = list(packages) if packages is not None else locked_requirements(settings.root)
    controller: Any = PipelineController(
        name=f"{cml.task_prefix}:pipeline",
        project=cml.project_name,
        version=_package_version(),
        pool_frequency=poll_sec / 60.0,
        skip_global_imports=True,  # run_step imports what it needs itself
        add_pipeline_tags=True,
        abort_on_failure=False,
        packages=reqs or None,
    )
    if not run_locally:
        controller.set_default_execution_queue(execution_queue)
    dag = build_dag(settings)
    by_name = {s.name: s for s in dag}
    root_arg = str(settings.root) if run_locally else ""
    cdir = _rel(config_dir, settings.root)
    allow_missing = settings.selection.allow_missing
    repo, branch, commit = git_origin(settings.root)
    for step in dag:
        upstream = {a: f"${{{a}.id}}" for a in _ancestors(step, by_name)}
        tolerant = allow_missing and step.stage == "train"
        controller.add_function_step(
            name=step.name,
            function=run_step,
            function_kwargs={
                "step_name": step.name,
                "stage": step.stage,
                "overrides_json": json.dumps([*overrides, *step.overrides]),
                "config_dir": cdir,
                "root": root_arg,
                "upstream_json": json.dumps(upstream),
            },
            project_name=cml.project_name,
            task_name=f"{cml.task_prefix}:{step.name}",
            task_type=_TASK_TYPES.get(step.stage, "training"),
            packages=reqs or None,
            repo=repo,
            repo_branch=branch,
            repo_commit=commit,
            working_dir="." if repo else None,
            parents=list(step.parents) or None,
            execution_queue=None if run_locally else execution_queue,
            cache_executed_step=True,
            tags=[*cml.tags, step.stage],
            continue_behaviour=(
                {"continue_on_fail": True, "skip_children_on_fail": False} if tolerant else None
            ),
        )
    return controller


def git_origin(root: Path) -> tuple[str | None, str | None, str | None]:
    """(remote URL, branch, commit) of the checkout at ``root``; Nones when not a clone.

    Agents clone this URL at this commit, so steps run the code of this run.
    """

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() or None if proc.returncode == 0 else None

    url = git("remote", "get-url", "origin")
    if url is None:
        log.warning("ClearML: %s has no git remote 'origin'; steps carry their code only", root)
        return None, None, None
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    return url, None if branch == "HEAD" else branch, git("rev-parse", "HEAD")


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("housing")
    except metadata.PackageNotFoundError:  # pragma: no cover - always installed
        return "0.0.0"


def run_controller(
    settings: Settings, overrides: Sequence[str], config_dir: Path
) -> PipelineResult:
    """Build and start the controller as ``clearml.pipeline`` says (module docstring).

    With ``run_locally: false`` and a ``controller_queue`` the SDK ends the process after
    enqueuing the controller (exit 0): this function does not return then.
    """
    from housing import runs
    from housing.monitoring import EventLog
    from housing.orchestration.dag import notifier_for

    cml = settings.clearml
    options = cml.pipeline
    run_id = runs.current().run_id
    os.environ["HOUSING_RUN_ID"] = run_id  # inherited by locally run steps
    events = EventLog(settings.paths.metrics_dir / "pipeline_events.jsonl")
    notifier = notifier_for(settings)
    run_locally = options.run_locally
    controller_queue = options.controller_queue
    executor = "clearml-local" if run_locally else "clearml-queue"
    t0 = time.monotonic()
    with clearml_environment(cml):
        try:
            controller = build_controller(
                settings,
                overrides,
                config_dir,
                run_locally=run_locally,
                execution_queue=options.execution_queue,
                poll_sec=options.poll_sec,
            )
        except Exception as exc:
            raise ClearMLError(f"ClearML pipeline controller could not start: {exc}") from exc
        if run_locally:
            controller.start_locally(run_pipeline_steps_locally=True)
        elif controller_queue:
            log.warning(
                "ClearML: controller %s goes to queue %r, steps to %r; this process ends now",
                controller.id,
                controller_queue,
                options.execution_queue,
            )
            sys.stdout.flush()
            sys.stderr.flush()
            controller.start(queue=controller_queue)
        else:
            controller.start_locally(run_pipeline_steps_locally=False)
        return _result(
            controller,
            settings=settings,
            run_id=run_id,
            executor=executor,
            events=events,
            notifier=notifier,
            t0=t0,
        )


def _result(
    controller: Any,
    *,
    settings: Settings,
    run_id: str,
    executor: str,
    events: Any,
    notifier: Any,
    t0: float,
) -> PipelineResult:
    """Summarize the controller's nodes; write the summary line; raise on failure."""
    from housing.monitoring import record_pipeline_summary
    from housing.orchestration.dag import PipelineError, PipelineResult, StepResult
    from housing.stages.evaluate import read_outcome

    steps: dict[str, StepResult] = {}
    for name, node in controller.get_pipeline_dag().items():
        status = str(getattr(node, "status", "pending"))
        mapped: Literal["succeeded", "failed", "skipped"] = (
            "succeeded"
            if status in ("completed", "cached")
            else "failed"
            if status in ("failed", "aborted")
            else "skipped"
        )
        steps[name] = StepResult(name, mapped, cached=status == "cached", error=None)
    best: str | None = None
    rmse: float | None = None
    if steps.get("evaluate") is not None and steps["evaluate"].status == "succeeded":
        with contextlib.suppress(Exception):
            best, scores = read_outcome(settings.paths)
            rmse = float(scores["test/rmse"])
    failed = [s.name for s in steps.values() if s.status == "failed"]
    ok = (
        bool(controller.is_successful(fail_on_step_fail=False))
        and steps.get("evaluate", StepResult("evaluate", "skipped")).status == "succeeded"
    )
    outcome: Literal["succeeded", "failed"] = "succeeded" if ok else "failed"
    error = None if ok else f"step {failed[0] if failed else '?'} failed (see ClearML task logs)"
    duration = time.monotonic() - t0
    record_pipeline_summary(
        events,
        run_id,
        outcome,
        duration,
        notifier=notifier,
        best_model=best,
        test_rmse=rmse,
        error=error,
        extra={"executor": executor, "controller_task_id": str(controller.id)},
    )
    result = PipelineResult(
        run_id=run_id,
        status=outcome,
        executor=executor,
        steps=steps,
        duration_sec=duration,
        best_model=best,
        test_rmse=rmse,
        controller_task_id=str(controller.id),
    )
    if not ok:
        step = failed[0] if failed else "pipeline"
        raise PipelineError(f"pipeline step {step} failed on ClearML: {error}", step=step)
    return result
