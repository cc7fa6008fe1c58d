"""Errors with one-line, actionable messages.

Every failure a user can fix (bad config, bad data, missing file) is raised as a
:class:`HousingError` subclass whose message names the file, column or config key
to change. Entry points print ``error: <message>`` and exit non-zero.
"""

from __future__ import annotations


class HousingError(Exception):
    """Base for errors a user can act on; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(HousingError):
    """A configuration value is missing, unknown or out of range."""

    exit_code = 2


class DataError(HousingError):
    """Input data is unreadable or violates its schema."""

    exit_code = 3


class ArtifactError(HousingError):
    """A pipeline artifact (model, metrics file) is missing or corrupt."""

    exit_code = 4


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises :class:`KeyboardInterrupt`: the command stops
    the same way (runs recorded as killed) and exits 143 (128 + SIGTERM)."""

    exit_code = 143


def first_line(
    value: object, limit: int | None = None, *, typed: bool = False, whole: bool = False
) -> str:
    """One line for ``value`` (an error): the first non-blank line of ``str(value)``, else
    the type's name; longer than ``limit`` characters, it is cut to ``limit`` ending in
    ``...``.

    ``typed``: prefixed ``Type: `` (just the type's name for an empty message).
    ``whole``: every line of the message joined by single spaces instead of only the first
    (a record kept for later, such as the events log, loses nothing but the line breaks).
    """
    text = str(value)
    lines = [" ".join(text.split())] if whole else [ln.strip() for ln in text.splitlines()]
    message = next((ln for ln in lines if ln), "")
    name = type(value).__name__
    text = (f"{name}: {message}" if typed else message) if message else name
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
