"""ClearML SDK quirks (locked: clearml 2.1.12)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import Any

#: The SDK's logger for repository detection (``clearml.debugging.log.get_logger``).
REPOSITORY_LOGGER = "clearml.Repository Detection"

#: The SDK's internal API service modules a stage's tasks use. clearml 2.1.12 imports
#: ``clearml.backend_api.services.v2_9.*`` (``Session.api_version`` "2.9", the version it
#: speaks offline and before a login) lazily, on a task's first request; they have no
#: public name, so the ``housing repro`` fork server imports these ahead by path.
SERVICE_MODULES = tuple(
    f"clearml.backend_api.services.v2_9.{name}"
    for name in ("tasks", "models", "events", "projects")
)


def load_config_now() -> None:
    """Parse the SDK's configuration (HOCON, ~1 s) now, from the ``CLEARML_*`` variables
    as they are.

    clearml 2.1.12 parses it lazily on first use, with no public call to do it ahead:
    the private class methods ``ConfigWrapper._init`` and ``ConfigSDKWrapper._init``
    are what first use calls. A warm process calls this so forked stages skip it.
    """
    from clearml.config import ConfigSDKWrapper, ConfigWrapper

    ConfigWrapper._init()
    ConfigSDKWrapper._init()


def forget_config() -> None:
    """Drop a configuration :func:`load_config_now` parsed, so the next use re-reads it.

    clearml 2.1.12 keeps the parsed config in the private class attribute
    ``ConfigWrapper._config`` (None: not loaded) and has no public reset for it.
    """
    from clearml.config import ConfigSDKWrapper, ConfigWrapper

    ConfigWrapper._config = None
    ConfigSDKWrapper.clear_config_impl()


def unlock_offline_model(output_model: Any) -> None:
    """Let ``output_model.update_weights`` run on an offline task.

    SDK bug (clearml 1.15 to 2.1.12): the placeholder that the private
    ``OutputModel._get_base_model()`` returns offline has no ``locked`` attribute, so
    ``update_weights`` raises AttributeError before it copies the weights.
    """
    base: Any = output_model._get_base_model()
    if not hasattr(base, "locked"):
        base.locked = False


def offline_output_models(task: Any) -> list[dict[str, Any]]:
    """The models registered so far in an offline ``task``'s session (mutable records).

    clearml 2.1.12 has no public access to them: the private list
    ``Task._offline_output_models`` is what it writes to the session's ``task.json``
    (``offline_output_models``) when the task closes, so a tag added to a record here
    reaches the model that ``Task.import_offline_session`` creates.
    """
    models: list[dict[str, Any]] = getattr(task, "_offline_output_models", [])
    return models


def quiet_console(verbose: bool = False) -> contextlib.AbstractContextManager[Any]:
    """Around ``Task.init`` and ``Task.close``: keep the SDK's console chatter off the
    console unless ``verbose``.

    clearml 2.1.12 prints its "ClearML Task: created new task id=..." / results-page
    banners and, offline, "ClearML Task: Offline session stored in <zip>" to stdout
    (no option to stop it), and warns through the ``clearml.Repository Detection``
    logger when the code is not in a git repository.
    """
    if verbose:
        return contextlib.nullcontext()
    logging.getLogger(REPOSITORY_LOGGER).setLevel(logging.ERROR)
    return contextlib.redirect_stdout(io.StringIO())


#: "<pid>:<task id>", set by the SDK in the process that opens a task (and "<pid>:" once
#: it is closed); a process inheriting another pid's value is taken for its sub-process.
MASTER_ID_VARIABLES = ("CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID")


@contextlib.contextmanager
def default_session(session: Any) -> Iterator[None]:
    """Make ``session`` the SDK's default session for the block, then restore it.

    clearml 2.1.12: ``Task.query_tasks``, ``Task.get_project_id`` and
    ``Model.query_models`` take no session; they use the process-wide
    ``InterfaceBase._default_session``, made once from the ``CLEARML_*`` variables and
    never re-read. ``_set_default_session`` ("for debug and testing") is how a configured
    host and keys reach them without writing ``os.environ``.
    """
    from clearml.backend_interface.base import InterfaceBase

    before = InterfaceBase._default_session
    InterfaceBase._set_default_session(session)
    try:
        yield
    finally:
        InterfaceBase._default_session = before


def model_created(model: Any) -> Any:
    """A ``clearml.Model``'s creation time: clearml 2.1.12 has no public property for it,
    so it is read from the private data object (``_get_model_data().created``)."""
    return getattr(model._get_model_data(), "created", None)
