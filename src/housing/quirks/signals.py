"""CPython ``signal`` quirks (locked: Python 3.11)."""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

#: What CPython 3.11 reports (``_PyErr_CheckSignalsTstate``, as an unraisable exception)
#: when a signal reached its C handler but the Python handler had meanwhile become
#: ``SIG_DFL``/``SIG_IGN``: the signal is dropped (bpo-43406).
DROPPED_SIGNAL = "Signal {} ignored due to race condition"


def is_dropped_signal_report(exc: BaseException | None, signums: Collection[int]) -> bool:
    """Whether ``exc`` is CPython's report of a dropped signal among ``signums``."""
    return isinstance(exc, OSError) and str(exc) in {DROPPED_SIGNAL.format(s) for s in signums}


@contextmanager
def dropped_signals_unreported(signums: Collection[int]) -> Iterator[None]:
    """Within the block, CPython's "Signal N ignored due to race condition" report of a
    signal among ``signums`` is not printed (the caller handles that signal itself);
    every other unraisable exception goes to the previous ``sys.unraisablehook``.

    CPython 3.11 prints the report with a traceback through ``sys.unraisablehook``, the
    only public way to intercept it.
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not is_dropped_signal_report(unraisable.exc_value, signums):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
