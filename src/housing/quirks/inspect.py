"""CPython ``inspect`` quirks (locked: Python 3.11)."""

from __future__ import annotations


def index_module_files() -> None:
    """Let :mod:`inspect` map the loaded modules' files to their names now.

    CPython 3.11's ``inspect.getmodule`` fills its file -> module index
    (``inspect.modulesbyfile``) on the first lookup of a file it has not mapped yet, with
    no public call to fill it ahead; looking up a file no module has, through the private
    keyword ``_filename``, does it. ClearML's loggers call ``inspect.stack()``, so a fork
    server does it once instead of every forked stage.
    """
    import inspect

    inspect.getmodule(None, _filename="<housing warm-up>")
