"""Run the pipeline on ``clearml.pipeline.schedule_cron`` (validated, next five runs in
``metrics/clearml_pipeline_schedule.txt``).

- Without a ClearML server: a crontab line (:func:`cron_command` tagged
  ``# housing:housing-pipeline``), installed once (re-running replaces it).
- With a server: ``TaskScheduler`` entries for the expression (UTC); installing creates a
  template task ``<task_prefix>:pipeline`` (the script at this checkout's commit) and a
  scheduler that clones it onto ``clearml.pipeline.execution_queue``, and sends the
  scheduler to ``clearml.pipeline.controller_queue`` (default ``services``): the SDK ENDS
  THE PROCESS (exit 0) then. A scheduler already queued or running with the same schedule
  is kept; one with another schedule is stopped and replaced. The scheduler task records
  the script's arguments (``Args/argv``, connected through the SDK): the agent re-runs
  ``scripts/clearml_schedule.py`` with them (:func:`agent_arguments`) and the task then
  runs the TaskScheduler loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from housing import schedule as sch
from housing.errors import ConfigError, HousingError
from housing.orchestration.pipeline import clearml_mode

if TYPE_CHECKING:
    from housing.config import Settings

log = logging.getLogger(__name__)

MARKER: Final = "housing-pipeline"
PIPELINE_SCRIPT: Final = "scripts/clearml_pipeline.py"
DEFAULT_CONTROLLER_QUEUE: Final = "services"
ARGS_SECTION, ARGV_KEY = "Args", "argv"  # the scheduler task's recorded script arguments
MAX_ENTRIES: Final = 60  # TaskScheduler entries one expression may need
_WEEKDAYS: Final = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")


@dataclass(frozen=True)
class ScheduleResult:
    """What :func:`schedule` computed and did."""

    expr: str
    next_runs: tuple[datetime, ...]
    command: str
    schedule_file: Path
    mode: Literal["crontab", "clearml"]
    crontab_line: str | None = None
    installed: bool = False  # install was asked for and the schedule is in place
    changed: bool = False  # the crontab was modified / a scheduler was registered
    entries: tuple[dict[str, Any], ...] = ()
    scheduler_task_id: str | None = None
    template_task_id: str | None = None
    controller_queue: str | None = None  # the queue the ClearML scheduler runs on


def cron_command(settings: Settings) -> str:
    """``cd <root> && <venv python> scripts/clearml_pipeline.py >> <metrics log> 2>&1``."""
    from housing.io import relpath

    root = settings.root
    venv = root / ".venv" / "bin" / "python"
    argv = [str(venv) if venv.is_file() else sys.executable, PIPELINE_SCRIPT]
    log_path = shlex.quote(relpath(settings.paths.metrics_dir / "clearml_pipeline_cron.log", root))
    return f"cd {shlex.quote(str(root))} && {shlex.join(argv)} >> {log_path} 2>&1"


def scheduler_entries(cron: sch.CronSchedule) -> list[dict[str, Any]]:
    """``TaskScheduler.add_task`` timing arguments that fire on the cron expression's clock.

    ClearML counts a lone ``minute=N`` from the scheduler's start (not cron's ``*/N``) and
    walks a weekday list from its first item, so each cron minute becomes its own entry:
    hourly (``minute=M, hour=1``), daily (``minute, hour, day=1``) or weekly on one weekday
    (``..., day=1, weekdays=[W]``), at most :data:`MAX_ENTRIES`. Day-of-month and month
    restrictions are refused (ClearML can skip the first month and fails on a day a month
    lacks): a ConfigError naming ``clearml.pipeline.schedule_cron``.
    """

    def unsupported(why: str) -> ConfigError:
        return ConfigError(
            f"{sch.CRON_KEY}: '{cron.expr}' cannot run on cron's clock in a ClearML "
            f"TaskScheduler ({why}); simplify it or schedule with cron (clearml.mode=offline)"
        )

    if len(cron.months) != 12:
        raise unsupported("months must be '*'")
    if len(cron.days) != 31:
        raise unsupported("day-of-month must be '*'")
    every_hour, every_dow = len(cron.hours) == 24, len(cron.weekdays) == 7
    weekdays = sorted({d % 7 for d in cron.weekdays})
    if every_hour and every_dow:
        times: list[dict[str, Any]] = [{"minute": m, "hour": 1} for m in cron.minutes]
    else:
        times = [{"minute": m, "hour": h, "day": 1} for h in cron.hours for m in cron.minutes]
    entries = (
        times if every_dow else [{**t, "weekdays": [_WEEKDAYS[d]]} for d in weekdays for t in times]
    )
    if len(entries) > MAX_ENTRIES:
        raise unsupported(f"{len(entries)} entries, at most {MAX_ENTRIES}")
    return entries


def agent_arguments() -> list[str] | None:
    """The arguments the scheduler task recorded, when a ClearML agent runs it (the SDK
    sees ``CLEARML_TASK_ID`` and runs remotely); ``None`` when run by hand."""
    task_id = os.environ.get("CLEARML_TASK_ID")
    if not task_id:
        return None
    try:
        from clearml import Task

        if Task.running_locally():
            return None
        argv: Any = Task.get_task(task_id=task_id).get_parameter(f"{ARGS_SECTION}/{ARGV_KEY}")
    except Exception as exc:
        raise sch.ScheduleError(
            f"ClearML task {task_id}: cannot read its arguments: {exc}"
        ) from exc
    if not argv:
        raise sch.ScheduleError(
            f"ClearML task {task_id}: no {ARGS_SECTION}/{ARGV_KEY} recorded; "
            "register the scheduler again with `housing schedule --install`"
        )
    return shlex.split(str(argv))


def run_recorded(argv: Sequence[str]) -> ScheduleResult:
    """On the agent: install with the recorded overrides, i.e. run the scheduler loop (never
    returns). Not through click: once the SDK is imported on an agent it rebinds click's
    parameters from the task's ``Args`` as if they were its own."""
    from housing.config import load_settings

    overrides = [arg for arg in argv if not arg.startswith("-")]
    return schedule(load_settings(overrides), install=True, agent_args=argv)


