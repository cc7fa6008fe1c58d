"""Run the pipeline on ``clearml.pipeline.schedule_cron``: crontab, or a ClearML scheduler.

:func:`schedule` validates the expression (a :class:`~housing.errors.ConfigError` naming
the key), computes the next five runs and writes ``metrics/clearml_pipeline_schedule.txt``.

- Without a ClearML server it computes the crontab line (``<cron> cd <root> &&
  <venv python> scripts/clearml_pipeline.py >> metrics/clearml_pipeline_cron.log 2>&1
  # housing:housing-pipeline``) and, with ``install=True``, puts it in the crontab once
  (re-running replaces it).
- With a server (ClearML online) it computes the ``TaskScheduler`` entries the expression
  maps to; with ``install=True`` it creates a template task ``<task_prefix>:pipeline``
  (``scripts/clearml_pipeline.py`` at this checkout's commit) and a ``TaskScheduler``
  that clones it onto ``clearml.pipeline.execution_queue`` at those times, and sends
  the scheduler to ``clearml.pipeline.controller_queue`` (default ``services``). The SDK
  ENDS THE PROCESS (exit 0) once the scheduler is enqueued (``before_exit`` gets the
  result first, so the command can show it). A scheduler already queued
  or running with the same schedule is kept (idempotent); one with another schedule
  is stopped and replaced. ClearML schedules in UTC, so next runs are UTC there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from housing.errors import ConfigError, HousingError

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.schedule import CronSchedule, CrontabIO

log = logging.getLogger(__name__)

__all__ = [
    "CRON_KEY",
    "MARKER",
    "ScheduleError",
    "ScheduleResult",
    "cron_command",
    "schedule",
    "scheduler_entries",
]

CRON_KEY: Final = "clearml.pipeline.schedule_cron"
MARKER: Final = "housing-pipeline"
SCHEDULE_FILE: Final = "clearml_pipeline_schedule.txt"
CRON_LOG: Final = "clearml_pipeline_cron.log"
PIPELINE_SCRIPT: Final = "scripts/clearml_pipeline.py"
_WEEKDAYS: Final = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")


class ScheduleError(HousingError):
    """The crontab or the ClearML scheduler could not be updated."""


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
    entries: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    scheduler_task_id: str | None = None
    template_task_id: str | None = None
    controller_queue: str | None = None  # the queue the ClearML scheduler runs on


def _expression(settings: Settings) -> str:
    expr = settings.clearml.pipeline.schedule_cron  # validated by housing.config
    if expr is None:
        raise ConfigError(f"{CRON_KEY}: not set; add a cron expression such as '0 6 * * *'")
    return expr


def _python(root: Path) -> str:
    venv = root / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def cron_command(settings: Settings) -> str:
    """``cd <root> && <venv python> scripts/clearml_pipeline.py >> <metrics log> 2>&1``."""
    from housing.io import relpath
    from housing.schedule import build_cron_command

    log_path = relpath(settings.paths.metrics_dir / CRON_LOG, settings.root)
    return build_cron_command(settings.root, [_python(settings.root), PIPELINE_SCRIPT], log_path)


def scheduler_entries(cron: CronSchedule) -> list[dict[str, Any]]:
    """``TaskScheduler.add_task`` timing arguments equivalent to a cron expression.

    Supported: one minute with any hours (``M H,H2 ...``), every hour (``M * ...``) or
    ``*/N`` minutes; day-of-month OR day-of-week restricted (not both); every month.
    Anything else is a ConfigError naming ``clearml.pipeline.schedule_cron``.
    """

    def unsupported(why: str) -> ConfigError:
        return ConfigError(
            f"{CRON_KEY}: '{cron.expr}' cannot be a ClearML TaskScheduler entry ({why}); "
            "simplify it or schedule with cron (clearml.mode=offline)"
        )

    every_dom, every_dow = len(cron.days) == 31, len(cron.weekdays) == 7
    all_days = every_dom and every_dow
    if len(cron.months) != 12:
        raise unsupported("months must be '*'")
    if cron.day_or or not (every_dom or every_dow):
        raise unsupported("restrict day-of-month or day-of-week, not both")
    every_hour = len(cron.hours) == 24
    if len(cron.minutes) > 1:
        step = cron.minutes[1] - cron.minutes[0]
        regular = cron.minutes == tuple(range(0, 60, step)) and 60 % step == 0
        if not (regular and every_hour and all_days):
            raise unsupported("several minutes need '*/N * * * *'")
        return [{"minute": step}]
    minute = cron.minutes[0]
    if every_hour:
        if not all_days:
            raise unsupported("an hourly schedule must run every day")
        return [{"minute": minute, "hour": 1}]
    entries: list[dict[str, Any]] = []
    for hour in cron.hours:
        if all_days:
            entries.append({"minute": minute, "hour": hour, "day": 1})
        elif not every_dow:
            days = [_WEEKDAYS[d] for d in cron.weekdays]
            entries.append({"minute": minute, "hour": hour, "day": 0, "weekdays": days})
        else:
            entries += [{"minute": minute, "hour": hour, "day": d, "month": 1} for d in cron.days]
    return entries


def schedule(
    settings: Settings,
    *,
    install: bool,
    crontab: CrontabIO | None = None,
    now: datetime | None = None,
    before_exit: Callable[[ScheduleResult], None] | None = None,
) -> ScheduleResult:
    """Validate, compute the next runs, write the schedule file, install it if asked.

    ``crontab`` defaults to the user's crontab (``crontab`` binary); ``now`` to the
    current time (local for cron, UTC for ClearML). Registering a ClearML scheduler
    ends the process: ``before_exit`` receives the result just before.
    """
    from housing.orchestration.pipeline import clearml_mode
    from housing.schedule import (
        CrontabError,
        SystemCrontab,
        crontab_line,
        install_schedule,
        next_runs,
        parse_cron,
        write_schedule_file,
    )

    expr = _expression(settings)
    cron = parse_cron(expr, key=CRON_KEY)
    online = clearml_mode(settings) == "online"
    if now is None:
        now = datetime.now(UTC) if online else datetime.now().astimezone()
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    runs = tuple(next_runs(cron, now, 5, key=CRON_KEY))
    target = settings.paths.metrics_dir / SCHEDULE_FILE
    if online:
        return _schedule_clearml(
            settings, cron, runs, target, install=install, before_exit=before_exit
        )

    command = cron_command(settings)
    write_schedule_file(target, expr, runs, command, key=CRON_KEY)
    line = crontab_line(expr, command, MARKER, key=CRON_KEY)
    changed = False
    if install:
        try:
            changed = install_schedule(crontab or SystemCrontab(), line, MARKER)
        except CrontabError as exc:
            raise ScheduleError(f"crontab: {exc}") from None
    return ScheduleResult(
        expr=expr,
        next_runs=runs,
        command=command,
        schedule_file=target,
        mode="crontab",
        crontab_line=line,
        installed=install,
        changed=changed,
    )


def _schedule_clearml(
    settings: Settings,
    cron: CronSchedule,
    runs: tuple[datetime, ...],
    target: Path,
    *,
    install: bool,
    before_exit: Callable[[ScheduleResult], None] | None = None,
) -> ScheduleResult:
    from housing.orchestration.clearml_controller import DEFAULT_CONTROLLER_QUEUE
    from housing.schedule import write_schedule_file

    cml = settings.clearml
    entries = scheduler_entries(cron)
    services = cml.pipeline.controller_queue or DEFAULT_CONTROLLER_QUEUE
    queue = cml.pipeline.execution_queue
    command = (
        f"ClearML TaskScheduler on queue {services}: clone {cml.task_prefix}:pipeline "
        f"({PIPELINE_SCRIPT}) onto queue {queue} (UTC)"
    )
    write_schedule_file(target, cron.expr, runs, command, key=CRON_KEY)
    result = ScheduleResult(
        expr=cron.expr,
        next_runs=runs,
        command=command,
        schedule_file=target,
        mode="clearml",
        entries=tuple(entries),
        controller_queue=services,
    )
    if not install:
        return result
    return _register(settings, result, services=services, queue=queue, before_exit=before_exit)


def _register(
    settings: Settings,
    result: ScheduleResult,
    *,
    services: str,
    queue: str,
    before_exit: Callable[[ScheduleResult], None] | None = None,
) -> ScheduleResult:
    """Create the template and the TaskScheduler; the SDK then ends the process."""
    from dataclasses import replace

    from housing.orchestration.clearml_controller import (
        clearml_environment,
        git_origin,
        locked_requirements,
    )

    cml = settings.clearml
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
                project_name=cml.project_name,
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
            current.add_tags([MARKER, tag])
        except HousingError:
            raise
        except Exception as exc:
            raise ScheduleError(f"ClearML scheduler could not be registered: {exc}") from exc
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
