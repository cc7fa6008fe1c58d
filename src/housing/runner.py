"""Run one stage with its events, notifications and trackers around it.

The one place that wraps a pure stage (``housing.stages.*.run``) for every entry
point: the ``housing`` commands, the scripts DVC calls, the ``housing repro`` workers
and the ClearML pipeline steps.
"""

from __future__ import annotations

import importlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from housing.errors import Terminated

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.runs import RunContext

STAGES = ("prepare", "train", "select_best", "evaluate")


def run_stage(stage: str, overrides: Sequence[str] = (), config_dir: Path | None = None) -> Any:
    """Compose the config and run one stage; returns the stage's result dataclass."""
    from housing.config import load_settings

    return execute_stage(stage, load_settings(overrides, config_dir=config_dir))


def execute_stage(
    stage: str,
    settings: Settings,
    run_id: str | None = None,
    *,
    context: RunContext | None = None,
) -> Any:
    """Run one stage with its events, notifications and trackers around it.

    ``context`` says which pipeline run the stage belongs to (default: worked out from
    the process, see :mod:`housing.runs`); ``run_id`` overrides its id.
    """
    from dataclasses import replace

    from housing import runs
    from housing.monitoring import EventLog, build_notifiers, track_stage
    from housing.tracking.base import StageRun
    from housing.tracking.recorder import record, tracked

    context = context or runs.current()
    if run_id is not None and run_id != context.run_id:
        context = replace(context, run_id=run_id)
    name = f"train_{settings.model.name}" if stage == "train" else stage
    events = EventLog(settings.paths.metrics_dir / "pipeline_events.jsonl")
    notifier = build_notifiers(settings.notifications)
    run = StageRun(
        stage=stage, name=name, pipeline_run_id=context.run_id, tags=(stage,), context=context
    )
    with (
        stop_signals(),
        track_stage(events, context.run_id, name, notifier) as handle,
        tracked(settings, run) as tset,
    ):
        result = stage_function(stage)(settings)
        record(tset, stage, settings, result)
        metrics = getattr(result, "metrics", None)
        if isinstance(metrics, dict):
            handle.update({"metrics": metrics})
    return result


def stage_function(stage: str) -> Callable[[Any], Any]:
    """The pure ``run(settings)`` of a stage."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    run: Callable[[Any], Any] = importlib.import_module(f"housing.stages.{stage}").run
    return run


#: Set once the first Ctrl-C or SIGTERM of this process was raised (see stop_signals).
_stopping = threading.Event()


def stop_requested() -> bool:
    """Whether this process got Ctrl-C or SIGTERM inside :func:`stop_signals`."""
    return _stopping.is_set()


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    if _stopping.is_set():  # the first one is being handled: let the cleanup finish
        return
    _stopping.set()
    if signum == signal.SIGTERM:
        raise Terminated("SIGTERM")
    raise KeyboardInterrupt


@contextmanager
def handling_signals(
    signums: Sequence[int], handler: Callable[[int, FrameType | None], Any]
) -> Iterator[None]:
    """Within the block, ``handler`` handles ``signums``; the previous handlers come back
    after it. A signal this process ignores (``nohup``, a background job) stays ignored.
    Main thread only (as :func:`signal.signal`)."""
    before = {s: h for s in signums if (h := signal.getsignal(s)) not in (None, signal.SIG_IGN)}
    for signum in before:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`~housing.errors.Terminated` as Ctrl-C raises
    :class:`KeyboardInterrupt`, so the stage's trackers and events record it as killed;
    a second signal while that cleanup runs is ignored. A signal this process ignores
    stays ignored; off the main thread, or nested, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is _raise_stop
    ):
        yield
        return
    with handling_signals((signal.SIGINT, signal.SIGTERM), _raise_stop):
        yield