def schedule(
    settings: Settings,
    *,
    install: bool,
    crontab: sch.CrontabIO | None = None,
    now: datetime | None = None,
    before_exit: Callable[[ScheduleResult], None] | None = None,
    agent_args: Sequence[str] = ("--install",),
) -> ScheduleResult:
    """Validate, compute the next runs, write the schedule file, install it if asked.

    ``crontab`` defaults to the user's; ``now`` to the current time (local for cron, UTC for
    ClearML). Registering a ClearML scheduler ends the process: ``before_exit`` gets the
    result just before. ``agent_args`` (``scripts/clearml_schedule.py`` arguments, with
    ``--install``) are recorded on the scheduler task for the agent that runs it."""
    cml = settings.clearml
    expr = cml.pipeline.schedule_cron  # validated by housing.config
    if expr is None:
        raise ConfigError(f"{sch.CRON_KEY}: not set; add a cron expression such as '0 6 * * *'")
    cron = sch.parse_cron(expr)
    online = clearml_mode(settings) == "online"
    now = now or (datetime.now(UTC) if online else datetime.now().astimezone())
    runs = tuple(sch.next_runs(cron, now))
    target = settings.paths.metrics_dir / "clearml_pipeline_schedule.txt"
    if online:
        services = cml.pipeline.controller_queue or DEFAULT_CONTROLLER_QUEUE
        command = (
            f"ClearML TaskScheduler on queue {services}: clone {cml.task_prefix}:pipeline "
            f"({PIPELINE_SCRIPT}) onto queue {cml.pipeline.execution_queue} (UTC)"
        )
        entries = tuple(scheduler_entries(cron))
        result = ScheduleResult(
            expr, runs, command, target, "clearml", entries=entries, controller_queue=services
        )
    else:
        command = cron_command(settings)
        line = sch.crontab_line(expr, command, MARKER)
        result = ScheduleResult(expr, runs, command, target, "crontab", crontab_line=line)
    sch.write_schedule_file(target, expr, runs, command)
    if not install:
        return result
    if online:
        return _register(settings, result, before_exit, agent_args)
    changed = sch.install_schedule(crontab or sch.SystemCrontab(), result.crontab_line, MARKER)
    return replace(result, installed=True, changed=changed)


