"""Entry-point plumbing: logging for a command's process, one-line errors.

ClearML hooks ``sys.exit``: once called in a process (even when caught), later
ClearML tasks of that process stop reporting. So nothing here (or in
:mod:`housing.cli`) calls ``sys.exit``: errors become an exit code that the
console script returns.

MLflow's HTTP budget (``mlflow.timeout_sec``, ``mlflow.retries``): MLflow 3 has no
per-client or per-call knob; its REST client reads the variables of
:func:`housing.quirks.mlflow.http_budget` at each call (defaults: minutes per call
against a dead server). So the budget is decided once per process, at its start-up, before its
first MLflow call, and children inherit it:

- a command's process (each stage command, so also a stage server's child, which is
  the client's command): :func:`bound_mlflow_http` from the composed settings
  (``housing.cli``); :func:`configure_logging` sets the defaults before that, never
  over a budget the parent process decided;
- ``housing repro`` / ``housing pipeline`` workers: the fork server they are forked
  from starts with the run's budget in its environment (``repro.fork_server_env``),
  so a worker writes nothing.

A variable the user set is never replaced.

This module is the one that writes ``os.environ`` (``tests/test_environ.py`` checks it),
and only at a process's start-up, before it starts threads: setenv/getenv from several
threads is unsafe in glibc. Elsewhere settings reach the SDKs explicitly (client
arguments, a child process's ``env=``). ClearML's SDK reads its cache folder, config
file, hosts and keys only from the environment, so each process that opens ClearML
tasks settles them once from its own settings (:func:`settle_clearml`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from housing.errors import HousingError, Terminated
from housing.quirks import mlflow as mlflow_quirks

if TYPE_CHECKING:
    from housing.config import Settings

#: Exit code of a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in mlflow_quirks.EXPECTED_NOISE)


class NoDiskFullTraceback(logging.Filter):
    """A full disk is the command's one ``error:`` line: a library's record of it (DVC
    logs a failed cache transfer with its traceback) is dropped, and the package's own
    records keep their message without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from housing.io import is_disk_full

        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not is_disk_full(exc):
            return True
        if not record.name.startswith("housing"):
            return False
        record.exc_info, record.exc_text = None, None
        return True


def configure_logging(verbosity: int) -> None:
    """Messages only, to stderr (INFO; -q WARNING; -v DEBUG). Called by entry points only."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if verbosity <= 0:
        for handler in logging.getLogger().handlers:
            handler.addFilter(NoDiskFullTraceback())
        # MLflow's own handler prints its SQL store errors with the traceback.
        logging.getLogger(mlflow_quirks.SQL_STORE_LOGGER).addFilter(NoDiskFullTraceback())
    # MLflow configures its own loggers when imported (later, lazily): set them via env.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbosity > 0 else "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: <url>" to stdout for each run ended on a server
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if verbosity <= 0:
        for name in mlflow_quirks.NOISY_LOGGERS:
            logging.getLogger(name).addFilter(_DropExpected())
        # urllib3 logs each retry at WARNING; the command reports the outcome itself
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    bound_mlflow_http()  # the defaults, unless the parent process decided the budget


#: Records which MLflow HTTP variables housing set (``NAME=value,...``), so a later
#: decision (or a child process's, which inherits both) may replace its own values,
#: never the user's.
_BUDGET_MARK = "HOUSING_MLFLOW_HTTP_BUDGET"


def mlflow_http_env(
    timeout_sec: int | None, retries: int | None, environ: Mapping[str, str]
) -> dict[str, str]:
    """The MLflow HTTP variables to set over ``environ`` for this budget (with the mark
    of which ones housing set): never a value the user set; without a budget (None), the
    defaults only where neither housing nor the user decided one yet."""
    wanted = mlflow_quirks.http_budget(timeout_sec or 2, 1 if retries is None else retries)
    decided = timeout_sec is not None or retries is not None
    ours = dict(
        item.split("=", 1) for item in environ.get(_BUDGET_MARK, "").split(",") if "=" in item
    )
    changes: dict[str, str] = {}
    for name, value in wanted.items():
        current = environ.get(name)
        if current is None or (decided and ours.get(name) == current):
            changes[name] = ours[name] = value
    if changes:
        changes[_BUDGET_MARK] = ",".join(f"{k}={v}" for k, v in ours.items())
    return changes


def bound_mlflow_http(timeout_sec: int | None = None, retries: int | None = None) -> None:
    """Give every MLflow HTTP call of this process (and its children) the budget
    ``mlflow.timeout_sec`` / ``mlflow.retries``, without backoff (see the module
    docstring); None: the defaults, unless a budget was decided already."""
    os.environ.update(mlflow_http_env(timeout_sec, retries, os.environ))


def adopt_environment(env: Mapping[str, str]) -> None:
    """Make ``env`` this process's whole environment: the start-up of a process forked
    to run another's command (a stage server's child takes its client's)."""
    os.environ.clear()
    os.environ.update(env)


