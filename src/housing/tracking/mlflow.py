"""MLflow backend of the :class:`~housing.tracking.base.Tracker` protocol.

Layout in MLflow: one experiment (``mlflow.experiment``); per pipeline run one parent
run (tag ``housing.pipeline_run_id``, name ``pipeline-<id>``); per stage one child run
nested under it (``mlflow.parentRunId``). Models are logged into the stage run with
``mlflow.sklearn.log_model`` (cloudpickle) and registered as a new version of the
registered model; the champion is a registered-model alias.

All work goes through an explicit ``MlflowClient`` (``mlflow`` imported lazily), except
in ``register_model``: ``log_model`` (and a local registry's ``create_model_version``)
only use the process-global tracking URI, set for those calls under a lock.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import unquote, urlparse

from housing.errors import ArtifactError, ConfigError, first_line
from housing.io import file_lock, file_sha256, read_json, write_json
from housing.quirks.mlflow import (
    check_prompts_once,
    fluent_tracking_uri,
    no_requirement_scan,
    version_model_id,
)
from housing.tracking.base import (
    ChampionDecision,
    Figure,
    ModelVersion,
    RegisteredModel,
    StageRun,
    TrialRun,
)
from housing.tracking.mlflow_store import create_store

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion as MlflowModelVersion
    from mlflow.models.model import ModelInfo

__all__ = [
    "MLflowTracker",
    "load_registered_model",
    "local_store_path",
    "probe",
    "registered_version",
    "resolve_uri",
    "run_config",
    "unreachable",
    "version_record",
]

log = logging.getLogger(__name__)

#: Param values longer than this are cut (MLflow 3 accepts 6000; older releases 500).
PARAM_VALUE_MAX = 500
#: Model-version / run tag values longer than this are cut.
TAG_VALUE_MAX = 5000
#: The ``error`` tag of a failed stage run is one line of at most this many characters.
ERROR_TAG_MAX = 500
TRUNCATION_MARKER = "...[truncated]"

TAG_PIPELINE_RUN_ID = "housing.pipeline_run_id"
TAG_RUN_TYPE = "housing.run_type"  # pipeline | stage | pipeline_duplicate
TAG_STAGE = "housing.stage"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_PICKLE_SHA = "mlflow_pickle_sha256"
TAG_PID = "housing.pid"  # the process that runs a stage run
# `housing tune`: the study (tune run and trial runs), a trial's number and Optuna state,
# the best trial's number and run id (on the tune run)
TAG_STUDY = "housing.tune.study"
TAG_TRIAL = "housing.tune.trial"
TAG_TRIAL_STATE = "housing.tune.state"
TAG_BEST_TRIAL = "housing.tune.best_trial"
TAG_BEST_RUN = "housing.tune.best_run_id"
#: Optuna trial state -> MLflow run status of its child run.
_TRIAL_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
#: A registry version's own tags: what a person filters versions by in the registry UI
#: (plus ``champion``: promoted|rejected, once decided). The full record (lineage,
#: metrics, params, pickle hash, the decision's details) is on the version's logged
#: model as tags (:func:`version_record`) and in the run's ``lineage.json``.
VERSION_TAGS = ("algorithm", "data_md5", "git_commit")
TAG_CHAMPION = "champion"
LINEAGE_ARTIFACT = "lineage.json"

_PARAMS_PER_BATCH = 100
_KNOWN_PARENTS = 50  # pipeline runs whose parent id is remembered beside a local store
_METRICS_PER_BATCH = 1000
_STAGE_LOG_ARTIFACT = "logs/stage.log"
_INVALID_KEY_CHARS = re.compile(r"[^\w./\- :]")
_INVALID_FILE_CHARS = re.compile(r"[^\w.\-]")
_STATUS = {"completed": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
_PINNED_DISTRIBUTIONS = ("scikit-learn", "numpy", "pandas", "joblib")

_T = TypeVar("_T")


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _one_line(text: str, limit: int) -> str:
    return _truncate(" ".join(text.split()), limit)


def _key(name: str) -> str:
    """An MLflow-valid param/tag/metric key (identity for names that are valid already)."""
    key = _INVALID_KEY_CHARS.sub("_", name.strip())
    if key in ("", ".") or posixpath.normpath(key) != key or key.startswith(("/", "..")):
        key = key.replace("/", "_").replace("..", "__") or "_"
    return key[:250]


def _file_name(name: str) -> str:
    return _INVALID_FILE_CHARS.sub("_", name) or "_"


def _flatten(params: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """``{"a": {"b": 1}}`` under ``prefix`` -> ``{"prefix.a.b": "1"}`` (values stringified)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name))
        elif isinstance(value, Mapping | list | tuple):
            flat[name] = json.dumps(_plain(value), sort_keys=True, default=str)
        else:
            flat[name] = str(value)
    return flat


def _cut(values: Mapping[str, Any], limit: int, prefix: str = "") -> dict[str, str]:
    """Valid keys (``prefix`` + name) with values stringified and cut at ``limit``."""
    return {_key(prefix + k): _truncate(str(v), limit) for k, v in values.items()}