def _register(
    settings: Settings,
    result: ScheduleResult,
    before_exit: Callable[[ScheduleResult], None] | None,
    agent_args: Sequence[str],
) -> ScheduleResult:
    """Create the template and the TaskScheduler; the SDK then ends the process."""
    from housing.orchestration.clearml_controller import (
        clearml_environment,
        git_origin,
        locked_requirements,
        pipeline_project,
    )

    cml = settings.clearml
    services, queue = str(result.controller_queue), cml.pipeline.execution_queue
    name = f"{cml.task_prefix}:pipeline-scheduler"
    fingerprint = hashlib.sha256(
        json.dumps([result.expr, queue, services, list(result.entries)], sort_keys=True).encode()
    ).hexdigest()[:12]
    tag = f"schedule:{fingerprint}"
    with clearml_environment(cml):
        try:
            from clearml import Task
            from clearml.automation import TaskScheduler

            if not Task.running_locally():  # on the services agent: run the scheduler loop
                TaskScheduler(
                    force_create_task_name=name, force_create_task_project=cml.project_name
                ).start_remotely(queue=services)  # deserializes the jobs; never returns
            active: list[Any] = Task.get_tasks(
                project_name=cml.project_name,
                task_name=f"^{re.escape(name)}$",
                task_filter={"status": ["queued", "in_progress"], "system_tags": ["-archived"]},
            )
            same = [t for t in active if tag in (t.get_tags() or [])]
            if same:  # unchanged
                return replace(result, installed=True, scheduler_task_id=str(same[0].id))
            for old in active:
                log.info("stopping the previous ClearML scheduler %s", old.id)
                old.mark_stopped(force=True)
            repo, branch, commit = git_origin(settings.root)
            template: Any = Task.create(
                project_name=pipeline_project(cml),  # not the user's: the controller hides it
                task_name=f"{cml.task_prefix}:pipeline",
                task_type="controller",
                repo=repo,
                branch=branch,
                commit=commit,
                script=PIPELINE_SCRIPT if repo else str(settings.root / PIPELINE_SCRIPT),
                working_directory="." if repo else None,
                packages=locked_requirements(settings.root) or None,
                add_task_init_call=False,
            )
            template.add_tags([MARKER])
            scheduler = TaskScheduler(
                force_create_task_name=name, force_create_task_project=cml.project_name
            )
            for index, entry in enumerate(result.entries):
                scheduler.add_task(
                    schedule_task_id=template.id,
                    queue=queue,
                    name=f"{cml.task_prefix}:pipeline #{index + 1} ({result.expr})",
                    single_instance=True,
                    **entry,
                )
            current: Any = Task.current_task()
            current.connect({ARGV_KEY: shlex.join(agent_args)}, name=ARGS_SECTION)
            current.add_tags([MARKER, tag])
        except HousingError:
            raise
        except Exception as exc:
            raise sch.ScheduleError(f"ClearML scheduler could not be registered: {exc}") from exc
        registered = replace(
            result,
            installed=True,
            changed=True,
            scheduler_task_id=str(current.id),
            template_task_id=str(template.id),
        )
        if before_exit is not None:
            before_exit(registered)
        sys.stdout.flush()
        sys.stderr.flush()
        scheduler.start_remotely(queue=services)
    return registered
