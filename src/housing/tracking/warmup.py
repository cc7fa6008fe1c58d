"""First-use work done once in a fork server (``housing repro``'s, or the stage server of
plain ``dvc repro``), not in every stage.

:func:`warm` runs when the engine's fork server imports :mod:`housing.tracking.preload`
(after the libraries); importing this module does nothing. It spares each forked stage:
ClearML's config parse (~1 s; read with the ``CLEARML_*`` variables the engine passes as
JSON in :data:`ENV_VARIABLE`, set only while reading, by the entry layer: this is
the fork server's start-up), the MLflow tracker's first
figure, pinned requirements and schema revision lookup, and :mod:`inspect`'s module index
(ClearML's loggers call ``inspect.stack()``). Last, :func:`gc.freeze` keeps the
libraries' objects out of each stage's first full collection (0.3-0.6 s, and pages the
fork would copy). Nothing here opens a database, a file for writing or a network
connection.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Mapping
from typing import Final

log = logging.getLogger(__name__)

#: The variable that carries the ClearML environment (JSON) from the engine.
ENV_VARIABLE: Final = "HOUSING_WARMUP_CLEARML_ENV"

#: The ClearML variables the config parse reads (never the keys: not in a JSON variable).
WARM_VARIABLES: Final = ("CLEARML_CACHE_DIR", "CLEARML_CONFIG_FILE")


def warm_clearml(env: Mapping[str, str]) -> None:
    """Read ClearML's config as a tracker with ``env`` (``CLEARML_*``) would."""
    from housing.entry import start_up_environment
    from housing.tracking.clearml import load_sdk_config

    with start_up_environment(env):
        load_sdk_config()


def warm_matplotlib() -> None:
    """Render a small figure as the MLflow tracker does, and its pinned requirements."""
    from housing.tracking.base import Figure
    from housing.tracking.mlflow import _pinned_requirements, render_svg

    render_svg(Figure(name="w", title="warm-up", kind="scatter", x=[0.0, 1.0], y=[1.0, 0.0]))
    _pinned_requirements()


def warm_mlflow_schema() -> None:
    """Work out MLflow's newest store schema revision once (every SQL store loads ~70
    alembic scripts for it, ~40 ms; it depends only on the installed MLflow)."""
    from housing.quirks.mlflow import cache_schema_revision

    cache_schema_revision()


def warm_inspect() -> None:
    """Let :mod:`inspect` index the loaded modules' files now (once per process)."""
    from housing.quirks.inspect import index_module_files

    index_module_files()


def warm() -> None:
    """Everything above, then :func:`gc.freeze`; a step that fails is skipped (the
    stage does that work itself)."""
    from housing.entry import take_variable

    raw = take_variable(ENV_VARIABLE)
    steps = [warm_matplotlib, warm_mlflow_schema, warm_inspect]
    if raw:
        steps.insert(0, lambda: warm_clearml(json.loads(raw)))
    for step in steps:
        try:
            step()
        except Exception as exc:
            log.debug("warm-up step failed: %s: %s", type(exc).__name__, exc)
    gc.freeze()
