"""Entry-point plumbing shared by every command: parsing, logging, error lines.

ClearML hooks ``sys.exit``: once called in a process (even when caught), later
ClearML tasks of that process stop reporting. So parsers here never call
``sys.exit``, and every ``main(argv)`` returns its exit code instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from housing.errors import HousingError, UsageError

#: Library messages that are expected on every run and say nothing actionable.
_EXPECTED_NOISE = (
    "Saving scikit-learn models in the pickle or cloudpickle format",  # we pin + sha-check
    "Failed to resolve installed pip version",  # uv venvs have no pip
)


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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _ParserExit(Exception):  # noqa: N818 - a control-flow signal, not an error
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of calling ``sys.exit``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _ParserExit(status)


def add_common_options(parser: argparse.ArgumentParser, *, overrides: bool = True) -> None:
    """-q/-v, --config-dir and (optionally) the Hydra overrides."""
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity")
    parser.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity")
    parser.add_argument(
        "--config-dir", type=Path, default=None, help="config folder (default: ./conf)"
    )
    if overrides:
        parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    parser.set_defaults(verbosity=0)


def run_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    action: Callable[[argparse.Namespace], int],
    *,
    intermixed: bool = True,
) -> int:
    """Parse, configure logging, run ``action``; a HousingError is one ``error:`` line.

    ``intermixed`` allows options after positionals (not with subcommands).
    """
    try:
        arguments = sys.argv[1:] if argv is None else list(argv)
        parse = parser.parse_intermixed_args if intermixed else parser.parse_args
        args = parse(arguments)
        configure_logging(args.verbosity)
        return action(args)
    except _ParserExit as exc:  # --help
        return exc.status
    except HousingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