def _plain(value: Any) -> Any:
    """A JSON/YAML-safe copy: mappings, lists, str, int, float, bool, None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if hasattr(value, "tolist"):  # numpy scalar or array
        try:
            return _plain(value.tolist())
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def resolve_uri(uri: str, root: Path) -> str:
    """The one MLflow URI resolver: local store URIs (``sqlite:///``, ``file:``, a plain
    path) made absolute against ``root``; remote URIs pass through."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if path.startswith("/") or path.startswith(":memory:") or not path:
            return uri
        return f"sqlite:///{(root / path).resolve()}"
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        host = "" if parsed.netloc in ("", "localhost") else parsed.netloc
        local = Path(unquote(host + parsed.path))
    elif "://" not in uri and not uri.startswith(("databricks", "mlflow-artifacts:")):
        local = Path(uri)
    else:
        return uri
    return (local if local.is_absolute() else (root / local).resolve()).as_uri()


#: Tracking URI prefixes of an MLflow server (anything else is a local store).
SERVER_URI_PREFIXES: Final = ("http://", "https://", "databricks")


def is_server_uri(uri: str) -> bool:
    """Whether ``uri`` names an MLflow tracking server (``http(s)://``, ``databricks``,
    ``databricks://profile``) rather than a local store: the one answer for the spool and
    ``housing compare``."""
    return uri.startswith(SERVER_URI_PREFIXES)


def local_store_path(uri: str, root: Path) -> Path | None:
    """The database file (``sqlite:///``, query dropped) or folder (``file:``, a plain
    path) of a local store URI, absolute against ``root``; None for a server or
    ``:memory:``."""
    resolved = resolve_uri(uri, root)
    if resolved.startswith("sqlite:///"):
        path = resolved[len("sqlite:///") :].split("?", 1)[0]
        return Path(path) if path.startswith("/") else None
    if resolved.startswith("file:"):
        return Path(unquote(urlparse(resolved).path))
    return None


def _sqlite_path(uri: str) -> Path | None:
    return local_store_path(uri, Path("/")) if uri.startswith("sqlite:///") else None


@functools.cache
def _pinned_requirements() -> tuple[str, ...]:
    reqs = []
    for dist in _PINNED_DISTRIBUTIONS:
        try:
            reqs.append(f"{dist}=={importlib_metadata.version(dist)}")
        except importlib_metadata.PackageNotFoundError:
            reqs.append(dist)
    return tuple(reqs)


def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


_UNREACHABLE = (
    ("connection refused", "connection refused"),
    ("timed out", "timed out"),
    ("timeout", "timed out"),
    ("max retries exceeded", "no answer"),
    ("remotedisconnected", "connection closed"),
    ("connection aborted", "connection closed"),
    ("connection reset", "connection closed"),
    ("name or service not known", "unknown host"),
    ("failed to resolve", "unknown host"),
    ("too many 5", "server error"),
    ("response code 50", "server error"),
    ("error code 50", "server error"),
)


def unreachable(exc: BaseException) -> str | None:
    """Why a tracking server could not be used (``connection refused``, ``timed out``...),
    or None when ``exc`` is no transport failure (a refused request, a bug).

    MLflow wraps ``requests`` errors in ``MlflowException`` messages (sometimes without
    the cause), so the exception chain's types and texts are both read.
    """
    import requests

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, requests.Timeout | TimeoutError):
            return "timed out"
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        text = str(seen).lower()
        for needle, reason in _UNREACHABLE:
            if needle in text:
                return reason
        if isinstance(seen, requests.ConnectionError | ConnectionError):
            return "connection failed"
        seen = seen.__cause__ or seen.__context__
    return None


