"""ClearML tracker: one ClearML task per stage run, online or offline.

``ClearMLTracker`` implements :class:`housing.tracking.base.Tracker` and is also a context
manager for standalone use::

    settings = load_settings(overrides)
    settle_clearml(settings)  # housing.entry: the process's start-up, before its threads
    with ClearMLTracker(settings.clearml, run=StageRun("train", "train_ridge", run_id)) as tracker:
        tracker.connect_params({"alpha": 1.0}, "train_params")
        tracker.log_metrics({"val/rmse": 3.1})
        tracker.register_model(model_version)

Mode: ``clearml.mode: auto`` goes online only when both credential variables are set and
``<api_host>/debug.ping`` answers within ``connect_timeout_sec``; otherwise the task is
recorded offline under ``clearml.offline_dir`` and ``housing.tracking.offline.sync``
imports it later. ClearML keeps one current task per process, so a tracker must be
closed before the next one starts. The SDK is imported lazily.

clearml 2.1.12 reads its cache folder, config file, hosts and keys only from the
``CLEARML_*`` variables (no ``Task.init`` argument), and setenv while other threads run
is unsafe in glibc. So they are settled once, at the start-up of the process that opens
the tasks (:func:`sdk_env`, by :func:`housing.entry.settle_clearml`: a stage command, a
``housing repro`` worker, a test's fixture), and the tracker only checks them: a tracker
whose settings differ from what its process settled refuses to start, naming the
variable (a tracker error, so the stage goes on without ClearML).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from housing.config import ClearMLSettings
from housing.errors import ArtifactError, ConfigError, first_line
from housing.quirks.clearml import (
    MASTER_ID_VARIABLES,
    offline_output_models,
    quiet_console,
    unlock_offline_model,
)
from housing.tracking.base import (
    ChampionDecision,
    Figure,
    ModelVersion,
    RegisteredModel,
    StageRun,
    TrialRun,
)
from housing.tracking.lineage import utc_now
from housing.tracking.offline import (
    CHAMPION_TAG,
    CHAMPIONS_FILE,
    CLIENT_CONFIG_FILE,
    FAILED_TAG,
    METADATA_ARTIFACT_PREFIX,
    REGISTRY_FILE,
    ClearMLError,
    comment_json,
    list_sessions,
    locked_json,
    login,
    ping,
    read_json_file,
    read_models,
    user_config,
    write_client_config,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CHAMPION_TAG",
    "MODES",
    "ClearMLError",
    "ClearMLSettings",
    "ClearMLTracker",
    "load_sdk_config",
    "resolve_mode",
    "sdk_env",
    "server_env",
]

MODES: Final = ("auto", "online", "offline")
BACKEND: Final = "clearml"
_TASK_TYPES: Final = {
    "prepare": "data_processing",
    "train": "training",
    "select_best": "qc",
    "evaluate": "testing",
    "predict": "inference",
}
_NOT_SET: Final = " not set"
_logged_reasons: set[str] = set()
_active: list[ClearMLTracker] = []  # the tracker whose task is open in this process (0 or 1)


# --------------------------------------------------------------------------- settings


def server_env(settings: ClearMLSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """The ``CLEARML_*`` variables pointing the SDK at the configured server: the hosts
    (already the winners of command line > ``CLEARML_*_HOST`` > config file > conf/, see
    housing.config) and the keys (read from the variables named in ``clearml.auth``,
    unless the SDK's own are set in ``environ``); empty values are left out."""
    server, auth = settings.server, settings.auth
    env = {
        "CLEARML_API_HOST": server.api_host,
        "CLEARML_WEB_HOST": server.web_host,
        "CLEARML_FILES_HOST": server.files_host,
    }
    for name, source in (
        ("CLEARML_API_ACCESS_KEY", auth.access_key_env),
        ("CLEARML_API_SECRET_KEY", auth.secret_key_env),
    ):
        if not environ.get(name):
            env[name] = environ.get(source, "")
    return {name: value for name, value in env.items() if value}


def resolve_mode(
    settings: ClearMLSettings,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    problem: Callable[[], str | None] | None = None,
) -> tuple[str, str]:
    """The one ClearML online/offline decision: ``("online" | "offline", reason)``; ``auto``
    is offline when ``CLEARML_OFFLINE_MODE`` is set, online only when
    :func:`server_problem` (or ``problem``, a caller's own probe: ``housing doctor``)
    finds none, else offline with the reason logged once per process."""
    if settings.mode in ("online", "offline"):
        return settings.mode, f"clearml.mode={settings.mode}"
    if offline_env_set(os.environ if env is None else env):
        return "offline", "CLEARML_OFFLINE_MODE is set"  # as the SDK would (and doctor says)
    reason = server_problem(settings, env, timeout) if problem is None else problem()
    if reason is None:
        return "online", f"server {settings.server.api_host} answered"
    if problem is not None:  # the caller reports the reason itself
        return "offline", reason
    if reason.endswith(_NOT_SET):  # no credentials: the normal offline-first case
        _log_once(
            f"ClearML offline ({reason}); sessions go to {settings.offline_dir}", logging.DEBUG
        )
    else:  # credentials set: a server is meant to be used, say once it is not
        _log_once(offline_line(reason), logging.WARNING)
    return "offline", reason


#: The SDK's offline switch and its older alias (clearml 2.1.12 ``ENV_OFFLINE_MODE``).
OFFLINE_ENV: Final = ("CLEARML_OFFLINE_MODE", "TRAINS_OFFLINE_MODE")


def offline_env_set(env: Mapping[str, str]) -> bool:
    """Whether ``env`` turns the SDK offline, read as the SDK reads it (either name)."""
    truthy = ("1", "true", "yes", "on", "y", "t")
    return any(env.get(name, "").strip().lower() in truthy for name in OFFLINE_ENV)


def offline_line(reason: str) -> str:
    """The one warning line of a stage that records offline because the server failed."""
    return f"clearml: {reason}; recording offline, `housing clearml sync` later"


def server_problem(
    settings: ClearMLSettings, env: Mapping[str, str] | None = None, timeout: float | None = None
) -> str | None:
    """Why the server cannot be used: credential variables not set, or ``debug.ping`` or
    ``auth.login`` (the keys) not answering within ``timeout`` each (default
    ``connect_timeout_sec``); ``None`` when it can."""
    env = os.environ if env is None else env
    auth = settings.auth
    missing = [n for n in (auth.access_key_env, auth.secret_key_env) if not env.get(n)]
    if missing:
        return " and ".join(missing) + _NOT_SET
    timeout = settings.connect_timeout_sec if timeout is None else timeout
    host = settings.server.api_host
    keys = (env[auth.access_key_env], env[auth.secret_key_env])
    return ping(host, timeout) or login(host, *keys, timeout)


def _log_once(message: str, level: int) -> None:
    """Say once per process why ClearML is offline (``housing doctor`` says it too)."""
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logger.log(level, "%s", message)


def sdk_env(settings: ClearMLSettings, environ: Mapping[str, str]) -> dict[str, str | None]:
    """The variables a process settles at its start-up before it opens tasks with
    ``settings`` (None: unset); the client config is written when it is the generated one.

    ``CLEARML_CACHE_DIR`` is ``offline_dir``; ``CLEARML_CONFIG_FILE`` the user's own, else
    the client config generated in ``offline_dir``; the hosts and keys of
    :func:`server_env`; and a ``CLEARML_PROC_MASTER_ID`` inherited from another process is
    dropped: clearml 2.1.12 takes a process holding one with another pid for a
    sub-process of that task (``Task.init`` hands back a stub, registering a model fails).
    """
    env = _wanted_env(settings, environ)
    conf = Path(str(env["CLEARML_CONFIG_FILE"]))
    if conf == _generated_config(settings):
        write_client_config(conf, retries=2, server=settings.server)
    return env


def _generated_config(settings: ClearMLSettings) -> Path:
    return settings.offline_dir / CLIENT_CONFIG_FILE


def _wanted_env(settings: ClearMLSettings, environ: Mapping[str, str]) -> dict[str, str | None]:
    """:func:`sdk_env` without writing anything."""
    env: dict[str, str | None] = {
        "CLEARML_CACHE_DIR": str(settings.offline_dir),
        "CLEARML_CONFIG_FILE": user_config(environ) or str(_generated_config(settings)),
        **server_env(settings, environ),
    }
    for key in MASTER_ID_VARIABLES:
        pid = environ.get(key, "").partition(":")[0]
        if pid and pid != str(os.getpid()):
            env[key] = None
    return env


_SETTLE: Final = " (settled at a process's start-up: housing.entry.settle_clearml)"


def env_problem(
    settings: ClearMLSettings, environ: Mapping[str, str], *, online: bool
) -> str | None:
    """Why ``environ`` is not what :func:`sdk_env` settles for ``settings`` (the hosts
    and keys only matter ``online``); None when it is."""
    wanted = _wanted_env(settings, environ)
    for key, value in wanted.items():
        if not online and key.startswith(("CLEARML_API_", "CLEARML_WEB_", "CLEARML_FILES_")):
            continue
        actual = environ.get(key)
        if actual != value:
            if key.endswith("_KEY"):  # never shown
                return f"{key} is not the key clearml.auth names: settle it at start-up{_SETTLE}"
            shown = "unset" if actual is None else repr(actual)
            return f"{key} is {shown}, not {value or 'unset'!r} as the settings want{_SETTLE}"
    return None


_sdk_config_from: list[str] = []  # the CLEARML_CONFIG_FILE load_sdk_config() read (0 or 1)


def load_sdk_config() -> None:
    """Parse the SDK's config (HOCON, ~1 s) now, with the ``CLEARML_*`` variables as set.

    The ``housing repro`` fork server calls this so forked stages skip the parse; a
    tracker whose config file differs makes the SDK read its own instead.
    """
    from housing.quirks.clearml import load_config_now

    load_config_now()
    _sdk_config_from[:] = [os.environ.get("CLEARML_CONFIG_FILE", "")]


def _drop_stale_sdk_config() -> None:
    """Forget a config :func:`load_sdk_config` read from another ``CLEARML_CONFIG_FILE``."""
    if not _sdk_config_from or _sdk_config_from[0] == os.environ.get("CLEARML_CONFIG_FILE", ""):
        return
    from housing.quirks.clearml import forget_config

    forget_config()
    _sdk_config_from.clear()


#: The model metadata entry (online) holding the registration record as JSON.
LINEAGE_METADATA = "lineage"

# --------------------------------------------------------------------------- tracker


class ClearMLTracker:
    """One ClearML task for one stage run (see the module docstring)."""

    backend = BACKEND

    def __init__(
        self,
        settings: ClearMLSettings,
        run: StageRun | None = None,
        *,
        mode: str | None = None,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ConfigError(f"clearml.mode: expected one of {'|'.join(MODES)}, got {mode!r}")
        self.settings = settings
        self._run = run
        self._mode_override = None if mode == "auto" else mode
        self._mode: str | None = None
        self.mode_reason = ""
        self._task: Any = None
        self._models: dict[str, Any] = {}  # model id -> OutputModel
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- properties

    @property
    def mode(self) -> str | None:
        """``online`` / ``offline`` once started, else ``None``."""
        return self._mode

    @property
    def offline(self) -> bool:
        return self._mode == "offline"

    @property
    def task(self) -> Any:
        """The underlying ``clearml.Task`` (``None`` when not started)."""
        return self._task

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> ClearMLTracker:
        if self._run is None:
            raise ValueError("ClearMLTracker(..., run=StageRun(...)) is needed for `with`")
        self.start(self._run)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close("completed")
        else:
            self.close("failed", first_line(f"{type(exc).__name__}: {exc}"))

    def start(self, run: StageRun) -> None:
        """Open the task ``<task_prefix>:<run.name>`` (online or offline, see ``mode``)."""
        if self._task is not None:
            raise ClearMLError(f"ClearML task {self._task.name!r} is already open")
        if _active and _active[0] is not self:
            other = _active[0]._run.name if _active[0]._run else "?"
            raise ClearMLError(
                f"ClearML task for {other!r} is still open in this process; close it before "
                f"starting {run.name!r} (ClearML keeps one current task per process)"
            )
        self._run = run
        mode = self._mode_override or self.settings.mode
        if mode == "auto":
            mode, reason = resolve_mode(self.settings)
        else:
            reason = f"forced mode={mode}" if self._mode_override else f"clearml.mode={mode}"
            problem = server_problem(self.settings) if mode == "online" else None
            if problem is not None:
                mode, reason = "offline", problem
                logger.warning("%s", offline_line(f"online requested but {problem}"))
        started = time.perf_counter()
        try:
            self._task = self._open(run, mode)
        except Exception as exc:
            if mode != "online":
                raise ClearMLError(f"ClearML could not open an offline task: {exc}") from exc
            logger.warning("%s", offline_line(f"online task failed ({first_line(exc)})"))
            mode, reason = "offline", f"online init failed: {first_line(exc)}"
            try:
                self._task = self._open(run, mode)
            except Exception as exc2:
                raise ClearMLError(f"ClearML could not open a task: {exc2}") from exc2
        self._mode, self.mode_reason = mode, reason
        _active[:] = [self]
        owner = run.context.tags if run.context else {}
        _quietly(
            self._task.set_user_properties,
            pipeline_run_id=run.pipeline_run_id,
            stage=run.stage,
            tracking_mode=mode,
            **{k.removeprefix("housing."): v for k, v in owner.items()},
        )
        self.timings["start"] = time.perf_counter() - started

    def close(self, status: str, error: str | None = None) -> None:
        """Close the task: ``completed``, or ``failed``/``killed`` (recorded with ``error``)."""
        if status not in ("completed", "failed", "killed"):
            raise ValueError(f"close status must be completed, failed or killed, got {status!r}")
        status = "failed" if status == "killed" else status
        task = self._task
        if task is None:
            return
        started = time.perf_counter()
        reason = first_line(error or "failed")
        try:
            if status == "failed":
                _quietly(task.add_tags, [FAILED_TAG])
                _quietly(task.set_user_properties, status="failed", error=reason)
                _quietly(
                    task.get_logger().report_text, f"stage failed: {reason}", print_console=False
                )
                _quietly(task.mark_failed, status_reason=reason, status_message=reason)
            else:
                _quietly(task.set_user_properties, status="completed")
            with quiet_console():
                task.close()
            if status == "failed" and not self.offline:
                # Task.close() marks a task completed; make the failure the final state.
                _quietly(task.mark_failed, status_reason=reason, force=True)
        finally:
            self._task = None
            self._models.clear()
            if _active and _active[0] is self:
                _active.clear()
            self.timings["close"] = time.perf_counter() - started

    def _open(self, run: StageRun, mode: str) -> Any:
        """Check the environment, then ``Task.init``."""
        from clearml import Task

        self._prepare_sdk(mode)
        current: Any = Task.current_task()
        if current is not None:
            raise ClearMLError(
                f"another ClearML task ({current.name!r}) is open in this process; close it"
            )
        with quiet_console(verbose=logger.isEnabledFor(logging.DEBUG)):
            return Task.init(
                project_name=self.settings.project_name,
                task_name=f"{self.settings.task_prefix}:{run.name}",
                task_type=getattr(Task.TaskTypes, _TASK_TYPES.get(run.stage, "training")),
                tags=_unique([*self.settings.tags, *run.tags, run.stage]),
                reuse_last_task_id=False,
                # Online, None means "the server's file server" (True); offline: the session.
                output_uri=(self.settings.output_uri or True) if mode == "online" else None,
                auto_connect_arg_parser=False,
                auto_connect_frameworks=False,
                auto_resource_monitoring=False,
            )

    def _prepare_sdk(self, mode: str) -> None:
        """Check the settled environment is this tracker's, then switch the SDK's mode."""
        from clearml import Task

        problem = env_problem(self.settings, os.environ, online=mode == "online")
        if problem is not None:
            raise ClearMLError(problem)
        _drop_stale_sdk_config()
        if user_config(os.environ):
            _warn_slowuser_config()
        # Only switched when needed: switching back online makes every existing session
        # log in to the server (retries, maybe minutes with no server).
        if bool(Task.is_offline()) != (mode == "offline"):
            Task.set_offline(mode == "offline")

    def _require(self) -> Any:
        if self._task is None:
            raise ClearMLError("ClearML tracker is not started (call start() or use `with`)")
        return self._task

    # ---------------------------------------------------------------- logging

    def log_params(self, params: Mapping[str, Any], section: str) -> None:
        """``task.connect(params, name=section)``: Configuration > Hyperparameters > section."""
        self.connect_params(params, section)

    def connect_params(self, params: Mapping[str, Any], name: str = "General") -> dict[str, Any]:
        """Connect params under ``name``; returns them (an agent may override them remotely)."""
        connected = self._require().connect(_plain(params), name=name)
        return dict(connected) if isinstance(connected, Mapping) else dict(params)

    def log_config(self, config: Mapping[str, Any], name: str) -> None:
        """``task.connect_configuration`` with the (already redacted) config as one document."""
        self._require().connect_configuration(_plain(config), name=name)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalars (title = part before ``/``, series = the rest) plus summary single values."""
        reporter = self._require().get_logger()
        for name, raw in metrics.items():
            if not _finite(raw):
                logger.debug("ClearML: metric %s=%r is not a finite number; skipped", name, raw)
                continue
            value = float(raw)
            title, _, series = str(name).partition("/")
            reporter.report_scalar(
                title=title, series=series or title, value=value, iteration=step or 0
            )
            reporter.report_single_value(name=str(name), value=value)

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """Attach a file (or folder) as artifact ``name`` (default: the file name)."""
        path = Path(path)
        if not path.exists():
            raise ArtifactError(f"{path}: artifact file not found")
        self._require().upload_artifact(name or path.name, artifact_object=path)

    def upload_artifact(self, path_or_obj: Any, name: str) -> None:
        """Attach a file (``Path``/``str``) or an object (dict -> JSON, DataFrame -> CSV)."""
        if isinstance(path_or_obj, str | Path):
            self.log_artifact(Path(path_or_obj), name)
        else:
            self._require().upload_artifact(name, artifact_object=path_or_obj)

    def log_figure(self, figure: Figure) -> None:
        """Scatter (optional y = x diagonal) via ``report_scatter2d``; bar via plotly."""
        reporter = self._require().get_logger()
        if figure.kind == "scatter":
            points = [[float(x), float(y)] for x, y in zip(figure.x, figure.y, strict=True)]
            series = [(figure.name, points, "markers")]
            if figure.diagonal and points:
                low, high = min(min(p) for p in points), max(max(p) for p in points)
                series.append(("y = x", [[low, low], [high, high]], "lines"))
            for name, scatter, mode in series:
                reporter.report_scatter2d(
                    title=figure.title,
                    series=name,
                    scatter=scatter,
                    iteration=0,
                    xaxis=figure.x_label or None,
                    yaxis=figure.y_label or None,
                    mode=mode,
                )
        elif figure.kind == "bar":
            plot = {
                "data": [
                    {
                        "type": "bar",
                        "x": [str(x) for x in figure.x],
                        "y": [float(y) for y in figure.y],
                    }
                ],
                "layout": {
                    "title": figure.title,
                    "xaxis": {"title": figure.x_label},
                    "yaxis": {"title": figure.y_label},
                },
            }
            reporter.report_plotly(title=figure.title, series=figure.name, figure=plot, iteration=0)
        else:
            raise ValueError(f"figure {figure.name!r}: unknown kind {figure.kind!r} (scatter|bar)")

    def log_text(self, text: str) -> None:
        """A line in the task's console log."""
        self._require().get_logger().report_text(str(text), print_console=False)

    def log_trials(self, study: str, trials: Sequence[TrialRun], best: int) -> None:
        """The trials as one table (``report_table``: number, state, params, metrics), each
        metric as a scalar per trial (iteration = trial number), the best as a single value."""
        import pandas as pd

        reporter = self._require().get_logger()
        rows = [
            {"trial": t.number, "state": t.state, **dict(t.metrics), **_plain(dict(t.params))}
            for t in trials
        ]
        table = pd.DataFrame(rows).set_index("trial")
        # A metric a trial lacks is blank, not NaN: clearml 2.1.12's report_table fills NaN
        # with the string "nan", which pandas 3 warns about on the console for floats.
        table = table.astype(object).where(table.notna(), "")
        reporter.report_table(title="tune trials", series=study, iteration=0, table_plot=table)
        for trial in trials:
            for name, raw in trial.metrics.items():
                if _finite(raw):
                    reporter.report_scalar(
                        title="tune", series=name, value=float(raw), iteration=trial.number
                    )
        reporter.report_single_value(name="tune/best_trial", value=float(best))

    # ---------------------------------------------------------------- registry

    def register_model(self, model: ModelVersion) -> RegisteredModel:
        """A new model (= new version) named ``model.registry_name`` with its lineage.

        Version: one more than the models of that name (offline: in the local sessions and
        ``registry.json``). Metadata goes where an offline import keeps it: tags, the
        comment (compact JSON), a task artifact and user properties.
        """
        task = self._require()
        path = Path(model.path)
        if not path.is_file():
            raise ArtifactError(
                f"{path}: model file not found; cannot register {model.registry_name}"
            )
        started = time.perf_counter()
        if self.offline:
            with locked_json(self.settings.offline_dir / REGISTRY_FILE, dict) as registry:
                version = self._offline_version(model.registry_name, registry)
                registered = self._register(task, model, path, version)
                entry = registry.setdefault(
                    model.registry_name, {"last_version": 0, "versions": []}
                )
                entry["last_version"] = version
                entry["versions"].append(
                    {
                        "version": str(version),
                        "model_id": registered.model_id,
                        "task_id": str(task.id),
                        "sha256": model.metadata.get("model_sha256", ""),
                        "created_at": utc_now(),
                    }
                )
        else:
            registered = self._register(
                task, model, path, self._online_version(model.registry_name)
            )
        self.timings["register"] = time.perf_counter() - started
        return registered

    def _offline_version(self, name: str, registry: Mapping[str, Any]) -> int:
        ids: set[str] = set()
        for session in list_sessions(self.settings.offline_dir, others_running=True):
            ids.update(m.model_id for m in read_models(session) if m.name == name)
        ids.update(mid for mid, om in self._models.items() if om.name == name)
        last = int((registry.get(name) or {}).get("last_version") or 0)
        return max(len(ids), last) + 1

    def _online_version(self, name: str) -> int:
        from clearml import Model

        # The SDK matches model_name exactly (a ^name$ regex).
        found = Model.query_models(
            project_name=self.settings.project_name, model_name=name, include_archived=True
        )
        return len(found) + 1

    def _register(
        self, task: Any, model: ModelVersion, path: Path, version: int
    ) -> RegisteredModel:
        from clearml import OutputModel

        run = self._run
        meta = {str(k): str(v) for k, v in model.metadata.items()}
        tags = _unique(
            [
                *self.settings.tags,
                *model.tags,
                f"algorithm:{model.algorithm}" if model.algorithm else "",
                f"version:{version}",
                _tag("data", meta.get("data_md5")),
                _tag("git", meta.get("git_commit"), 12),
            ]
        )  # what a person filters by; the full record is the comment and `lineage`
        record = {
            "registry_name": model.registry_name,
            "version": str(version),
            "algorithm": model.algorithm,
            "metrics": {k: float(v) for k, v in model.metrics.items() if _finite(v)},
            "params": _plain(model.params),
            "metadata": meta,
            "task_id": str(task.id),
            "pipeline_run_id": run.pipeline_run_id if run else "",
            "stage": run.stage if run else "",
        }
        comment = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
        out = OutputModel(
            task=task, name=model.registry_name, framework="ScikitLearn", tags=tags, comment=comment
        )
        target_name = f"{_safe_name(model.registry_name)}-v{version}{path.suffix}"
        with _staged(path, target_name, self.offline) as weights:
            if self.offline:
                unlock_offline_model(out)
            out.update_weights(
                weights_filename=str(weights),
                target_filename=target_name,
                auto_delete_file=False,
            )
        model_id = str(out.id)
        self._models[model_id] = out
        if not self.offline:  # the full record as one metadata entry
            _quietly(out.set_metadata, LINEAGE_METADATA, comment)
        artifact = f"{METADATA_ARTIFACT_PREFIX}{model.registry_name}_v{version}"
        task.upload_artifact(artifact, artifact_object={**record, "model_id": model_id})
        _quietly(
            task.set_user_properties,
            **{
                f"{model.registry_name}.version": str(version),
                f"{model.registry_name}.model_id": model_id,
                f"{model.registry_name}.sha256": meta.get("model_sha256", ""),
            },
        )
        return RegisteredModel(
            backend=BACKEND,
            registry_name=model.registry_name,
            version=str(version),
            model_id=model_id,
            extra={
                "task_id": str(task.id),
                "project": self.settings.project_name,
                "mode": self._mode,
                "tags": tags,
                "metadata_artifact": artifact,
            },
        )

    def champion(self, registry_name: str, metric: str) -> tuple[str, float] | None:
        """Online: the newest model tagged ``champion``; offline: ``champions.json``."""
        if self._mode == "online":
            return self._online_champion(registry_name, metric)
        ledger = read_json_file(self.settings.offline_dir / CHAMPIONS_FILE, {})
        entry = ledger.get(registry_name) if isinstance(ledger, dict) else None
        if not isinstance(entry, dict) or entry.get("version") is None:
            return None
        if entry.get("metric") != metric:
            logger.warning(
                "ClearML champion of %s was chosen on %s, not %s; ignoring it",
                registry_name,
                entry.get("metric"),
                metric,
            )
            return None
        return str(entry["version"]), float(entry["value"])

    def _online_champion(self, registry_name: str, metric: str) -> tuple[str, float] | None:
        from clearml import Model

        found = Model.query_models(
            project_name=self.settings.project_name, model_name=registry_name, tags=[CHAMPION_TAG]
        )
        for candidate in found:
            version = next(
                (t.split(":", 1)[1] for t in candidate.tags if t.startswith("version:")), None
            )
            value: Any = None
            with contextlib.suppress(Exception):
                if candidate.get_metadata("champion_metric") == metric:
                    value = candidate.get_metadata("champion_value")
            if value is None:  # fall back to the metrics recorded at registration
                value = (comment_json(candidate.comment or "").get("metrics") or {}).get(metric)
            if version is not None and value is not None:
                return str(version), float(value)
        return None

    def promote(self, decision: ChampionDecision, registered: RegisteredModel) -> None:
        """Record the decision (tags, log line, ledger); move the ``champion`` tag if promoted."""
        task = self._require()
        verdict = "promoted" if decision.promoted else "rejected"
        line = (
            f"champion decision: {decision.registry_name} v{decision.challenger_version} "
            f"{decision.metric}={decision.challenger_value:.6g} vs "
            + (
                f"v{decision.champion_version} {decision.champion_value:.6g}"
                if decision.champion_version is not None and decision.champion_value is not None
                else "no champion"
            )
            + f": {verdict} ({decision.reason})"
        )
        if decision.promoted:
            self._tag_champion(registered, decision)
        task.add_tags([f"champion:{verdict}"])
        task.get_logger().report_text(line, print_console=False)
        _quietly(
            task.set_user_properties, **{f"{decision.registry_name}.champion_decision": verdict}
        )
        history_item = {
            **asdict(decision),
            "model_id": registered.model_id,
            "task_id": str(task.id),
            "mode": self._mode,
        }
        with locked_json(self.settings.offline_dir / CHAMPIONS_FILE, dict) as ledger:
            entry = ledger.setdefault(
                decision.registry_name,
                {"version": None, "value": None, "metric": decision.metric, "history": []},
            )
            entry.setdefault("history", []).append(history_item)
            if decision.promoted:
                entry.update(
                    version=decision.challenger_version,
                    value=decision.challenger_value,
                    metric=decision.metric,
                    model_id=registered.model_id,
                    task_id=str(task.id),
                    decided_at=decision.decided_at,
                )
        logger.info("%s", line)

    def _tag_champion(self, registered: RegisteredModel, decision: ChampionDecision) -> None:
        out = self._models.get(registered.model_id)
        if self.offline:
            # The offline registration is already recorded in task.json; add the tag to
            # that record so the import creates the model with it.
            for entry in offline_output_models(self._task):
                if entry.get("id") == registered.model_id:
                    tags = entry.setdefault("init", {}).setdefault("tags", [])
                    if CHAMPION_TAG not in tags:
                        tags.append(CHAMPION_TAG)
            return
        from clearml import Model

        try:
            for previous in Model.query_models(
                project_name=self.settings.project_name,
                model_name=registered.registry_name,
                tags=[CHAMPION_TAG],
            ):
                if previous.id != registered.model_id and CHAMPION_TAG in previous.tags:
                    previous.tags = [t for t in previous.tags if t != CHAMPION_TAG]
            target = out if out is not None else Model(model_id=registered.model_id)
            target.tags = _unique([*target.tags, CHAMPION_TAG])
            target.set_metadata("champion_metric", decision.metric)
            target.set_metadata("champion_value", repr(float(decision.challenger_value)))
            target.publish()
        except Exception as exc:
            logger.warning("ClearML: could not move the champion tag: %s", first_line(exc))


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _staged(path: Path, name: str, copy: bool) -> Iterator[Path]:
    """Offline: a copy named ``name`` (the SDK copies weights by file name into the session)."""
    if not copy:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="housing-clearml-") as tmp:
        staged = Path(tmp) / name
        shutil.copyfile(path, staged)
        yield staged


def _plain(value: Any) -> Any:
    """JSON-friendly copy: mappings -> dict, sequences -> list, Paths/objects -> str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        with contextlib.suppress(Exception):
            return _plain(value.item())
    return str(value)


def _warn_slowuser_config() -> None:
    """A user CLEARML_CONFIG_FILE without the fast-close settings makes close() slow."""
    try:
        from clearml.config import config

        slow = bool(config.get("development.report_use_subprocess", True)) or bool(
            config.get("development.vcs_repo_detect_async", False)
        )
    except Exception:  # an unreadable config is the SDK's to report
        return
    if slow:
        _log_once(
            "CLEARML_CONFIG_FILE lacks sdk.development.report_use_subprocess: false / "
            "vcs_repo_detect_async: false: Task.close() may take 10 s (or hang up to 300 s)",
            logging.WARNING,
        )


def _quietly(func: Any, *args: Any, **kwargs: Any) -> None:
    """Call ``func``; a tracking hiccup is logged, never raised."""
    try:
        func(*args, **kwargs)
    except Exception as exc:
        logger.debug("ClearML: %s failed: %s", getattr(func, "__name__", func), first_line(exc))


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _tag(prefix: str, value: str | None, length: int | None = None) -> str:
    return f"{prefix}:{value[:length] if length else value}" if value else ""


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"