@contextlib.contextmanager
def start_up_environment(env: Mapping[str, str]) -> Iterator[None]:
    """Set ``env`` for the ``with`` body, then put each variable back as it was (unset
    ones unset): start-up work of a process that runs no other thread yet (a fork
    server's warm-up; starting multiprocessing's fork server, which can only inherit
    this process's environment)."""
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def take_variable(name: str) -> str | None:
    """Remove and return ``name``: a value handed to this process's start-up only (its
    children do not inherit it)."""
    return os.environ.pop(name, None)


def settle_environment(values: Mapping[str, str | None]) -> None:
    """Set each variable (unset those given None) for the rest of this process and its
    children: a command's start-up, before it starts threads."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def settle_clearml(settings: Settings) -> None:
    """Settle the ``CLEARML_*`` variables the ClearML tracker of ``settings`` needs
    (:func:`housing.tracking.recorder.clearml_env`; nothing when it is not a backend):
    the start-up of a process that opens ClearML tasks (a stage command, a ``housing
    repro`` worker), before its first thread. Each stage process settles its own, so a
    stage's own ``clearml.*`` overrides (its offline folder) hold."""
    from housing.tracking.recorder import clearml_env

    settle_environment(clearml_env(settings))


@contextlib.contextmanager
def hold_run_lock(
    root: Path, command: str, *, wait: bool, say: Callable[[str], None]
) -> Iterator[None]:
    """Hold ``root``'s run lock (:mod:`housing.runlock`) while a command runs; the
    holder's identity is exported at once, before any work, for the processes it starts
    (its stages), and removed when the command ends."""
    from housing.runlock import HOLDER_ENV, run_lock

    with run_lock(root, command, wait=wait, environ=os.environ, say=say) as holder:
        if holder is None:  # a child of the holder: runs under its lock
            yield
            return
        previous = os.environ.get(HOLDER_ENV)
        os.environ[HOLDER_ENV] = holder.token
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(HOLDER_ENV, None)
            else:
                os.environ[HOLDER_ENV] = previous


def error_line(message: str) -> None:
    """``error: <message>`` on stderr: the one line a failed command prints."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def report_error(exc: BaseException) -> int:
    """Print the one line for ``exc`` and return the exit code it maps to.

    A :class:`HousingError` gives its message and ``exit_code``; a full disk (an
    ``OSError`` from any library) gives ``error: disk full ...: free space and rerun``
    and 1; Ctrl-C gives ``error: interrupted`` and 130, SIGTERM ``error: terminated``
    and 143. Anything else is a bug and propagates.
    """
    from housing.io import disk_full, is_disk_full, written_path

    if isinstance(exc, HousingError):
        error_line(str(exc))
        return exc.exit_code
    if is_disk_full(exc):
        error = disk_full(written_path(exc))
        error_line(str(error))
        return error.exit_code
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C 130; SIGTERM (Terminated) 143
        error_line("terminated" if isinstance(exc, Terminated) else "interrupted")
        return int(getattr(exc, "exit_code", INTERRUPTED))
    raise exc