def probe(uri: str, timeout_sec: float) -> str | None:
    """None when ``uri`` (http/https) answers ``GET /health`` within ``timeout_sec``
    (any HTTP status below 500 but 404 counts: an MLflow server always has the
    endpoint, an auth proxy may refuse it), else the reason it is unreachable. Another
    server (``databricks``) is not probed: None."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None  # databricks: no /health to ask; its client reports a failure itself
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_sec):
            return None
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return "HTTP 404 on /health: no MLflow server there"
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, BaseException):
            return unreachable(reason) or type(reason).__name__
        return unreachable(exc) or str(reason)


def _unless(codes: tuple[str, ...], call: Callable[[], _T]) -> _T | None:
    """``call()``, or None when it fails with one of these MLflow error codes."""
    try:
        return call()
    except Exception as exc:
        if _error_code(exc) in codes:
            return None
        raise


def render_svg(figure: Figure) -> str:
    """The figure as SVG (matplotlib's Figure, no pyplot), text kept as text.

    SVG renders in about half the time of a PNG and the MLflow UI previews it; fixed
    margins instead of ``tight_layout`` spare a second draw.
    """
    import io

    import matplotlib
    from matplotlib.figure import Figure as MplFigure

    if figure.kind not in ("scatter", "bar"):
        raise ValueError(f"unknown figure kind {figure.kind!r} (scatter|bar)")
    rotate = figure.kind == "bar" and len(figure.x) > 4
    fig = MplFigure(figsize=(6.4, 4.8))
    fig.subplots_adjust(left=0.12, right=0.96, top=0.92, bottom=0.24 if rotate else 0.12)
    ax = fig.add_subplot()
    y = [float(v) for v in figure.y]
    if figure.kind == "scatter":
        x = [float(v) for v in figure.x]
        ax.scatter(x, y, s=14, alpha=0.7)
        if figure.diagonal and x and y:
            low, high = min(*x, *y), max(*x, *y)
            ax.plot([low, high], [low, high], linestyle="--", color="grey", linewidth=1)
    else:
        ax.bar([str(v) for v in figure.x], y)
        if rotate:
            ax.tick_params(axis="x", labelrotation=30)
    ax.set_title(figure.title)
    ax.set_xlabel(figure.x_label)
    ax.set_ylabel(figure.y_label)
    svg = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "housing"}):
        fig.savefig(svg, format="svg")
    return svg.getvalue()


class MLflowTracker:
    """MLflow tracker for one stage run (nested under its pipeline's parent run)."""

    backend = "mlflow"

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        registry_uri: str | None,
        champion_alias: str = "champion",
        *,
        root: Path,
        artifact_location: str | None = None,
    ) -> None:
        """Open a client for ``tracking_uri`` (relative local URIs resolved against ``root``).

        ``artifact_location`` is used only when the experiment is created; for a local
        sqlite store it defaults to ``<db dir>/mlruns`` (not the current directory).
        """
        from mlflow import MlflowClient

        self.root = Path(root).resolve()
        self.tracking_uri = resolve_uri(tracking_uri, self.root)
        self.registry_uri = resolve_uri(registry_uri, self.root) if registry_uri else None
        self.experiment = experiment
        self.champion_alias = champion_alias
        db = _sqlite_path(self.tracking_uri)
        if db is not None:  # a new store from the template: MLflow's migrations take ~4 s
            create_store(db)
        if artifact_location is not None:
            self.artifact_location: str | None = resolve_uri(artifact_location, self.root)
        elif db is not None:
            self.artifact_location = (db.parent / "mlruns").as_uri()
        else:
            self.artifact_location = None
        self.client: MlflowClient = MlflowClient(
            tracking_uri=self.tracking_uri, registry_uri=self.registry_uri
        )
        check_prompts_once(self.client)
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._stage: StageRun | None = None
        self._params: dict[str, str] = {}
        self._pending_params: list[Any] = []
        self._pending_metrics: list[Any] = []
        self._log_lines: list[str] = []
        self._registered_names: set[str] = set()
        self._closed = False

    # ------------------------------------------------------------------ runs

    def start(self, run: StageRun) -> None:
        """Create this stage's run under the pipeline's parent run (created if missing).

        The stage that creates the parent first closes (KILLED) the runs left RUNNING by
        processes that no longer exist.
        """
        if "'" in run.pipeline_run_id or '"' in run.pipeline_run_id:
            raise ValueError(f"pipeline_run_id must not contain quotes: {run.pipeline_run_id!r}")
        self.experiment_id = self._ensure_experiment()
        owner = run.context.tags if run.context else {}
        self.parent_run_id = self._ensure_parent(self.experiment_id, run.pipeline_run_id, owner)
        tags = {
            **owner,
            TAG_PARENT: self.parent_run_id,
            TAG_RUN_NAME: run.name,
            TAG_RUN_TYPE: "stage",
            TAG_STAGE: run.stage,
            TAG_PIPELINE_RUN_ID: run.pipeline_run_id,
            TAG_PID: str(os.getpid()),
        }
        if run.tags:
            tags["housing.tags"] = ",".join(run.tags)
            tags.update({_key(f"tag.{label}"): "true" for label in run.tags})
        child = self.client.create_run(self.experiment_id, run_name=run.name, tags=tags)
        self.run_id = child.info.run_id
        self._stage = run
        self._params.clear()
        self._pending_params, self._pending_metrics = [], []
        self._log_lines.clear()
        self._closed = False

    def _ensure_experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return self.client.create_experiment(
                    self.experiment, artifact_location=self.artifact_location
                )
            except Exception as exc:  # a concurrent stage created it first
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage != "active":
            raise ConfigError(
                f"MLflow experiment {self.experiment!r} is deleted: restore it "
                "(mlflow experiments restore) or change mlflow.experiment"
            )
        return str(experiment.experiment_id)

    def _find_parents(self, experiment_id: str, pipeline_run_id: str) -> list[Run]:
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.\"{TAG_PIPELINE_RUN_ID}\" = '{pipeline_run_id}' "
                f"and tags.\"{TAG_RUN_TYPE}\" = 'pipeline'"
            ),
            max_results=50,
        )
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def _ensure_parent(
        self, experiment_id: str, pipeline_run_id: str, owner: Mapping[str, str]
    ) -> str:
        """The parent run's id; concurrent creators converge on the earliest-started one.

        Residual race: a stage that searched before any parent was committed, while
        another creator's run (started earlier but committed later) was in flight, can
        adopt the later run; two creators in the same millisecond are ordered by run id.
        The losing duplicate is tagged ``pipeline_duplicate`` and KILLED, never deleted.
        """
        db = _sqlite_path(self.tracking_uri)
        if db is None:
            return self._find_or_create_parent(experiment_id, pipeline_run_id, owner)
        # local store: find-or-create serialised across processes; the parent's id is
        # remembered beside the database, so the run's later stages skip the search
        known_path = db.with_name(db.name + ".parents.json")
        with file_lock(db.with_name(db.name + ".parent.lock")):
            try:  # [[pipeline run id, parent run id], ...], newest last
                known = {str(k): str(v) for k, v in read_json(known_path)}
            except (ArtifactError, TypeError, ValueError):
                known = {}
            parent = self._known_parent(known.get(pipeline_run_id), pipeline_run_id)
            if parent is not None:
                return self._reopened(parent)
            winner = self._find_or_create_parent(experiment_id, pipeline_run_id, owner)
            known.pop(pipeline_run_id, None)
            pairs = [*known.items(), (pipeline_run_id, winner)][-_KNOWN_PARENTS:]
            with suppress(OSError):
                write_json(known_path, [list(pair) for pair in pairs])
            return winner

    def _known_parent(self, run_id: str | None, pipeline_run_id: str) -> Run | None:
        """The remembered parent run, if it still is this pipeline run's active parent."""
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return None
        tags = run.data.tags
        ours = tags.get(TAG_RUN_TYPE) == "pipeline" and (
            tags.get(TAG_PIPELINE_RUN_ID) == pipeline_run_id
        )
        same = run.info.experiment_id == self.experiment_id
        return run if ours and same and run.info.lifecycle_stage == "active" else None

    def _reopened(self, parent: Run) -> str:
        if parent.info.status != "RUNNING":  # closed by the previous stage: reopen
            self.client.update_run(parent.info.run_id, status="RUNNING")
        return str(parent.info.run_id)

    def _find_or_create_parent(
        self, experiment_id: str, pipeline_run_id: str, owner: Mapping[str, str]
    ) -> str:
        found = self._find_parents(experiment_id, pipeline_run_id)
        if found:
            return self._reopened(found[0])
        # a new pipeline run: first close what ended processes left RUNNING
        close_orphans(self.client, experiment_id)
        name = f"pipeline-{pipeline_run_id}"
        created = self.client.create_run(
            experiment_id,
            run_name=name,
            tags={
                **owner,
                TAG_RUN_NAME: name,
                TAG_PIPELINE_RUN_ID: pipeline_run_id,
                TAG_RUN_TYPE: "pipeline",
            },
        )
        own_id = str(created.info.run_id)
        found = self._find_parents(experiment_id, pipeline_run_id)
        winner = str(found[0].info.run_id) if found else own_id
        if winner != own_id:
            log.info("pipeline %s: adopting parent run %s", pipeline_run_id, winner)
            self.client.set_tag(own_id, TAG_RUN_TYPE, "pipeline_duplicate")
            self.client.set_tag(own_id, "housing.duplicate_of", winner)
            self.client.set_terminated(own_id, "KILLED")
        return winner

    def _require_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MLflowTracker.start() must be called before logging")
        return self.run_id

    # --------------------------------------------------------------- logging

    def log_params(self, params: Mapping[str, Any], section: str) -> None:
        """Log nested params flattened to ``section.key.sub`` (values cut at 500 chars).

        Params and metrics are sent in one batch when the stage run closes.
        """
        from mlflow.entities import Param

        self._require_run()
        for name, raw in _flatten(params, section).items():
            key, value = _key(name), _truncate(raw, PARAM_VALUE_MAX)
            previous = self._params.get(key)
            if previous is not None:
                if previous != value:
                    log.warning("MLflow param %s already logged as %r; keeping it", key, previous)
                continue
            self._params[key] = value
            self._pending_params.append(Param(key, value))

    def log_config(self, config: Mapping[str, Any], name: str) -> None:
        """Log the (already redacted) config as artifact ``config/<name>.yaml``."""
        import yaml

        run_id = self._require_run()
        text = yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True)
        self.client.log_text(run_id, text, f"config/{_file_name(name)}.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics under their own names (``val/rmse``); NaN values are skipped."""
        from mlflow.entities import Metric

        self._require_run()
        timestamp = int(time.time() * 1000)
        for name, raw in metrics.items():
            value = float(raw)
            if math.isnan(value):
                log.debug("MLflow metric %s is NaN; not logged", name)
                continue
            self._pending_metrics.append(Metric(_key(name), value, timestamp, step or 0))

    def _flush(self) -> None:
        """Send the buffered params and metrics (few requests: they are batched)."""
        params, metrics = self._pending_params, self._pending_metrics
        self._pending_params, self._pending_metrics = [], []
        run_id = self._require_run()
        while params or metrics:
            self.client.log_batch(
                run_id, params=params[:_PARAMS_PER_BATCH], metrics=metrics[:_METRICS_PER_BATCH]
            )
            params, metrics = params[_PARAMS_PER_BATCH:], metrics[_METRICS_PER_BATCH:]

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """Attach a file or directory; ``name`` is its artifact path (default: its name)."""
        run_id = self._require_run()
        path = Path(path)
        if not path.exists():
            raise ArtifactError(f"cannot log artifact {path}: no such file or directory")
        target = name.strip("/") if name else path.name
        folder, base = posixpath.split(target)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), target)
        elif base == path.name:
            self.client.log_artifact(run_id, str(path), folder or None)
        else:
            with tempfile.TemporaryDirectory(prefix="housing-mlflow-") as tmp:
                renamed = Path(tmp) / base
                shutil.copyfile(path, renamed)
                self.client.log_artifact(run_id, str(renamed), folder or None)

    def log_figure(self, figure: Figure) -> None:
        """Log ``plots/<name>.svg`` (:func:`render_svg`) and the data as ``.json``."""
        run_id = self._require_run()
        name = _file_name(figure.name)
        self.client.log_text(run_id, render_svg(figure), f"plots/{name}.svg")
        data = {f.name: getattr(figure, f.name) for f in dataclasses.fields(figure)}
        data.update(x=_plain(list(figure.x)), y=[float(v) for v in figure.y])
        self.client.log_text(run_id, json.dumps(data, indent=1), f"plots/{name}.json")

    def log_text(self, text: str) -> None:
        """Buffer a log line; the buffer is written to ``logs/stage.log`` at close."""
        self._log_lines.append(text.rstrip("\n"))

    def log_trials(self, study: str, trials: Sequence[TrialRun], best: int) -> None:
        """One finished child run per trial (params, metrics, state) nested under this
        run, which gets the study's name and its best trial (number and run id) as tags."""
        from mlflow.entities import Metric, Param

        parent = self._require_run()
        timestamp = int(time.time() * 1000)
        for trial in trials:
            tags = {
                TAG_PARENT: parent,
                TAG_RUN_NAME: f"trial_{trial.number}",
                TAG_RUN_TYPE: "trial",
                TAG_STUDY: study,
                TAG_TRIAL: str(trial.number),
                TAG_TRIAL_STATE: trial.state,
            }
            child = self.client.create_run(
                str(self.experiment_id), run_name=tags[TAG_RUN_NAME], tags=tags
            )
            child_id = child.info.run_id
            params = [
                Param(_key(k), _truncate(v, PARAM_VALUE_MAX))
                for k, v in _flatten(trial.params, "").items()
            ]
            metrics = [
                Metric(_key(k), float(v), timestamp, 0)
                for k, v in trial.metrics.items()
                if math.isfinite(float(v))
            ]
            self.client.log_batch(child_id, params=params, metrics=metrics)
            self.client.set_terminated(child_id, _TRIAL_STATUS.get(trial.state, "FAILED"))
            if trial.number == best:
                self.client.set_tag(parent, TAG_BEST_RUN, child_id)
        self.client.set_tag(parent, TAG_STUDY, study)
        self.client.set_tag(parent, TAG_BEST_TRIAL, str(best))

    # -------------------------------------------------------------- registry

    def register_model(self, model: ModelVersion) -> RegisteredModel:
        """Log ``model.path`` into the stage run and add a registry version with its tags."""
        import joblib

        run_id, experiment_id = self._require_run(), self.experiment_id
        if experiment_id is None:  # pragma: no cover - start() sets both
            raise RuntimeError("MLflowTracker.start() must be called before registering")
        path = Path(model.path)
        if not path.is_file():
            raise ArtifactError(f"cannot register {model.registry_name}: {path} does not exist")
        expected = model.metadata.get("model_sha256")
        if expected and file_sha256(path) != expected:
            raise ArtifactError(
                f"cannot register {model.registry_name}: sha256 of {path} does not match "
                "metadata model_sha256; re-run the train stage"
            )
        estimator = joblib.load(path)

        lineage = {**_cut(model.metadata, TAG_VALUE_MAX), "algorithm": model.algorithm}
        params = _flatten(model.params, "")
        logged = self.client.create_logged_model(
            experiment_id,
            name=_file_name(model.registry_name),
            source_run_id=run_id,
            tags=lineage,
            params=_cut(params, PARAM_VALUE_MAX),
            model_type=model.algorithm,
        )
        info = self._log_sklearn_model(estimator, model, logged.model_id, run_id)
        pickle_sha = self._stored_pickle_sha256(info.artifact_path, info.flavors)

        record = {**lineage, TAG_PICKLE_SHA: pickle_sha}
        record.update({_key(f"metric.{k}"): repr(float(v)) for k, v in model.metrics.items()})
        record.update(_cut(params, TAG_VALUE_MAX, "param."))
        record.update({_key(f"tag.{label}"): "true" for label in model.tags})
        if self._stage is not None:
            record[TAG_PIPELINE_RUN_ID] = self._stage.pipeline_run_id
            record["housing.stage_run"] = self._stage.name
        self.client.set_logged_model_tags(info.model_id, record)
        tags = {key: lineage[key] for key in VERSION_TAGS if lineage.get(key)}

        self._ensure_registered_model(model.registry_name)
        # A local (sqlalchemy) registry resolves a ``models:/<model_id>`` source through
        # the global tracking URI, so this call needs it set too (mlflow 3.17).
        with fluent_tracking_uri(self.tracking_uri):
            version = self.client.create_model_version(
                name=model.registry_name,
                source=info.model_uri,
                run_id=run_id,
                tags=tags,
                model_id=info.model_id,
            )
        number = str(version.version)
        full = {
            "registry_name": model.registry_name,
            "version": number,
            "algorithm": model.algorithm,
            "metadata": dict(model.metadata),
            "metrics": {k: float(v) for k, v in model.metrics.items()},
            "params": _plain(model.params),
            "labels": list(model.tags),
            "pipeline_run_id": self._stage.pipeline_run_id if self._stage else "",
            "stage_run": self._stage.name if self._stage else "",
            "run_id": run_id,
            "logged_model_id": info.model_id,
            TAG_PICKLE_SHA: pickle_sha,
        }
        text = json.dumps(full, indent=1, sort_keys=True, default=str, allow_nan=True)
        self.client.log_text(run_id, text + "\n", LINEAGE_ARTIFACT)
        return RegisteredModel(
            backend=self.backend,
            registry_name=model.registry_name,
            version=number,
            model_id=f"models:/{model.registry_name}/{number}",
            extra={
                "run_id": run_id,
                "logged_model_id": info.model_id,
                "model_uri": info.model_uri,
                TAG_PICKLE_SHA: pickle_sha,
            },
        )

    def _log_sklearn_model(
        self, estimator: Any, model: ModelVersion, model_id: str, run_id: str
    ) -> ModelInfo:
        """``mlflow.sklearn.log_model`` into the pre-created logged model ``model_id``.

        No ``run_id`` (with it MLflow re-logs every run metric, 2 + N requests): the run
        link is recorded here in one call. Only with a fluent run active is it passed, so
        ``log_model`` cannot attach the model to that run.
        """
        import mlflow
        import mlflow.sklearn
        from mlflow.entities import LoggedModelOutput

        schema = _signature(estimator, model.example)
        with fluent_tracking_uri(self.tracking_uri), no_requirement_scan():
            pin_run = {"run_id": run_id} if mlflow.active_run() is not None else {}
            try:
                info: ModelInfo = mlflow.sklearn.log_model(
                    estimator,
                    name=_file_name(model.registry_name),
                    serialization_format="cloudpickle",
                    pip_requirements=list(_pinned_requirements()),
                    model_id=model_id,
                    **schema,
                    **pin_run,
                )
            except Exception as exc:
                if unreachable(exc) is None:
                    with suppress(Exception):
                        self.client.finalize_logged_model(model_id, "FAILED")
                raise
        if not pin_run:
            self.client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        return info

    def _stored_pickle_sha256(self, artifact_uri: str, flavors: Mapping[str, Any]) -> str:
        """sha256 of the pickle as MLflow stored it (read back from the artifact store)."""
        import mlflow.artifacts

        file_name = _pickle_file_name(flavors)
        with tempfile.TemporaryDirectory(prefix="housing-mlflow-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{artifact_uri.rstrip('/')}/{file_name}",
                dst_path=tmp,
                tracking_uri=self.tracking_uri,
            )
            return file_sha256(local)

    def _ensure_registered_model(self, name: str) -> None:
        if name in self._registered_names:
            return
        missing = ("RESOURCE_DOES_NOT_EXIST",)
        if _unless(missing, lambda: self.client.get_registered_model(name)) is None:
            # a concurrent stage may have registered it first
            _unless(("RESOURCE_ALREADY_EXISTS",), lambda: self.client.create_registered_model(name))
        self._registered_names.add(name)

    def champion(self, registry_name: str, metric: str) -> tuple[str, float] | None:
        """(version, metric) of the version holding the champion alias, or None.

        None also when the champion has no ``metric.<metric>`` tag (logged as a warning).
        """
        version = _version_by_alias(self.client, registry_name, self.champion_alias)
        if version is None:
            return None
        raw = version_record(self.client, version).get(_key(f"metric.{metric}"))
        if raw is None:
            log.warning(
                "MLflow champion %s v%s has no metric.%s tag; treating as no champion",
                registry_name,
                version.version,
                metric,
            )
            return None
        return str(version.version), float(raw)

    def promote(self, decision: ChampionDecision, registered: RegisteredModel) -> None:
        """Tag the challenger version with the decision; move the alias when promoted."""
        if registered.backend != self.backend:
            raise ValueError(f"not an MLflow registration: backend={registered.backend!r}")
        name, version = registered.registry_name, registered.version
        if decision.promoted:
            self.client.set_registered_model_alias(name, self.champion_alias, version)
        replaced = (decision.champion_version or "") if decision.promoted else ""
        tags = {
            "champion.decision": "promoted" if decision.promoted else "rejected",
            "champion.reason": _truncate(decision.reason, TAG_VALUE_MAX),
            "champion.replaced_version": replaced,
            "champion.decided_at": decision.decided_at,
            "champion.metric": decision.metric,
        }
        model_id = registered.extra.get("logged_model_id")
        if not model_id:
            model_id = version_model_id(self.client.get_model_version(name, version))
        if model_id:  # the details beside the rest of the record
            self.client.set_logged_model_tags(str(model_id), tags)
        else:  # a version without a logged model (MLflow 2): on the version itself
            for key, value in tags.items():
                self.client.set_model_version_tag(name, version, key, value)
        self.client.set_model_version_tag(name, version, TAG_CHAMPION, tags["champion.decision"])
        summary = {
            "version": version,
            "decision": tags["champion.decision"],
            "metric": decision.metric,
            "challenger_value": decision.challenger_value,
            "champion_version": decision.champion_version,
            "champion_value": decision.champion_value,
            "reason": decision.reason,
            "decided_at": decision.decided_at,
        }
        self.client.set_registered_model_tag(
            name,
            "champion.last_decision",
            _truncate(json.dumps(summary, separators=(",", ":"), default=str), TAG_VALUE_MAX),
        )

    # ----------------------------------------------------------------- close

    def close(self, status: str, error: str | None = None) -> None:
        """End the stage run (FINISHED/FAILED); evaluate/failure also end the parent."""
        if self.run_id is None or self._closed:
            return
        mlflow_status = _STATUS.get(status.lower())
        if mlflow_status is None:
            raise ValueError(f"unknown close status {status!r} (completed|failed|killed)")
        pending = (self._pending_params, self._pending_metrics)
        try:  # the run must be terminated even if these fail (not if the server is gone)
            self._flush()
        except Exception as exc:
            if unreachable(exc):
                self._pending_params, self._pending_metrics = pending
                raise
            log.warning("MLflow: could not record the stage's params and metrics: %s", exc)
        try:
            if self._log_lines:
                text = "\n".join(self._log_lines) + "\n"
                self.client.log_text(self.run_id, text, _STAGE_LOG_ARTIFACT)
            if error:
                self.client.set_tag(self.run_id, "error", _one_line(error, ERROR_TAG_MAX))
        except Exception as exc:
            if unreachable(exc):
                raise
            log.warning("MLflow: could not record the stage log/error: %s", exc)
        self.client.set_terminated(self.run_id, mlflow_status)
        self._closed = True
        if self.parent_run_id is None:
            return
        context = self._stage.context if self._stage else None
        if mlflow_status != "FINISHED":
            self.client.set_terminated(self.parent_run_id, mlflow_status)
        elif context is None or context.closes_parent:
            # No engine owns this run (dvc repro, a stage by hand): leave the parent
            # closed; the next stage of the same run reopens it. FAILED stays FAILED.
            parent = self.client.get_run(self.parent_run_id)
            if parent.info.status == "RUNNING":
                self.client.set_terminated(self.parent_run_id, "FINISHED")

    def finish_pipeline(self, pipeline_run_id: str, status: str) -> None:
        """Close the parent run of ``pipeline_run_id`` (the engine's last word on it)."""
        mlflow_status = _STATUS[status.lower()]
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return
        for parent in self._find_parents(str(experiment.experiment_id), pipeline_run_id):
            if parent.info.status == "RUNNING" or mlflow_status != "FINISHED":
                self.client.set_terminated(parent.info.run_id, mlflow_status)


