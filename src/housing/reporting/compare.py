"""Export tracked experiments and model versions (ClearML, MLflow) as comparable CSV tables.

:func:`compare` writes :data:`TABLES` under ``paths.metrics_dir`` (atomically): per backend,
one row per stage task/run (MLflow pipeline parent runs left out) with
:data:`EXPERIMENT_COLUMNS`, and one row per registered model version with
:data:`MODEL_COLUMNS`; a concept has the same column in both backends. Experiments are
sorted by ``selection.metric``, best first (rows without it follow, newest first); models
by name, then version.

Sources: the ClearML server when ``resolve_mode`` says online (every task and model of the
project, paged), else the offline sessions in ``clearml.offline_dir``; MLflow through
``MlflowClient`` on ``mlflow.tracking_uri`` (a relative local store is resolved against the
project root; a missing one is an empty store, never created). Filters: ``project``
(defaults ``clearml.project_name`` / ``mlflow.experiment``), ``tags`` (a task must carry
all), ``stage``, ``last_n`` (the N newest pipeline runs); with a filter, the model tables
keep the versions registered by the selected tasks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from housing.errors import ConfigError, HousingError, first_line
from housing.quirks import clearml as clearml_quirks

if TYPE_CHECKING:
    from housing.config import Settings
    from housing.tracking.clearml import ClearMLSettings
    from housing.tracking.offline import OfflineModel, OfflineSession

log = logging.getLogger(__name__)

ERROR_CHARS: Final = 300  # an error quoted in a summary, note or log line is cut to this

STAGES: Final = ("prepare", "train", "select_best", "evaluate")
# As reported; empty when a task did not report one.
_SCORES: Final = ("rmse", "mae", "r2")
METRIC_COLUMNS: Final = (
    *(f"val/{score}" for score in _SCORES),
    "cv/rmse_mean",
    "cv/rmse_std",
    *(f"{split}/{score}" for split in ("train", "test") for score in _SCORES),
)
MODEL_METRIC_COLUMNS: Final = tuple(m for m in METRIC_COLUMNS if not m.startswith("test/"))
EXPERIMENT_COLUMNS: Final = (
    "task_id",  # ClearML task id | MLflow run id
    "name",  # task name | run name
    "project",  # ClearML project | MLflow experiment
    "stage",
    "model",  # the candidate a train task fitted; the winner for select_best and evaluate
    "pipeline_run_id",
    "status",  # completed, failed, in_progress, stopped, queued...; open: offline, not closed
    "started",  # ISO 8601 UTC; offline sessions: first and last recorded event
    "completed",
    "duration_sec",
    "tags",  # TAG_SEPARATOR-joined
    "source",  # ClearML: server | offline; MLflow: server | local
    *METRIC_COLUMNS,
)
MODEL_COLUMNS: Final = (
    "model_id",  # ClearML model id | models:/<name>/<version>
    "name",  # registry name: <model_name>-<algorithm>, <model_name>-best
    "version",
    "framework",
    "algorithm",
    "uri",  # weights file or URL | MLflow model source
    "created",
    "tags",
    "champion",  # holds the champion now: ClearML champions.json or tag, MLflow alias
    "champion_decision",  # promoted | rejected | empty
    "task_id",  # the registering stage's
    "pipeline_run_id",
    *MODEL_METRIC_COLUMNS,  # the train metrics summary
    "data_md5",
    "git_commit",
    "config_hash",
    "sha256",  # of the joblib file
    "source",
)
TABLES: Final = {
    "clearml": ("clearml_experiments.csv", "clearml_models.csv"),
    "mlflow": ("mlflow_experiments.csv", "mlflow_models.csv"),
}
TAG_SEPARATOR: Final = ";"
_TASK_FIELDS: Final = (
    "id",
    "name",
    "project",
    "status",
    "type",
    "tags",
    "system_tags",
    "created",
    "started",
    "completed",
    "last_update",
    "last_metrics",
    "hyperparams",
)
_MLFLOW_STATUS: Final = {
    "FINISHED": "completed",
    "FAILED": "failed",
    "RUNNING": "in_progress",
    "KILLED": "stopped",
    "SCHEDULED": "queued",
}
_TASK_TYPE_STAGE: Final = {
    "data_processing": "prepare",
    "training": "train",
    "qc": "select_best",
    "testing": "evaluate",
}

Row = dict[str, Any]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ChampionEvent:
    """One champion decision as a backend recorded it (who challenged whom, and the outcome)."""

    backend: str
    registry_name: str
    version: str
    value: float | None
    metric: str
    promoted: bool
    previous_version: str | None
    previous_value: float | None
    decided_at: str
    reason: str
    model: str = ""  # the challenger's algorithm, when known

    @property
    def change(self) -> float | None:
        """Challenger minus the champion it faced (``None`` when there was none)."""
        if self.value is None or self.previous_value is None:
            return None
        return self.value - self.previous_value


@dataclass
class Collected:
    """What one backend holds: experiment rows, model rows, champion decisions."""

    backend: str  # clearml | mlflow
    source: str  # server | offline | local
    location: str  # server URL, offline folder or tracking URI
    project: str
    experiments: list[Row] = field(default_factory=list)
    models: list[Row] = field(default_factory=list)
    champions: list[ChampionEvent] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unreadable offline sessions
    error: str | None = None  # the backend could not be read at all
    note: str = ""  # why nothing was found, when so

    @property
    def empty(self) -> bool:
        return not self.experiments and not self.models

    @property
    def nothing_found(self) -> str:
        """Why an empty backend has no rows."""
        return self.note or f"nothing found for project {self.project!r}"


@dataclass
class CompareResult:
    """The tables written by :func:`compare` and what each backend contributed."""

    backends: dict[str, Collected]
    paths: dict[str, Path]  # file name -> written path

    @property
    def ok(self) -> bool:
        return all(c.error is None for c in self.backends.values())

    def files(self, backend: str) -> str:
        """The tables written for ``backend``, comma-separated."""
        return ", ".join(str(self.paths[f]) for f in TABLES[backend] if f in self.paths)

    def summary_lines(self) -> list[str]:
        """One line per backend: counts and files, or why nothing was exported."""
        lines = []
        for name, got in self.backends.items():
            label = f"{name} ({got.source}, {got.location})"
            if got.error is not None:
                lines.append(f"{label}: not exported: {got.error}")
            elif got.empty:
                lines.append(f"{label}: {got.nothing_found}; wrote headers only")
            else:
                files = self.files(name)
                skipped = ""
                if got.skipped:
                    skipped = f", {len(got.skipped)} unreadable session(s) skipped"
                lines.append(
                    f"{label}: {len(got.experiments)} task(s), {len(got.models)} model "
                    f"version(s){skipped} -> {files}"
                )
        return lines


# --------------------------------------------------------------------------- compare


def compare(
    settings: Settings,
    *,
    project: str | None = None,
    tags: Sequence[str] = (),
    stage: str | None = None,
    last_n: int | None = None,
    env: Mapping[str, str] | None = None,
) -> CompareResult:
    """Read ClearML and MLflow, write the four CSV tables; see the module docstring.

    A backend that cannot be read (server error) keeps its previous tables and is
    reported in the result (``ok`` is false); an empty one gets headers-only tables.
    """
    from housing.io import write_csv
    from housing.tracking.stores import check_stores

    if stage is not None and stage not in STAGES:
        raise ConfigError(f"--stage: unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if last_n is not None and last_n < 1:
        raise ConfigError(f"--last: must be a positive number of runs, got {last_n}")
    check_stores(settings, ("mlflow", "clearml"))  # never read (so re-create) a damaged store
    backends = {
        "clearml": collect_clearml(
            settings, project=project, tags=tags, stage=stage, last_n=last_n, env=env
        ),
        "mlflow": collect_mlflow(settings, project=project, tags=tags, stage=stage, last_n=last_n),
    }
    paths: dict[str, Path] = {}
    metrics_dir = settings.paths.metrics_dir
    for name, got in backends.items():
        if got.error is not None:
            continue
        exp_file, model_file = TABLES[name]
        paths[exp_file] = write_csv(
            metrics_dir / exp_file, to_frame(got.experiments, EXPERIMENT_COLUMNS)
        )
        paths[model_file] = write_csv(metrics_dir / model_file, to_frame(got.models, MODEL_COLUMNS))
    return CompareResult(backends=backends, paths=paths)


def to_frame(rows: Sequence[Row], columns: Sequence[str]) -> Any:
    """Rows as a DataFrame with exactly ``columns`` (tags joined, metrics as floats)."""
    import pandas as pd

    records = []
    for row in rows:
        record = {c: row.get(c) for c in columns}
        tags = record.get("tags")
        if isinstance(tags, list | tuple):
            record["tags"] = TAG_SEPARATOR.join(str(t) for t in tags)
        records.append(record)
    frame = pd.DataFrame(records, columns=list(columns))
    for column in columns:
        if column in METRIC_COLUMNS or column == "duration_sec":
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
        elif column == "champion":
            frame[column] = pd.Series([v is True for v in frame[column]], dtype=bool)
        else:
            frame[column] = frame[column].astype("object")
    return frame


# --------------------------------------------------------------------------- filters


def select(
    experiments: list[Row],
    models: list[Row],
    *,
    tags: Sequence[str] = (),
    stage: str | None = None,
    last_n: int | None = None,
) -> tuple[list[Row], list[Row]]:
    """Apply the filters: last N pipeline runs, then tags (all), then stage.

    With any filter, only the models registered by the selected tasks are kept.
    """
    chosen = experiments
    if last_n is not None:
        first_seen: dict[str, str] = {}
        for row in chosen:
            key = _run_key(row)
            started = str(row.get("started") or "")
            if key not in first_seen or (started and started < first_seen[key]):
                first_seen[key] = started
        newest = set(sorted(first_seen, key=lambda k: (first_seen[k], k))[-last_n:])
        chosen = [r for r in chosen if _run_key(r) in newest]
    if tags:
        wanted = set(tags)
        chosen = [r for r in chosen if wanted <= set(r.get("tags") or ())]
    if stage is not None:
        chosen = [r for r in chosen if r.get("stage") == stage]
    if last_n is None and not tags and stage is None:
        return chosen, models
    task_ids = {r["task_id"] for r in chosen}
    return chosen, [m for m in models if m.get("task_id") in task_ids]


def _run_key(row: Mapping[str, Any]) -> str:
    return str(row.get("pipeline_run_id") or row.get("task_id") or "")


def sort_experiments(rows: list[Row], metric: str) -> list[Row]:
    """Best ``metric`` first (direction from the metric's name); rows without it last."""
    from housing.config import greater_is_better

    sign = -1.0 if greater_is_better(metric) else 1.0

    def newest_first(row: Row) -> float:
        parsed = parse_time(row.get("started"))
        return -parsed.timestamp() if parsed else 0.0

    with_metric = [r for r in rows if as_float(r.get(metric)) is not None]
    without = [r for r in rows if as_float(r.get(metric)) is None]
    with_metric.sort(key=lambda r: (sign * float(r[metric]), newest_first(r), str(r["name"])))
    without.sort(key=lambda r: (newest_first(r), str(r["name"]), str(r["task_id"])))
    return with_metric + without


def sort_models(rows: list[Row]) -> list[Row]:
    """By registry name, then numeric version."""
    return sorted(rows, key=lambda r: (str(r.get("name")), _version_key(r.get("version"))))


def _version_key(version: Any) -> tuple[int, str]:
    text = str(version or "")
    return (int(text), "") if text.isdigit() else (sys.maxsize, text)


def _fill_models(experiments: list[Row], models: Iterable[Row]) -> None:
    """A task with no model name gets the algorithm of the model it registered."""
    by_task: dict[str, str] = {}
    for model in models:
        if model.get("algorithm") and model.get("task_id"):
            by_task.setdefault(str(model["task_id"]), str(model["algorithm"]))
    for row in experiments:
        if not row.get("model"):
            row["model"] = by_task.get(str(row["task_id"]), "")


def _finish(got: Collected, settings: Settings, filters: Mapping[str, Any]) -> Collected:
    _fill_models(got.experiments, got.models)
    experiments, models = select(got.experiments, got.models, **filters)
    got.experiments = sort_experiments(experiments, settings.selection.metric)
    got.models = sort_models(models)
    if got.empty and not got.note:
        got.note = f"nothing found for project {got.project!r}"
    return got


# --------------------------------------------------------------------------- ClearML


def collect_clearml(
    settings: Settings,
    *,
    project: str | None = None,
    tags: Sequence[str] = (),
    stage: str | None = None,
    last_n: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Collected:
    """ClearML tasks and models: the server when online, else the offline sessions."""
    from housing.tracking.clearml import resolve_mode
    from housing.tracking.offline import ping

    cml = settings.clearml
    name = project or cml.project_name
    env = os.environ if env is None else env
    filters = {"tags": tuple(tags), "stage": stage, "last_n": last_n}
    mode = "offline"
    if cml.enabled:
        mode, _reason = resolve_mode(cml, env)
    if mode == "online":
        got = Collected("clearml", "server", cml.api_host, name)
        problem = ping(cml.api_host, cml.connect_timeout_sec) if cml.mode == "online" else None
        try:
            if problem is not None:
                raise HousingError(f"ClearML server unavailable: {problem}")
            _read_server(got, cml, env, tags)
        except HousingError as exc:
            got.error = str(exc)
            return got
        except Exception as exc:  # SDK/HTTP errors: report, do not crash the other exports
            reason = first_line(exc, ERROR_CHARS)
            got.error = f"ClearML server {cml.api_host}: {type(exc).__name__}: {reason}"
            return got
    else:
        got = Collected("clearml", "offline", str(cml.offline_dir), name)
        _read_offline(got, cml)
    got.champions = _ledger_events(cml.offline_dir, got.models)
    return _finish(got, settings, filters)


def _read_offline(got: Collected, cml: ClearMLSettings) -> None:
    from housing.monitoring import Progress
    from housing.tracking.offline import CHAMPIONS_FILE, list_sessions, read_models

    if not cml.offline_dir.is_dir():
        got.note = f"no ClearML offline sessions in {cml.offline_dir}"
        return
    sessions = list_sessions(cml.offline_dir)
    got.skipped.extend(_unlisted_sessions(cml.offline_dir, sessions))
    champion_ids, decisions = _ledger_index(cml.offline_dir / CHAMPIONS_FILE)
    progress = Progress(log, "compare: ClearML offline sessions read", len(sessions), every=1.0)
    for done, session in enumerate(sessions, 1):
        progress(done)
        if session.project != got.project:
            continue
        try:
            row = _offline_task_row(session)
            models = [
                _offline_model_row(session, m, champion_ids, decisions)
                for m in read_models(session)
            ]
        except Exception as exc:
            log.warning(
                "skipping unreadable ClearML offline session %s: %s: %s",
                session.folder,
                type(exc).__name__,
                first_line(exc, ERROR_CHARS),
            )
            got.skipped.append(str(session.folder))
            continue
        got.experiments.append(row)
        got.models.extend(models)


def _unlisted_sessions(offline_dir: Path, sessions: Sequence[OfflineSession]) -> list[str]:
    """Session folders/zips that ``list_sessions`` skipped (it already warned about each)."""
    from housing.tracking.offline import session_names, sessions_root

    root = sessions_root(offline_dir)
    if not root.is_dir():
        return []
    listed = {s.folder.name for s in sessions}
    return [str(root / n) for n in sorted(session_names(root) - listed)]


def _ledger_index(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(registry name -> champion model id, model id -> promoted|rejected) from the ledger."""
    ledger = _read_ledger(path)
    champion_ids: dict[str, str] = {}
    decisions: dict[str, str] = {}
    for name, entry in ledger.items():
        if entry.get("model_id"):
            champion_ids[name] = str(entry["model_id"])
        for item in entry.get("history") or ():
            if isinstance(item, dict) and item.get("model_id"):
                verdict = "promoted" if item.get("promoted") else "rejected"
                decisions[str(item["model_id"])] = verdict
    return champion_ids, decisions


def _read_ledger(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning(
            "ignoring unreadable ClearML champion ledger %s: %s", path, first_line(exc, ERROR_CHARS)
        )
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)}


def _ledger_events(offline_dir: Path, models: Sequence[Row]) -> list[ChampionEvent]:
    """Champion decisions from ``champions.json`` (written online and offline)."""
    from housing.tracking.offline import CHAMPIONS_FILE

    algorithms = {str(m["model_id"]): str(m.get("algorithm") or "") for m in models}
    events = []
    for name, entry in _read_ledger(offline_dir / CHAMPIONS_FILE).items():
        for item in entry.get("history") or ():
            if not isinstance(item, dict):
                continue
            events.append(
                ChampionEvent(
                    backend="clearml",
                    registry_name=str(item.get("registry_name") or name),
                    version=str(item.get("challenger_version") or ""),
                    value=as_float(item.get("challenger_value")),
                    metric=str(item.get("metric") or entry.get("metric") or ""),
                    promoted=bool(item.get("promoted")),
                    previous_version=None
                    if (v := item.get("champion_version")) in (None, "")
                    else str(v),
                    previous_value=as_float(item.get("champion_value")),
                    decided_at=str(item.get("decided_at") or ""),
                    reason=str(item.get("reason") or ""),
                    model=algorithms.get(str(item.get("model_id")), ""),
                )
            )
    return sorted(events, key=lambda e: (e.decided_at, e.registry_name, _version_key(e.version)))


def _offline_task_row(session: OfflineSession) -> Row:
    from housing.tracking.offline import read_scalars, run_times

    props = session.properties
    params = session.hyperparams
    started, completed = run_times(session)
    metrics = read_scalars(session, summary=True)
    metrics.update(read_scalars(session))
    return _task_row(
        started,
        completed,
        metrics,
        task_id=session.task_id,
        name=session.name,
        project=session.project,
        stage=_stage(props.get("stage"), session.tags, str(session.task.get("type") or "")),
        model=_model_param(params),
        pipeline_run_id=props.get("pipeline_run_id", ""),
        status=session.status,
        tags=tuple(session.tags),
        source="offline",
    )


def _task_row(
    started: datetime | None, completed: datetime | None, metrics: Mapping[str, Any], **row: Any
) -> Row:
    """An experiment row: ``row``, the times and the reported :data:`METRIC_COLUMNS`."""
    return {
        **row,
        "started": iso(started),
        "completed": iso(completed),
        "duration_sec": (
            round((completed - started).total_seconds(), 3) if started and completed else None
        ),
        **{m: float(metrics[m]) for m in METRIC_COLUMNS if m in metrics},
    }


def _offline_model_row(
    session: OfflineSession,
    model: OfflineModel,
    champion_ids: Mapping[str, str],
    decisions: Mapping[str, str],
) -> Row:
    meta = model.metadata
    lineage = _mapping(meta.get("metadata"))
    return _model_row(
        lineage,
        _mapping(meta.get("metrics")),
        model_id=model.model_id,
        name=model.name,
        version=model.version or "",
        framework=model.framework,
        algorithm=str(meta.get("algorithm") or _tag_value(model.tags, "algorithm") or ""),
        uri=model.weights_path.as_uri() if model.weights_path is not None else "",
        created=_iso_text(lineage.get("created_at")),
        tags=tuple(model.tags),
        champion=champion_ids.get(model.name) == model.model_id,
        champion_decision=decisions.get(model.model_id, ""),
        task_id=session.task_id,
        pipeline_run_id=str(meta.get("pipeline_run_id") or ""),
        source="offline",
    )


def _model_row(lineage: Mapping[str, Any], metrics: Mapping[str, Any], **row: Any) -> Row:
    """A model row: ``row``, the :data:`MODEL_METRIC_COLUMNS` and the lineage columns."""
    return {
        **row,
        **{m: as_float(metrics.get(m)) for m in MODEL_METRIC_COLUMNS},
        **{key: str(lineage.get(key) or "") for key in ("data_md5", "git_commit", "config_hash")},
        "sha256": str(lineage.get("model_sha256") or ""),
    }


# ------------------------------------------------------------------ ClearML server


def _read_server(
    got: Collected, cml: ClearMLSettings, env: Mapping[str, str], tags: Sequence[str]
) -> None:
    """Every task and model of the project through the SDK's query API (it pages)."""
    from clearml.backend_api.session import Session
    from clearml.backend_interface.session import SendError

    session = Session(
        api_key=env.get(cml.access_key_env, ""),
        secret_key=env.get(cml.secret_key_env, ""),
        host=cml.api_host,
        http_retries_config={"total": 1, "connect": 1, "read": 1, "backoff_factor": 0.2},
    )
    try:
        with clearml_quirks.default_session(session):
            _query_server(got, tags)
    except SendError as exc:  # one line, as the server said it (not the request dump)
        meta = getattr(exc.result, "meta", None)
        endpoint = getattr(getattr(meta, "endpoint", None), "name", None) or "request"
        code, message = getattr(meta, "result_code", ""), getattr(meta, "result_msg", "")
        raise HousingError(
            f"ClearML {endpoint} on {cml.api_host}: HTTP {code} {message}".rstrip()
        ) from None
    task_pipeline = {r["task_id"]: r["pipeline_run_id"] for r in got.experiments}
    for row in got.models:
        if not row["pipeline_run_id"]:
            row["pipeline_run_id"] = task_pipeline.get(row["task_id"], "")


def _query_server(got: Collected, tags: Sequence[str]) -> None:
    """Tasks and models of ``got.project`` through the SDK's default session."""
    from clearml import Model, Task

    if Task.get_project_id(got.project, search_hidden=False) is None:
        got.note = f"no project {got.project!r} on the ClearML server"
        return
    # By name, not task_filter={"project": [id]}: clearml 2.1.12's _query_tasks pops that
    # key on the first page, so later pages would list every project's tasks.
    tasks = Task.query_tasks(
        project_name=got.project,
        additional_return_fields=_TASK_FIELDS,
        task_filter={"order_by": ["created"], **({"tags": ["__$all", *tags]} if tags else {})},
    )
    models = Model.query_models(project_name=got.project, include_archived=True)
    got.experiments.extend(
        _server_task_row(_plain(t), got.project) for t in tasks if isinstance(t, dict)
    )
    got.models.extend(_server_model_row(_model_fields(m)) for m in models)


def _plain(value: Any) -> Any:
    """SDK response objects (``to_dict``) and their containers as plain dicts and lists."""
    if not isinstance(value, dict) and hasattr(value, "to_dict"):  # some are dict subclasses
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _model_fields(model: Any) -> dict[str, Any]:
    """The fields of a ``clearml.Model`` the model row reads (one ``models.get_by_id``)."""
    return {
        "id": model.id,
        "name": model.name,
        "framework": model.framework,
        "uri": model.url,
        "tags": list(model.tags or ()),
        "comment": model.comment,
        "metadata": _plain(model.get_all_metadata()),
        "task": model.original_task,
        "created": clearml_quirks.model_created(model),
    }


def _server_task_row(task: Mapping[str, Any], project: str) -> Row:
    from housing.tracking.offline import RUN_COMPLETED, RUN_STARTED

    params = _server_hyperparams(task.get("hyperparams"))
    props = params.get("properties", {})
    scalars: dict[str, float] = {}
    summary: dict[str, float] = {}
    for variants in (task.get("last_metrics") or {}).values():
        for item in (variants or {}).values() if isinstance(variants, dict) else ():
            value = as_float(item.get("value")) if isinstance(item, dict) else None
            if value is None:
                continue
            metric, variant = str(item.get("metric") or ""), str(item.get("variant") or "")
            if metric == "Summary":
                summary[variant] = value
            else:
                scalars[f"{metric}/{variant}" if variant != metric else metric] = value
    metrics = {**summary, **scalars}
    # an imported offline run: its own times, not the import's
    started = parse_time(props.get(RUN_STARTED)) or parse_time(task.get("started"))
    started = started or parse_time(task.get("created"))
    completed = parse_time(props.get(RUN_COMPLETED)) or parse_time(task.get("completed"))
    tags = tuple(str(t) for t in task.get("tags") or ())
    return _task_row(
        started,
        completed,
        metrics,
        task_id=str(task.get("id") or ""),
        name=str(task.get("name") or ""),
        project=project,
        stage=_stage(props.get("stage"), tags, str(task.get("type") or "")),
        model=_model_param(params),
        pipeline_run_id=props.get("pipeline_run_id", ""),
        status=str(task.get("status") or ""),
        tags=tags,
        source="server",
    )


def _server_hyperparams(raw: Any) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for section, items in (raw or {}).items() if isinstance(raw, dict) else ():
        if isinstance(items, dict):
            out[str(section)] = {
                str(k): str(v.get("value", "")) for k, v in items.items() if isinstance(v, dict)
            }
    return out


def _server_model_row(model: Mapping[str, Any]) -> Row:
    from housing.tracking.offline import comment_json

    record = comment_json(str(model.get("comment") or ""))
    tags = tuple(str(t) for t in model.get("tags") or ())
    metadata = {
        str(k): str(v.get("value", "")) if isinstance(v, dict) else str(v)
        for k, v in (model.get("metadata") or {}).items()
    }
    lineage = {**metadata, **_mapping(record.get("metadata"))}
    lineage["model_sha256"] = lineage.get("model_sha256") or _tag_value(tags, "sha256")
    metrics = _mapping(record.get("metrics"))
    for key, value in metadata.items():
        if key.startswith("metric:"):
            metrics.setdefault(key.split(":", 1)[1], value)
    return _model_row(
        lineage,
        metrics,
        model_id=str(model.get("id") or ""),
        name=str(model.get("name") or ""),
        version=str(record.get("version") or _tag_value(tags, "version") or ""),
        framework=str(model.get("framework") or ""),
        algorithm=str(record.get("algorithm") or _tag_value(tags, "algorithm") or ""),
        uri=str(model.get("uri") or ""),
        created=_iso_text(model.get("created")),
        tags=tags,
        champion="champion" in tags,
        champion_decision="",
        task_id=str(model.get("task") or record.get("task_id") or ""),
        pipeline_run_id=str(record.get("pipeline_run_id") or ""),
        source="server",
    )


# --------------------------------------------------------------------------- MLflow


def _local_store_missing(uri: str) -> Path | None:
    """The local store's path when it does not exist (reading must not create it);
    ``uri`` is resolved (:func:`~housing.tracking.mlflow.resolve_uri`: absolute)."""
    from housing.tracking.mlflow import local_store_path

    path = local_store_path(uri, Path("/"))
    if path is None or (path.is_file() if uri.startswith("sqlite:") else path.is_dir()):
        return None
    return path


def collect_mlflow(
    settings: Settings,
    *,
    project: str | None = None,
    tags: Sequence[str] = (),
    stage: str | None = None,
    last_n: int | None = None,
) -> Collected:
    """MLflow stage runs of the experiment and the registry versions they registered."""
    from housing.tracking.mlflow import is_server_uri, resolve_uri  # the tracker's

    cfg = settings.mlflow
    uri = resolve_uri(cfg.tracking_uri, settings.root)
    registry = cfg.registry_uri
    registry_uri = resolve_uri(registry, settings.root) if registry else None
    name = project or cfg.experiment
    alias = settings.registry.champion_alias
    source = "server" if is_server_uri(uri) else "local"
    got = Collected("mlflow", source, uri, name)
    filters = {"tags": tuple(tags), "stage": stage, "last_n": last_n}
    missing = _local_store_missing(uri)
    if missing is not None:
        got.note = f"no MLflow store at {missing}"
        return _finish(got, settings, filters)
    try:
        _read_mlflow(got, uri, registry_uri, alias, settings.selection.metric)
    except Exception as exc:  # any store/HTTP error: report it, keep the other exports
        got.error = f"MLflow {uri}: {type(exc).__name__}: {first_line(exc, ERROR_CHARS)}"
        return got
    return _finish(got, settings, filters)


def _read_mlflow(
    got: Collected, uri: str, registry_uri: str | None, alias: str, metric: str
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=registry_uri)
    experiment = client.get_experiment_by_name(got.project)
    if experiment is None:
        got.note = f"no MLflow experiment {got.project!r}"
        return
    runs = _paged(
        lambda token: client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.\"housing.run_type\" = 'stage'",
            max_results=1000,
            page_token=token,
        )
    )
    got.experiments.extend(_mlflow_run_row(run, got.project, got.source) for run in runs)
    run_ids = {r["task_id"] for r in got.experiments}
    stage_of = {r["task_id"]: r["pipeline_run_id"] for r in got.experiments}
    champions: dict[str, str] = {}
    for model in _paged(
        lambda token: client.search_registered_models(max_results=100, page_token=token)
    ):
        version = (model.aliases or {}).get(alias)
        if version is not None:
            champions[str(model.name)] = str(version)
    versions = [
        v
        for v in _paged(
            lambda token: client.search_model_versions(max_results=1000, page_token=token)
        )
        if v.run_id in run_ids
    ]
    from housing.tracking.mlflow import version_record

    tagged = [(v, version_record(client, v)) for v in versions]
    for version, tags in tagged:
        row = _mlflow_version_row(version, tags, champions, got.source)
        row["pipeline_run_id"] = row["pipeline_run_id"] or stage_of.get(row["task_id"], "")
        got.models.append(row)
    got.champions = _mlflow_events(tagged, metric)


def _paged(fetch: Callable[[str | None], Any]) -> list[Any]:
    items: list[Any] = []
    token: str | None = None
    while True:
        page = fetch(token)
        items.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return items


def _mlflow_run_row(run: Any, project: str, source: str) -> Row:
    tags: dict[str, str] = dict(run.data.tags or {})
    params: dict[str, str] = dict(run.data.params or {})
    info = run.info
    started = parse_time(info.start_time)
    completed = parse_time(info.end_time)
    labels = tuple(t for t in tags.get("housing.tags", "").split(",") if t)
    stage = tags.get("housing.stage", "")
    return _task_row(
        started,
        completed,
        dict(run.data.metrics or {}),
        task_id=str(info.run_id),
        name=str(info.run_name or tags.get("mlflow.runName", "")),
        project=project,
        stage=_stage(stage, labels, ""),
        model=params.get("train_params.model") or params.get("evaluate.model") or "",
        pipeline_run_id=tags.get("housing.pipeline_run_id", ""),
        status=_MLFLOW_STATUS.get(str(info.status), str(info.status).lower()),
        tags=labels,
        source=source,
    )


def _mlflow_version_row(
    version: Any, tags: Mapping[str, str], champions: Mapping[str, str], source: str
) -> Row:
    name, number = str(version.name), str(version.version)
    labels = tuple(k.removeprefix("tag.") for k in sorted(tags) if k.startswith("tag."))
    return _model_row(
        tags,
        {m: tags.get(f"metric.{m}") for m in MODEL_METRIC_COLUMNS},
        model_id=f"models:/{name}/{number}",
        name=name,
        version=number,
        framework="sklearn",  # MLflowTracker always logs the sklearn flavor
        algorithm=tags.get("algorithm", ""),
        uri=str(version.source or ""),
        created=iso(parse_time(version.creation_timestamp)),
        tags=labels,
        champion=champions.get(name) == number,
        champion_decision=tags.get("champion.decision", ""),
        task_id=str(version.run_id or ""),
        pipeline_run_id=tags.get("housing.pipeline_run_id", ""),
        source=source,
    )


def _mlflow_events(
    versions: Sequence[tuple[Any, Mapping[str, str]]], default_metric: str
) -> list[ChampionEvent]:
    """Champion decisions from the versions' ``champion.*`` tags, in decision order.

    A rejected challenger's tags do not name the champion it faced; it is the last
    version promoted before it (what the gate compared against).
    """
    decided = []
    for version, tags in versions:
        if tags.get("champion.decision") in ("promoted", "rejected"):
            decided.append((tags.get("champion.decided_at", ""), version, tags))
    decided.sort(key=lambda d: (str(d[1].name), d[0], _version_key(d[1].version)))
    current: dict[str, tuple[str, float | None]] = {}
    events = []
    for decided_at, version, tags in decided:
        name, number = str(version.name), str(version.version)
        metric = tags.get("champion.metric") or default_metric
        value = as_float(tags.get(f"metric.{metric}"))
        promoted = tags["champion.decision"] == "promoted"
        before = current.get(name)
        events.append(
            ChampionEvent(
                backend="mlflow",
                registry_name=name,
                version=number,
                value=value,
                metric=metric,
                promoted=promoted,
                previous_version=before[0] if before else None,
                previous_value=before[1] if before else None,
                decided_at=decided_at,
                reason=tags.get("champion.reason", ""),
                model=tags.get("algorithm", ""),
            )
        )
        if promoted:
            current[name] = (number, value)
    return sorted(events, key=lambda e: (e.decided_at, e.registry_name, _version_key(e.version)))


# --------------------------------------------------------------------------- helpers


def _stage(recorded: str | None, tags: Iterable[str], task_type: str) -> str:
    if recorded:
        return recorded
    for tag in tags:
        if tag in STAGES:
            return tag
    return _TASK_TYPE_STAGE.get(task_type, "")


def _model_param(params: Mapping[str, Mapping[str, str]]) -> str:
    for section in ("train_params", "evaluate"):
        value = (params.get(section) or {}).get("model")
        if value:
            return value
    return ""


def _tag_value(tags: Iterable[str], prefix: str) -> str | None:
    for tag in tags:
        if tag.startswith(f"{prefix}:"):
            return tag.split(":", 1)[1]
    return None


def parse_time(value: Any) -> datetime | None:
    """A UTC datetime from a datetime, ISO 8601 text or epoch milliseconds; else ``None``."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value) / 1000.0, tz=UTC) if value > 0 else None
    text = str(value).strip()
    if text.isdigit():
        return parse_time(int(text))
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def iso(value: datetime | None) -> str:
    """ISO 8601 in UTC with seconds, or empty."""
    if value is None:
        return ""
    return value.astimezone(UTC).isoformat(timespec="seconds")


def _iso_text(value: Any) -> str:
    parsed = parse_time(value)
    return iso(parsed) if parsed is not None else str(value or "")


def as_float(value: Any) -> float | None:
    """``value`` as a finite float, else ``None`` (booleans and empty text too)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _mapping(value: Any) -> dict[str, Any]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}
