"""CPython ``multiprocessing`` / ``concurrent.futures`` quirks (locked: Python 3.11)."""

from __future__ import annotations

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
