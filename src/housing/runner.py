"""Run one stage with its events, notifications and trackers around it.

The one place that wraps a pure stage (``housing.stages.*.run``) for every entry
point: the ``housing`` commands, the scripts DVC calls, the ``housing repro`` workers
and the ClearML pipeline steps.
"""

from __future__ import annotations

import contextlib
import importlib
import os
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
    after it (:func:`_restore`: a signal arriving meanwhile still reaches ``handler``). A
    signal this process ignores (``nohup``, a background job) stays ignored. Main thread
    only (as :func:`signal.signal`)."""
    before = {s: h for s in signums if (h := signal.getsignal(s)) not in (None, signal.SIG_IGN)}
    for signum in before:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        _restore(before, handler)


def _restore(before: dict[int, Any], handler: Callable[[int, FrameType | None], Any]) -> None:
    """Put ``before``'s handlers back; a signal that arrives meanwhile is handled by
    ``handler`` once they are all back (an exception it raises propagates from here).

    CPython's ``signal.signal`` first runs the handlers of pending signals (one that raises
    makes the call raise, the handler unchanged), then swaps the handler: a signal landing
    between the two, with ``SIG_DFL`` as the new handler, is dropped with "OSError: Signal
    N ignored due to race condition" printed. So every signal first goes to a callable that
    only notes it (callable to callable drops nothing), then to its previous handler with
    a wakeup fd watching: a byte there for a signal now ``SIG_DFL`` is one that was dropped
    (CPython's report of it is not printed: :mod:`housing.quirks.signals`).
    """
    from housing.quirks.signals import dropped_signals_unreported

    noted: list[int] = []
    errors: list[BaseException] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        noted.append(signum)

    for signum in before:
        _set_handler(signum, note, errors)
    read_fd, write_fd = os.pipe()
    try:
        for fd in (read_fd, write_fd):
            os.set_blocking(fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        try:
            with dropped_signals_unreported(before):  # handled below: no traceback
                for signum, previous in before.items():
                    _set_handler(signum, previous, errors)
        finally:
            signal.set_wakeup_fd(previous_fd)
        arrived = _drain(read_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    if arrived and previous_fd != -1:  # whoever set a wakeup fd hears of them too
        with contextlib.suppress(OSError):
            os.write(previous_fd, arrived)
    dropped = [s for s in arrived if s in before and not callable(before[s])]
    for signum in dict.fromkeys([*noted, *dropped]):
        try:
            handler(signum, None)
        except BaseException as exc:  # raised below, once every handler ran
            errors.append(exc)
    if errors:
        raise errors[0]


def _set_handler(signum: int, action: Any, errors: list[BaseException]) -> None:
    """``signal.signal(signum, action)``, again while a pending signal's handler raises
    :class:`KeyboardInterrupt` (the call then fails without swapping); what it raised is
    kept in ``errors``."""
    while True:
        try:
            signal.signal(signum, action)
            return
        except BaseException as exc:  # kept for the caller to raise
            errors.append(exc)
            if not isinstance(exc, KeyboardInterrupt):
                return


def _drain(fd: int) -> bytes:
    """Whatever a non-blocking pipe holds."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 512)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


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
