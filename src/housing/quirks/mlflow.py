"""MLflow quirks (locked: mlflow 3.17.2)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Serialises the temporary change of mlflow's process-global tracking URI.
_GLOBAL_URI_LOCK = threading.Lock()


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's process-global (fluent) tracking URI at ``uri``; restore it after.

    mlflow 3.17: ``mlflow.sklearn.log_model`` and a local registry's
    ``create_model_version`` take no client or URI, only the global one. Its current
    value is the private ``mlflow.tracking._tracking_service.utils._tracking_uri``
    (``get_tracking_uri()`` falls back to a default, which must not be pinned), and
    ``set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``, so
    the variable is put back as it was.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBAL_URI_LOCK:
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        global_before = getattr(tracking_utils, "_tracking_uri", None)
        set_uri: Any = mlflow.set_tracking_uri
        set_uri(uri)
        try:
            yield
        finally:
            set_uri(global_before)
            if env_before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env_before


def check_prompts_once(client: Any) -> None:
    """Make ``client`` check once per name that a registered model is no prompt.

    mlflow 3.17's ``MlflowClient`` calls the private ``_raise_if_prompt(name)`` (one
    ``get_registered_model`` request) before every alias and version-tag call: six
    extra requests per champion decision. If it is renamed, every call checks again.
    """
    check: Callable[[str], None] | None = getattr(client, "_raise_if_prompt", None)
    if check is None:
        return
    checked: set[str] = set()

    def once(name: str) -> None:
        if name not in checked:
            check(name)
            checked.add(name)

    setattr(client, "_raise_if_prompt", once)  # noqa: B010


@contextmanager
def no_requirement_scan() -> Iterator[None]:
    """Skip mlflow's check of a model's pip requirements against the environment.

    mlflow 3.17's ``log_model`` calls ``mlflow.utils.environment.
    warn_dependency_requirement_mismatches`` (~2 s per model, no option to skip it);
    the pins are the installed versions, so it cannot find anything. If it is renamed
    or moved, the check simply runs.
    """
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    original = getattr(environment, name, None)
    if original is None:
        yield
        return
    setattr(environment, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        setattr(environment, name, original)


def cache_schema_revision() -> str:
    """Work out mlflow's newest store schema revision once for this process.

    mlflow 3.17 loads its ~70 alembic scripts (~40 ms) each time a SQL store opens,
    in the private ``mlflow.store.db.utils._get_latest_schema_revision``; the answer
    depends only on the installed mlflow, so it is replaced by its cached value.
    """
    from mlflow.store.db import utils

    latest: Callable[[], str] = utils._get_latest_schema_revision
    head = latest()
    setattr(utils, "_get_latest_schema_revision", lambda: head)  # noqa: B010
    return head


def version_model_id(version: Any) -> str | None:
    """The id of the logged model behind a registry version, or None.

    mlflow 3.17: a version read back from a SQL (sqlite) registry has ``model_id``
    None even when it was created with one (that store has no column for it); its
    ``source``, ``models:/<model_id>``, still names the logged model.
    """
    model_id = getattr(version, "model_id", None)
    if model_id:
        return str(model_id)
    source = str(getattr(version, "source", "") or "")
    rest = source.removeprefix("models:/")
    if rest != source and rest.startswith("m-") and "/" not in rest:
        return rest
    return None