def close_orphans(client: MlflowClient, experiment_id: str) -> list[str]:
    """Close (KILLED, tagged ``housing.close_reason``) runs left RUNNING by a process of
    this host that no longer exists.

    A stage run belongs to the process in ``housing.pid``; a parent run to the owner of
    its pipeline run (``housing.owner_pid``, ``housing.owner_started``).
    """
    from housing.runs import is_alive

    closed: list[str] = []
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200
    )
    for run in running:
        tags = run.data.tags
        pid_text = tags.get(TAG_PID) or tags.get("housing.owner_pid")
        if not pid_text or not pid_text.isdigit():
            continue
        started_text = None if TAG_PID in tags else tags.get("housing.owner_started")
        started = float(started_text) if started_text else None
        host = tags.get("housing.host", "")
        if is_alive(int(pid_text), started, host):
            continue
        reason = f"process {pid_text} on {host or 'this host'} ended without closing its run"
        with suppress(Exception):  # a concurrent sweep may have closed it
            client.set_tag(run.info.run_id, "housing.closed_by", "orphan-sweep")
            client.set_tag(run.info.run_id, "housing.close_reason", reason)
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.info("MLflow: closed %d run(s) left RUNNING by ended processes", len(closed))
    return closed


def _signature(estimator: Any, example: Any) -> dict[str, Any]:
    """``signature`` and ``input_example`` for ``log_model`` from a few train rows (the
    columns the fitted pipeline takes), or nothing when there are none.

    Features are typed double: the pipeline imputes and scales floats. MLflow's schema
    check refuses int64 for a double column ("Can not safely convert"), so a caller of
    ``pyfunc.predict`` passes floats (``housing predict`` does).
    """
    names = getattr(estimator, "feature_names_in_", None)
    if example is None or names is None or len(example) == 0:
        return {}
    from mlflow.models import infer_signature

    try:
        features = example[[str(n) for n in names]].astype("float64")
        predicted = estimator.predict(features)
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("MLflow: model logged without a signature (%s)", first_line(exc))
        return {}
    return {"signature": infer_signature(features, predicted), "input_example": features}


