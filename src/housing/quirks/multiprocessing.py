"""CPython ``multiprocessing`` / ``concurrent.futures`` quirks (locked: Python 3.11)."""

from __future__ import annotations

import contextlib
import importlib
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.process import BaseProcess


def pool_processes(pool: ProcessPoolExecutor) -> list[BaseProcess]:
    """The worker processes of ``pool`` (empty once it has shut down).

    CPython 3.11's ``ProcessPoolExecutor`` has no public list of its workers; the
    private ``_processes`` (pid -> Process, None after shutdown) is the only way to
    signal and join them when a stage must be stopped.
    """
    processes = getattr(pool, "_processes", None) or {}
    return list(processes.values())


def run_exit_finalizers() -> None:
    """Run the finalizers ``multiprocessing`` would run at interpreter exit, now.

    CPython 3.11 releases a pool's semaphores only in ``util._run_finalizers(0)``
    (private; registered with ``atexit``), so the resource tracker outlives an
    interrupted pool unless they run before the process exits.
    """
    from multiprocessing import util

    util._run_finalizers(0)  # type: ignore[attr-defined]


class StoppablePool(ProcessPoolExecutor):
    """A process pool that starts no replacement worker once ``stopping`` is set or it has
    shut down.

    CPython 3.11 replaces a ``max_tasks_per_child`` worker even after
    ``shutdown(wait=False)`` (and then fails in its manager thread); the replacement is
    made in the private ``_adjust_process_count``, overridden here, which reads the
    private ``_processes`` (None after shutdown).
    """

    stopping = False

    def _adjust_process_count(self) -> None:
        if self.stopping or getattr(self, "_processes", None) is None:
            return
        super()._adjust_process_count()


#: multiprocessing's helper processes: module -> the private attribute of its pid.
_HELPER_PID = {"forkserver": "_forkserver_pid", "resource_tracker": "_pid"}


def _helper(module: str) -> object:
    # CPython 3.11 keeps each helper as a private singleton: forkserver._forkserver,
    # resource_tracker._resource_tracker (no public accessor).
    return getattr(importlib.import_module(f"multiprocessing.{module}"), f"_{module}", None)


def helper_pid(module: str) -> int | None:
    """The pid of multiprocessing's ``forkserver`` or ``resource_tracker``, if running.

    CPython 3.11 exposes neither: the singletons' private ``_forkserver_pid`` / ``_pid``
    hold them (None when not started).
    """
    pid = getattr(_helper(module), _HELPER_PID[module], None)
    return pid if isinstance(pid, int) else None


def stop_helpers() -> None:
    """Stop multiprocessing's fork server and resource tracker now (else they outlive the
    process briefly).

    CPython 3.11's only way is each singleton's private ``_stop()`` (what its own tests
    and ``atexit`` use); a helper without it is left to stop by itself.
    """
    for module in _HELPER_PID:
        stop = getattr(_helper(module), "_stop", None)
        if stop is not None:
            with contextlib.suppress(Exception):
                stop()
