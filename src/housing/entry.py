"""Entry-point plumbing: logging for a command's process, one-line errors.

ClearML hooks ``sys.exit``: once called in a process (even when caught), later
ClearML tasks of that process stop reporting. So nothing here (or in
:mod:`housing.cli`) calls ``sys.exit``: errors become an exit code that the
console script returns.
"""

from __future__ import annotations

import logging
import os
import sys

from housing.errors import HousingError, Terminated

#: Library messages that are expected on every run and say nothing actionable.
_EXPECTED_NOISE = (
    "Saving scikit-learn models in the pickle or cloudpickle format",  # we pin + sha-check
    "Failed to resolve installed pip version",  # uv venvs have no pip
)

#: Exit code of a command stopped by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _EXPECTED_NOISE)


def configure_logging(verbosity: int) -> None:
    """Messages only, to stderr (INFO; -q WARNING; -v DEBUG). Called by entry points only."""
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    # MLflow configures its own loggers when imported (later, lazily): set them via env.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if verbosity > 0 else "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if verbosity <= 0:
        for name in ("mlflow", "mlflow.sklearn", "mlflow.utils.environment"):
            logging.getLogger(name).addFilter(_DropExpected())
        # urllib3 logs each retry at WARNING; the command reports the outcome itself
        logging.getLogger("urllib3").setLevel(logging.ERROR)


def error_line(message: str) -> None:
    """``error: <message>`` on stderr: the one line a failed command prints."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def report_error(exc: BaseException) -> int:
    """Print the one line for ``exc`` and return the exit code it maps to.

    A :class:`HousingError` gives its message and ``exit_code``; Ctrl-C gives
    ``error: interrupted`` and 130, SIGTERM ``error: terminated`` and 143. Anything else
    is a bug and propagates.
    """
    if isinstance(exc, HousingError):
        error_line(str(exc))
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C 130; SIGTERM (Terminated) 143
        error_line("terminated" if isinstance(exc, Terminated) else "interrupted")
        return int(getattr(exc, "exit_code", INTERRUPTED))
    raise exc