def version_record(client: MlflowClient, version: MlflowModelVersion) -> dict[str, str]:
    """A registry version's full record: its logged model's tags (lineage, metrics,
    params, pickle hash, the champion decision's details) under the version's own tags.

    Versions registered before the tags were trimmed carry everything themselves.
    """
    record: dict[str, str] = {}
    model_id = version_model_id(version)
    if model_id:
        missing = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
        logged = _unless(missing, lambda: client.get_logged_model(str(model_id)))
        if logged is not None:
            record.update({str(k): str(v) for k, v in (logged.tags or {}).items()})
    record.update(version.tags or {})
    return record


def _pickle_file_name(flavors: Mapping[str, Any]) -> str:
    sklearn_flavor = flavors.get("sklearn")
    name = sklearn_flavor.get("pickled_model") if isinstance(sklearn_flavor, Mapping) else None
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ArtifactError(f"MLflow model has no usable sklearn pickled_model entry: {name!r}")
    return name


def _version_by_alias(client: MlflowClient, name: str, alias: str) -> MlflowModelVersion | None:
    missing = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
    return _unless(missing, lambda: client.get_model_version_by_alias(name, alias))


def load_registered_model(
    client_or_tracker: MLflowTracker | MlflowClient,
    name: str,
    version_or_alias: str,
    expected_sha256: str | None = None,
) -> Any:
    """Download a registered sklearn model, verify its pickle, then unpickle it.

    ``version_or_alias`` is a version number (``"3"``) or an alias (``"champion"``).
    ``expected_sha256``, if given, must equal the version's ``model_sha256`` tag (the
    lineage hash of the joblib file). The downloaded pickle must match the
    ``mlflow_pickle_sha256`` tag recorded at registration; it is never unpickled
    otherwise. Raises :class:`ArtifactError` (one line) on any mismatch or absence.
    """
    import mlflow.artifacts
    import mlflow.sklearn
    import yaml

    given = client_or_tracker
    client = given.client if isinstance(given, MLflowTracker) else given
    version = _resolve_version(client, name, version_or_alias)
    number = str(version.version)
    label = f"{name} v{number}"
    tags = version_record(client, version)
    if expected_sha256 is not None and tags.get("model_sha256") != expected_sha256:
        raise ArtifactError(
            f"MLflow model {label}: model_sha256 tag {tags.get('model_sha256')!r} does not "
            f"match the expected {expected_sha256}"
        )
    recorded = tags.get(TAG_PICKLE_SHA)
    if not recorded:
        raise ArtifactError(f"MLflow model {label} has no {TAG_PICKLE_SHA} tag; refusing to load")

    source = client.get_model_version_download_uri(name, number)
    with tempfile.TemporaryDirectory(prefix="housing-mlflow-") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source,
                dst_path=tmp,
                tracking_uri=client.tracking_uri,
            )
        )
        mlmodel = local / "MLmodel"
        if not mlmodel.is_file():
            raise ArtifactError(f"MLflow model {label}: no MLmodel file at {source}")
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
        pickle_path = local / _pickle_file_name(spec.get("flavors") or {})
        if not pickle_path.is_file():
            raise ArtifactError(f"MLflow model {label}: {pickle_path.name} missing at {source}")
        actual = file_sha256(pickle_path)
        if actual != recorded:
            raise ArtifactError(
                f"MLflow model {label}: sha256 of {pickle_path.name} is {actual}, tag "
                f"{TAG_PICKLE_SHA} says {recorded}; refusing to unpickle"
            )
        return mlflow.sklearn.load_model(str(local))


