"""MLflow quirks (locked: mlflow 3.17.2)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: mlflow 3.17's REST client has no per-client or per-call timeout/retry knob: it reads
#: these variables (``mlflow.environment_variables``) at each call (defaults 120 s, 7
#: retries, exponential backoff), so a process's HTTP budget is set through them.
HTTP_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"
HTTP_MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
HTTP_BACKOFF_FACTOR = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
HTTP_BACKOFF_JITTER = "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"


def http_budget(timeout_sec: int, retries: int) -> dict[str, str]:
    """The variables that give mlflow's REST calls ``timeout_sec`` per request and
    ``retries`` retries, without backoff (see :data:`HTTP_TIMEOUT`)."""
    return {
        HTTP_TIMEOUT: str(timeout_sec),
        HTTP_MAX_RETRIES: str(retries),
        HTTP_BACKOFF_FACTOR: "0",
        HTTP_BACKOFF_JITTER: "0",
    }


#: mlflow 3.17 logs these on every run, with nothing to act on (no option stops them):
#: ``mlflow.sklearn`` warns about pickle when saving (housing pins versions and checks
#: the pickle's sha256), ``mlflow.utils.environment`` finds no pip in a uv venv.
EXPECTED_NOISE = (
    "Saving scikit-learn models in the pickle or cloudpickle format",
    "Failed to resolve installed pip version",
)
#: The loggers :data:`EXPECTED_NOISE` comes through (their records propagate to ``mlflow``).
NOISY_LOGGERS = ("mlflow", "mlflow.sklearn", "mlflow.utils.environment")
#: mlflow 3.17's SQL store logs its errors (a full disk too) with the traceback through
#: this module logger, on a handler of its own.
SQL_STORE_LOGGER = "mlflow.store.db.utils"

# Serialises the temporary change of mlflow's process-global tracking URI.
_GLOBAL_URI_LOCK = threading.Lock()


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's process-global (fluent) tracking URI at ``uri``; restore it after.

    mlflow 3.17: ``mlflow.sklearn.log_model`` and a local registry's
    ``create_model_version`` take no client or URI, only the global one. Its current
    value is the private ``mlflow.tracking._tracking_service.utils._tracking_uri``
    (``get_tracking_uri()`` falls back to a default, which must not be pinned). It is
    assigned directly: ``set_tracking_uri`` would also write ``MLFLOW_TRACKING_URI`` into
    ``os.environ``, which other threads may be reading (setenv is not thread-safe in
    glibc), and reset the tracing provider, which this project does not use.
    """
    from mlflow.tracking._tracking_service import utils

    tracking_utils: Any = utils  # mypy sees _tracking_uri typed as None
    with _GLOBAL_URI_LOCK:
        global_before = getattr(tracking_utils, "_tracking_uri", None)
        tracking_utils._tracking_uri = uri
        try:
            yield
        finally:
            tracking_utils._tracking_uri = global_before


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

    mlflow 3.17's ``log_model`` calls ``warn_dependency_requirement_mismatches`` twice
    over (no option to skip it): from ``mlflow.utils.environment`` while writing the
    requirements, and, with an input example, from ``mlflow.pyfunc`` (its own imported
    name) while loading the model back to validate the example; the first call in a
    process builds a map of every installed distribution (~1 s). The pins are the
    installed versions, so it cannot find anything. A module that no longer has the name
    is left alone (the check simply runs).
    """
    import importlib

    from mlflow.utils import environment

    pyfunc = importlib.import_module("mlflow.pyfunc")  # the module, not mlflow's lazy proxy
    name = "warn_dependency_requirement_mismatches"
    modules = [m for m in (environment, pyfunc) if getattr(m, name, None) is not None]
    originals = [getattr(m, name) for m in modules]
    for module in modules:
        setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            setattr(module, name, original)


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
