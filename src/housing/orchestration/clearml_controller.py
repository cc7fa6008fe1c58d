"""The DAG on a ClearML server: a ``PipelineController`` with one function step per node.

- ``clearml.pipeline.run_locally: true``: the controller runs here and runs each step as a
  local subprocess (each its own ClearML task on the server).
- ``run_locally: false``: every step is enqueued on ``clearml.pipeline.execution_queue``
  for agents; the controller goes to ``clearml.pipeline.controller_queue`` (default
  ``services``) and the SDK then ENDS THIS PROCESS (exit 0). With ``controller_queue: null``
  the controller runs here and waits for the agents.

Each step (:func:`run_step`) fetches the files its ancestors produced (sha256-checked
artifacts) unless already on disk, runs the stage with the ClearML tracker off (the step's
task is the record; MLflow still runs), reports its metrics and uploads its outputs with
their sha256. Steps are cached: their parameters hold their ancestors' task ids, so a step
reruns exactly when an ancestor reran or its code (commit) or config changed. Agents
rebuild the environment from the repository, the commit and :func:`locked_requirements`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from housing.errors import ArtifactError
from housing.io import atomic_path, command_output, file_sha256, relpath
from housing.tracking.offline import ClearMLError

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.orchestration.dag import PipelineResult, StepStatus
    from housing.tracking.clearml import ClearMLSettings

log = logging.getLogger(__name__)

SHA_METADATA: Final = "housing_sha256"  # artifact metadata key of an output's sha256
CONFIG_FILE: Final = "clearml-pipeline.conf"
#: A train step task's hyperparameter section with a tuning trial's values (clearml_tune).
TRIAL_SECTION: Final = "model_params"
_TASK_TYPES: Final = {
    "prepare": "data_processing",
    "train": "training",
    "select_best": "qc",
    "evaluate": "testing",
}
#: A controller node's status as a step status (any other: skipped).
_STATUS: Final[dict[str, StepStatus]] = {
    "completed": "succeeded",
    "cached": "succeeded",
    "failed": "failed",
    "aborted": "failed",
}


def locked_requirements(root: Path) -> list[str]:
    """Pinned requirements for agents: ``uv export`` of ``uv.lock`` when uv is available,
    else the installed dependency closure of ``housing`` (this venv is synced from
    ``uv.lock``); [] if neither can be found."""
    uv = shutil.which("uv") or str(root / ".tools" / "bin" / "uv")
    cmd = [uv, "export", "--frozen", "--no-hashes", "--no-dev", "--no-emit-project", "-q"]
    if Path(uv).is_file() and (root / "uv.lock").is_file():
        exported = command_output(cmd, root, timeout=60)
        if exported is not None:
            lines = [ln.strip() for ln in exported.splitlines()]
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
        try:
            requires = metadata.distribution(todo.pop()).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            key = canonicalize_name(req.name)
            if key in pins or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
                continue
            with contextlib.suppress(metadata.PackageNotFoundError):
                pins[key] = metadata.version(req.name)
                todo.append(req.name)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def controller_env(
    cml: ClearMLSettings, run_id: str | None, environ: Mapping[str, str]
) -> dict[str, str | None]:
    """The variables the controller's command settles at its start-up (None: unset), for
    the SDK and the steps run locally: the run id (if any), and unless an agent runs it (the SDK
    is configured then) the hosts, keys, a generated client config without the report
    subprocess and the slow repository detection (unless the user's), online."""
    from housing.tracking.clearml import server_env
    from housing.tracking.offline import write_client_config

    env: dict[str, str | None] = {} if run_id is None else {"HOUSING_RUN_ID": run_id}
    if environ.get("CLEARML_TASK_ID"):
        return env
    if not environ.get("CLEARML_CONFIG_FILE"):
        conf = write_client_config(cml.offline_dir / CONFIG_FILE, retries=2, server=cml.server)
        env["CLEARML_CONFIG_FILE"] = str(conf)
    return {**env, **server_env(cml, environ), "CLEARML_OFFLINE_MODE": None}


@contextlib.contextmanager
def clearml_environment(cml: ClearMLSettings) -> Iterator[None]:
    """Settle :func:`controller_env` (no run id) for the rest of the command, before the
    SDK starts its threads: nothing is put back (the SDK ends the process soon after)."""
    from housing.entry import settle_environment

    settle_environment(controller_env(cml, None, os.environ))
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

    return execute_step(step_name, stage, overrides_json, config_dir, str(base), upstream_json)


def execute_step(  # noqa: PLR0917 - run_step's parameters, passed on
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
    from housing.orchestration.dag import step_files
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
    if stage == "train" and task is not None:  # a tuning trial's values (clearml_tune)
        overrides += trial_overrides(task.get_parameters_as_dict())
    overrides.append("clearml.enabled=false")
    settings = load_settings(overrides, config_dir=base / config_dir, root=base)
    inputs, outputs = step_files(stage, settings)
    for path in inputs:
        rel = relpath(path, base)
        if rel in known:
            _materialize(rel, *known[rel], base)
        elif stage != "prepare":  # every other stage reads only what its ancestors wrote
            raise ArtifactError(f"{path}: no upstream step of {step_name} recorded it")
    parent = "local" if task is None else str(getattr(task, "parent", None) or task.id)
    result = execute_stage(stage, settings, os.environ.get("HOUSING_RUN_ID") or f"clearml-{parent}")
    hashes: dict[str, str] = {}
    for path in outputs:
        if not path.is_file():
            raise ArtifactError(f"{path}: expected output is missing")
        hashes[relpath(path, base)] = file_sha256(path)
    if task is not None:
        metrics = getattr(result, "metrics", None)
        if isinstance(metrics, Mapping):
            reporter = task.get_logger()
            for key, value in metrics.items():
                with contextlib.suppress(TypeError, ValueError):
                    reporter.report_single_value(name=str(key), value=float(value))
        for rel, sha in hashes.items():
            task.upload_artifact(
                name=rel,
                artifact_object=base / rel,
                metadata={SHA_METADATA: sha},
                wait_on_upload=True,
            )
    log.info("step %s: %d output(s) recorded", step_name, len(hashes))
    return json.dumps(hashes, sort_keys=True)


def trial_overrides(hyperparams: Mapping[str, Any]) -> list[str]:
    """``++model.params.<name>=<value>`` for each value in a step task's
    :data:`TRIAL_SECTION` (``task.get_parameters_as_dict()``); [] for a task no tuning made."""
    section = hyperparams.get(TRIAL_SECTION)
    if not isinstance(section, Mapping):
        return []
    values = {name: str(value) for name, value in section.items()}
    return [
        f"++model.params.{name}={'null' if text == 'None' else text}"
        for name, text in sorted(values.items())
    ]


def _fetch_upstream(upstream: Mapping[str, str]) -> tuple[dict[str, tuple[str, Any]], set[str]]:
    """``{rel: (sha256, artifact)}`` from the ancestors' tasks (the sha256 from each
    artifact's metadata; nothing is downloaded here), and the ancestors that failed."""
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


def pipeline_name(cml: ClearMLSettings) -> str:
    """The controller task's name, ``<task_prefix>:pipeline``."""
    return f"{cml.task_prefix}:pipeline"


def pipeline_project(cml: ClearMLSettings) -> str:
    """Where ClearML keeps a pipeline's controller tasks: ``<project>/.pipelines/<name>``.

    ``PipelineController`` marks the project of the task it runs in ``[hidden, pipeline]``
    (by that task's project id), so a controller task cloned from a template in the user's
    project would hide the user's project; a template here hides only this one, as ClearML's
    own ``PipelineController.create`` does."""
    return f"{cml.project_name}/.pipelines/{pipeline_name(cml)}"


def build_controller(settings: Settings, overrides: Sequence[str], config_dir: Path) -> Any:
    """A ``PipelineController`` with one function step per DAG node (needs a server)."""
    from importlib import metadata

    from clearml.automation import PipelineController

    from housing.orchestration.dag import build_dag

    cml, options = settings.clearml, settings.clearml.pipeline
    reqs = locked_requirements(settings.root) or None
    try:
        version = metadata.version("housing")
    except metadata.PackageNotFoundError:  # pragma: no cover - always installed
        version = "0.0.0"
    controller: Any = PipelineController(
        name=pipeline_name(cml),
        project=cml.project_name,
        version=version,
        pool_frequency=options.poll_sec / 60.0,
        skip_global_imports=True,  # run_step imports what it needs itself
        add_pipeline_tags=True,
        abort_on_failure=False,
        packages=reqs,
    )
    if not options.run_locally:
        controller.set_default_execution_queue(options.execution_queue)
    repo, branch, commit = git_origin(settings.root)
    dag = build_dag(settings)
    ancestors: dict[str, list[str]] = {}
    for step in dag:
        seen = {a for parent in step.parents for a in (parent, *ancestors[parent])}
        ancestors[step.name] = [s.name for s in dag if s.name in seen]  # DAG order
        tolerant = settings.selection.allow_missing and step.stage == "train"
        controller.add_function_step(
            name=step.name,
            function=run_step,
            function_kwargs={
                "step_name": step.name,
                "stage": step.stage,
                "overrides_json": json.dumps([*overrides, *step.overrides]),
                "config_dir": relpath(config_dir, settings.root),
                "root": str(settings.root) if options.run_locally else "",
                "upstream_json": json.dumps({a: f"${{{a}.id}}" for a in ancestors[step.name]}),
            },
            project_name=cml.project_name,
            task_name=f"{cml.task_prefix}:{step.name}",
            task_type=_TASK_TYPES.get(step.stage, "training"),
            packages=reqs,
            repo=repo,
            repo_branch=branch,
            repo_commit=commit,
            working_dir="." if repo else None,
            parents=list(step.parents) or None,
            execution_queue=None if options.run_locally else options.execution_queue,
            cache_executed_step=True,
            tags=[*cml.tags, step.stage],
            continue_behaviour=(
                {"continue_on_fail": True, "skip_children_on_fail": False} if tolerant else None
            ),
        )
    return controller


def git_origin(root: Path) -> tuple[str | None, str | None, str | None]:
    """(remote URL, branch, commit) of the checkout at ``root`` (what agents clone), or
    Nones when it has no ``origin``."""

    def git(*args: str) -> str | None:
        return (command_output(["git", *args], root, timeout=10) or "").strip() or None

    url = git("remote", "get-url", "origin")
    if url is None:
        log.warning("ClearML: %s has no git remote 'origin'; steps carry their code only", root)
        return None, None, None
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    return url, None if branch == "HEAD" else branch, git("rev-parse", "HEAD")


def controller_succeeded(controller: Any) -> bool:
    """Whether the controller itself ended well (its steps are judged apart).

    Run by an agent, the SDK leaves its own task ``in_progress`` when the pipeline ends
    (the agent marks it completed once this process exits 0) and marks it ``failed`` when
    a step failed: there a task still in progress at the end is a success, where
    ``is_successful`` says no. Run here, the task is ``completed`` by then."""
    if controller.is_successful(fail_on_step_fail=False):
        return True
    task = controller.task
    return not task.running_locally() and str(task.status) == "in_progress"


def run_controller(
    settings: Settings, overrides: Sequence[str], config_dir: Path
) -> PipelineResult:
    """Build and start the controller as ``clearml.pipeline`` says, record the run's summary
    event, raise :class:`PipelineError` if it failed. Does not return when the SDK ends the
    process after enqueuing the controller (``run_locally: false`` with a controller queue)."""
    from housing import runs
    from housing.entry import settle_environment
    from housing.monitoring import EventLog, build_notifiers, record_pipeline_summary
    from housing.orchestration.dag import PipelineError, PipelineResult, StepResult, final_metrics

    options = settings.clearml.pipeline
    run_id = runs.current().run_id
    # before the controller starts its threads; inherited by the locally run steps
    settle_environment(controller_env(settings.clearml, run_id, os.environ))
    events = EventLog(settings.paths.metrics_dir / "pipeline_events.jsonl")
    notifier = build_notifiers(settings.notifications)
    executor = "clearml-local" if options.run_locally else "clearml-queue"
    t0 = time.monotonic()
    try:
        controller = build_controller(settings, overrides, config_dir)
    except Exception as exc:
        raise ClearMLError(f"ClearML pipeline controller could not start: {exc}") from exc
    if options.run_locally or not options.controller_queue:
        controller.start_locally(run_pipeline_steps_locally=options.run_locally)
    else:
        log.warning(
            "ClearML: controller %s goes to queue %r, steps to %r; this process ends now",
            controller.id,
            options.controller_queue,
            options.execution_queue,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        controller.start(queue=options.controller_queue)
    steps: dict[str, StepResult] = {}
    for name, node in controller.get_pipeline_dag().items():
        status = str(getattr(node, "status", "pending"))
        steps[name] = StepResult(name, _STATUS.get(status, "skipped"), status == "cached")
    evaluated = "evaluate" in steps and steps["evaluate"].status == "succeeded"
    best, rmse = final_metrics(settings) if evaluated else (None, None)
    ok = controller_succeeded(controller) and evaluated
    failed = next((s.name for s in steps.values() if s.status == "failed"), None)
    error = None if ok else f"step {failed or '?'} failed (see ClearML task logs)"
    duration = time.monotonic() - t0
    record_pipeline_summary(
        events,
        run_id,
        "succeeded" if ok else "failed",
        duration,
        notifier=notifier,
        best_model=best,
        test_rmse=rmse,
        error=error,
        extra={"executor": executor, "controller_task_id": str(controller.id)},
    )
    if not ok:
        raise PipelineError(f"pipeline step {failed or 'pipeline'} failed on ClearML: {error}")
    return PipelineResult(run_id, "succeeded", executor, steps, duration, best, rmse)