def _resolve_version(client: MlflowClient, name: str, version_or_alias: str) -> MlflowModelVersion:
    if version_or_alias.isdigit():
        missing = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
        version = _unless(missing, lambda: client.get_model_version(name, version_or_alias))
        if version is None:
            raise ArtifactError(f"MLflow model {name} has no version {version_or_alias}")
        return version
    version = _version_by_alias(client, name, version_or_alias)
    if version is None:
        raise ArtifactError(f"MLflow model {name} has no alias {version_or_alias!r}")
    return version


def registered_version(
    client_or_tracker: MLflowTracker | MlflowClient, name: str, version_or_alias: str
) -> tuple[str, dict[str, str]]:
    """A registry version's number and full record (:func:`version_record`).

    ``version_or_alias``: a number, an alias, or ``latest`` (the highest number). None
    such raises a one-line :class:`ArtifactError`.
    """
    given = client_or_tracker
    client = given.client if isinstance(given, MLflowTracker) else given
    if version_or_alias == "latest":
        missing = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
        found: list[MlflowModelVersion] = (
            _unless(missing, lambda: client.search_model_versions(f"name = '{name}'")) or []
        )
        if not found:
            raise ArtifactError(f"MLflow model {name} has no versions")
        version = max(found, key=lambda v: int(v.version))
    else:
        version = _resolve_version(client, name, version_or_alias)
    return str(version.version), {**version_record(client, version), "run_id": version.run_id or ""}


def run_config(client_or_tracker: MLflowTracker | MlflowClient, run_id: str) -> dict[str, Any]:
    """The resolved config a stage run logged (``config/config.yaml``), or ``{}``."""
    import yaml

    given = client_or_tracker
    client = given.client if isinstance(given, MLflowTracker) else given
    text = run_artifact_text(client.tracking_uri, run_id, "config/config.yaml")
    try:
        data = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError as exc:
        log.debug("MLflow run %s: config/config.yaml unreadable (%s)", run_id, exc)
        return {}
    return data if isinstance(data, dict) else {}


def run_artifact_text(
    tracking_uri: str, run_id: str, artifact_path: str, root: Path | None = None
) -> str | None:
    """A text artifact of a run (``root`` resolves a relative local store URI), or None
    when the run has no such artifact; an unreachable server raises."""
    import mlflow.artifacts

    uri = resolve_uri(tracking_uri, root or Path.cwd())
    with tempfile.TemporaryDirectory(prefix="housing-mlflow-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact_path, dst_path=tmp, tracking_uri=uri
            )
            return Path(local).read_text(encoding="utf-8")
        except Exception as exc:  # no such artifact (an older run), or unreadable
            if unreachable(exc):
                raise
            log.debug("MLflow run %s: no readable %s (%s)", run_id, artifact_path, exc)
            return None
