"""``housing gc``: retention for the stores every run grows.

Three stores, each pruned by its own tool's rules:

- **MLflow** (a local store: ``sqlite:///`` or a folder): runs are deleted with the
  client, then purged with their artifacts by ``mlflow gc`` (MLflow's own garbage
  collection, run as a child process for exactly those runs and logged models); model
  versions that are not kept are deleted with their logged models.
- **ClearML offline sessions** (``clearml.offline_dir``): a closed session that
  ``housing clearml sync`` recorded as imported into the configured server
  (``imported.json``) is deleted (its folder and zip); a session not yet synced never is.
- **The DVC cache**: ``dvc gc --workspace`` (DVC's API): objects the workspace does not use.

What is kept (``gc.keep`` = N, ``gc.older_than``): the N newest pipeline runs; the
champion (any alias, in MLflow; the champion ledger, offline) and the last N versions of
each registered model, with the whole pipeline run each comes from; pipeline runs with a
run still RUNNING; with ``older_than``, every pipeline run younger than that. Nothing
here prints: :class:`GcResult` says what was (or, with ``dry_run``, would be) freed.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from housing.errors import HousingError, first_line

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

    from housing.config import Settings
    from housing.tracking.offline import OfflineSession

log = logging.getLogger(__name__)

#: Run statuses of a run still going (or left open by a killed process: never pruned).
_OPEN_STATUSES: Final = frozenset({"RUNNING", "SCHEDULED"})
#: DVC's gc says each object it would remove on this logger ("Removing <path>").
_DVC_GC_LOGGER: Final = "dvc_data.hashfile.gc"
_PAGE: Final = 1000


class GcError(HousingError):
    """A store could not be collected; the message names it."""


@dataclass
class StoreReport:
    """What gc freed (or would free) in one store."""

    store: str  # mlflow | clearml | dvc
    location: str
    deleted: dict[str, int] = field(default_factory=dict)  # what -> how many
    files: int = 0
    bytes: int = 0
    kept: str = ""  # what was kept, in words
    skipped: str | None = None  # why the store was left alone

    def line(self, dry_run: bool) -> str:
        """``mlflow (…/mlflow.db): deleted 9 runs, …; freed 412 files, 3.6 MB (kept …)``."""
        if self.skipped is not None:
            return f"{self.store} ({self.location}): {self.skipped}"
        what = ", ".join(f"{n} {name}" for name, n in self.deleted.items() if n) or "nothing"
        verb, freed = ("would delete", "would free") if dry_run else ("deleted", "freed")
        size = f"{self.files} files, {self.bytes / 1e6:.2f} MB"
        kept = f" (kept {self.kept})" if self.kept else ""
        return f"{self.store} ({self.location}): {verb} {what}; {freed} {size}{kept}"


@dataclass
class GcResult:
    """What one ``housing gc`` did, per store."""

    dry_run: bool
    stores: list[StoreReport]

    def lines(self) -> list[str]:
        head = ["dry run: nothing deleted"] if self.dry_run else []
        return head + [store.line(self.dry_run) for store in self.stores]

    @property
    def bytes(self) -> int:
        return sum(store.bytes for store in self.stores)


def collect(settings: Settings, *, dry_run: bool = False) -> GcResult:
    """Prune the MLflow store, the synced ClearML sessions and the DVC cache of
    ``settings.root`` as ``settings.gc`` says (see the module docstring)."""
    from housing.tracking.stores import check_stores

    check_stores(settings, ("mlflow", "clearml"))  # a damaged store: one line, nothing done
    keep = settings.gc.keep
    cutoff = datetime.now(UTC) - settings.gc.older_than if settings.gc.older_than else None
    return GcResult(
        dry_run,
        [
            collect_mlflow(settings, keep, cutoff, dry_run),
            collect_clearml(settings, keep, cutoff, dry_run),
            collect_dvc(settings.root, dry_run),
        ],
    )


# --------------------------------------------------------------------------- helpers


def _usage(paths: Iterable[Path]) -> tuple[int, int]:
    """(files, bytes) under ``paths`` (files or folders; missing ones count nothing)."""
    files = size = 0
    for path in paths:
        if path.is_file():
            files, size = files + 1, size + path.stat().st_size
            continue
        for folder, _, names in os.walk(path):
            for name in names:
                try:
                    size += (Path(folder) / name).stat().st_size
                    files += 1
                except OSError:
                    continue
    return files, size


def _newest(starts: Mapping[str, float], keep: int) -> set[str]:
    """The ``keep`` keys with the latest start."""
    return set(sorted(starts, key=lambda k: starts[k], reverse=True)[:keep])


def _younger(starts: Mapping[str, float], cutoff: datetime | None) -> set[str]:
    """The keys started after ``cutoff`` (all of them are old enough without one)."""
    if cutoff is None:
        return set()
    return {key for key, start in starts.items() if start > cutoff.timestamp()}


def _local_path(uri: str | None) -> Path | None:
    """The folder of a local artifact location (``file:`` URI or plain path)."""
    if not uri:
        return None
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    return None if "://" in uri else Path(uri)


# --------------------------------------------------------------------------- MLflow


def _paged(fetch: Callable[[str | None], Any]) -> Iterator[Any]:
    token: str | None = None
    while True:
        page = fetch(token)
        yield from page
        token = page.token
        if not token:
            return


def _pipeline_of(run: Run) -> str:
    from housing.tracking.mlflow import TAG_PARENT, TAG_PIPELINE_RUN_ID

    tags = run.data.tags
    return str(tags.get(TAG_PIPELINE_RUN_ID) or tags.get(TAG_PARENT) or run.info.run_id)


def _versions_page(client: MlflowClient, name: str, token: str | None) -> Any:
    return client.search_model_versions(f"name = '{name}'", page_token=token)


def _kept_versions(client: MlflowClient, keep: int) -> tuple[list[Any], list[Any]]:
    """(kept, others): per registered model, versions holding an alias (the champion)
    or among its ``keep`` highest numbers are kept."""
    kept: list[ModelVersion] = []
    others: list[ModelVersion] = []
    models = _paged(lambda token: client.search_registered_models(page_token=token))
    for model in models:
        aliased = {str(v) for v in (model.aliases or {}).values()}
        versions = _paged(functools.partial(_versions_page, client, model.name))
        ordered = sorted(versions, key=lambda v: int(v.version), reverse=True)
        for rank, version in enumerate(ordered):
            (kept if rank < keep or str(version.version) in aliased else others).append(version)
    return kept, others


def collect_mlflow(
    settings: Settings, keep: int, cutoff: datetime | None, dry_run: bool
) -> StoreReport:
    """Prune the local MLflow store of ``settings.mlflow`` (a server is left alone)."""
    from housing.tracking.mlflow import is_server_uri, local_store_path, resolve_uri

    uri = resolve_uri(settings.mlflow.tracking_uri, settings.root)
    report = StoreReport("mlflow", uri)
    if is_server_uri(uri):
        report.skipped = "a tracking server: collect it on the server (`mlflow gc`)"
        return report
    store = local_store_path(uri, settings.root)
    if store is None or not store.exists():
        report.skipped = "no store yet"
        return report
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    registry = settings.mlflow.registry_uri
    client = MlflowClient(
        tracking_uri=uri, registry_uri=resolve_uri(registry, settings.root) if registry else None
    )
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs: list[Run] = list(
        _paged(
            lambda token: client.search_runs(
                experiments, max_results=_PAGE, page_token=token, run_view_type=ViewType.ALL
            )
        )
    )
    live = [run for run in runs if run.info.lifecycle_stage == "active"]
    pipeline = {run.info.run_id: _pipeline_of(run) for run in runs}
    starts: dict[str, float] = {}
    for run in live:
        key = pipeline[run.info.run_id]
        start = (run.info.start_time or 0) / 1000
        starts[key] = min(starts.get(key, start), start)
    kept_versions, other_versions = _kept_versions(client, keep)
    protected = _newest(starts, keep) | _younger(starts, cutoff)
    protected |= {pipeline[v.run_id] for v in kept_versions if v.run_id in pipeline}
    protected |= {pipeline[r.info.run_id] for r in live if r.info.status in _OPEN_STATUSES}
    doomed = [run for run in live if pipeline[run.info.run_id] not in protected]
    doomed_ids = {run.info.run_id for run in doomed}
    versions = [v for v in other_versions if v.run_id in doomed_ids]
    kept_models = {str(v.model_id) for v in kept_versions if getattr(v, "model_id", None)}
    models = [
        m
        for m in _paged(
            lambda token: client.search_logged_models(
                experiments, max_results=_PAGE, page_token=token
            )
        )
        if m.source_run_id in doomed_ids and m.model_id not in kept_models
    ]
    report.deleted = {"runs": len(doomed), "model versions": len(versions)}
    report.deleted["logged models"] = len(models)
    places = [_local_path(run.info.artifact_uri) for run in doomed]
    places += [_local_path(model.artifact_location) for model in models]
    report.files, report.bytes = _usage(p for p in places if p is not None)
    report.kept = f"{len(live) - len(doomed)} runs of {len(protected & set(starts))} pipelines"
    if dry_run or not (doomed or models):
        return report
    for version in versions:
        client.delete_model_version(version.name, version.version)
    for model in models:
        client.delete_logged_model(model.model_id)
    for run in doomed:
        client.delete_run(run.info.run_id)
    _mlflow_gc(uri, sorted(doomed_ids), [m.model_id for m in models])
    for place in places:  # mlflow gc removes <run>/artifacts; its empty folder stays
        if place is not None and place.parent.is_dir() and not any(place.parent.iterdir()):
            place.parent.rmdir()
    return report


def _mlflow_gc(uri: str, run_ids: list[str], model_ids: list[str]) -> None:
    """``mlflow gc`` for exactly these deleted runs and logged models (metadata and
    artifacts), in a child process: MLflow's own collection, with its own global state."""
    cmd = [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri]
    cmd += ["--tracking-uri", uri]
    if run_ids:
        cmd += ["--run-ids", ",".join(run_ids)]
    if model_ids:
        cmd += ["--logged-model-ids", ",".join(model_ids)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        why = first_line(lines[-1]) if lines else f"exit code {done.returncode}"
        raise GcError(f"mlflow gc of {uri} failed: {why}")


# --------------------------------------------------------------------------- ClearML


def collect_clearml(
    settings: Settings, keep: int, cutoff: datetime | None, dry_run: bool
) -> StoreReport:
    """Delete the offline sessions already synced to ``clearml.server.api_host``, except
    those of kept pipelines and kept models (champion ledger, last ``keep`` versions)."""
    from housing.tracking import offline

    cml = settings.clearml
    report = StoreReport("clearml", str(cml.offline_dir))
    sessions = offline.list_sessions(cml.offline_dir)
    if not sessions:
        report.skipped = "no offline sessions"
        return report
    host = cml.server.api_host.rstrip("/")
    imported = offline.read_json_file(cml.offline_dir / offline.IMPORTED_FILE, {})
    synced = {
        task_id
        for task_id, entries in ((imported or {}).get("sessions") or {}).items()
        if any(isinstance(e, dict) and e.get("api_host") == host for e in entries or ())
    }
    models = _kept_offline_models(cml.offline_dir, keep)
    pipeline = {s.task_id: s.properties.get("pipeline_run_id") or s.task_id for s in sessions}
    starts: dict[str, float] = {}
    for session in sessions:
        key, start = pipeline[session.task_id], session.created.timestamp()
        starts[key] = min(starts.get(key, start), start)
    protected = _newest(starts, keep) | _younger(starts, cutoff)
    protected |= {pipeline[s.task_id] for s in sessions if s.task_id in models or not s.closed}
    doomed = [
        s
        for s in sessions
        if s.closed and s.task_id in synced and pipeline[s.task_id] not in protected
    ]
    waiting = sum(1 for s in sessions if s.task_id not in synced)
    report.deleted = {"synced sessions": len(doomed)}
    report.files, report.bytes = _usage(_session_paths(doomed))
    report.kept = f"{len(sessions) - len(doomed)} sessions, {waiting} not yet synced"
    if not dry_run:
        for path in _session_paths(doomed):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return report


def _session_paths(sessions: Iterable[OfflineSession]) -> Iterator[Path]:
    for session in sessions:
        yield session.folder
        if session.zip_path is not None:
            yield session.zip_path


def _kept_offline_models(offline_dir: Path, keep: int) -> set[str]:
    """Sessions (task ids) holding a kept offline model: a champion of the ledger, or one
    of the ``keep`` newest versions of a registry name."""
    from housing.tracking import offline

    kept: set[str] = set()
    champions = offline.read_json_file(offline_dir / offline.CHAMPIONS_FILE, {})
    for entry in (champions or {}).values():
        if isinstance(entry, dict) and entry.get("task_id"):
            kept.add(str(entry["task_id"]))
    registry = offline.read_json_file(offline_dir / offline.REGISTRY_FILE, {})
    for entry in (registry or {}).values():
        versions = [v for v in (entry or {}).get("versions") or () if isinstance(v, dict)]
        versions.sort(key=lambda v: int(v.get("version") or 0), reverse=True)
        kept.update(str(v["task_id"]) for v in versions[:keep] if v.get("task_id"))
    return kept


# --------------------------------------------------------------------------- DVC


class _Removals(logging.Handler):
    """Collects the paths DVC's gc names ("Removing <path>") on a dry run."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.paths: list[Path] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "Removing %s" and record.args:
            self.paths.append(Path(str(record.args[0])))  # type: ignore[index]


def collect_dvc(root: Path, dry_run: bool) -> StoreReport:
    """``dvc gc --workspace --force`` (``--dry``): cache objects the workspace does not use."""
    report = StoreReport("dvc", str(root / ".dvc" / "cache"))
    if not (root / ".dvc").is_dir():
        report.skipped = "not a DVC repository"
        return report
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from housing.repro import quiet_dvc

    quiet_dvc()
    try:
        repo = Repo(str(root))
        cache = Path(repo.cache.local.path)
        report.location = str(cache)
        before = {p: p.stat().st_size for p in cache.rglob("*") if p.is_file()}
        removals, logger = _Removals(), logging.getLogger(_DVC_GC_LOGGER)
        level, propagate = logger.level, logger.propagate
        logger.addHandler(removals)  # only here: DVC's console handler would print each
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            repo.gc(workspace=True, force=True, dry=dry_run)
        finally:
            logger.removeHandler(removals)
            logger.setLevel(level)
            logger.propagate = propagate
    except DvcException as exc:
        raise GcError(f"dvc gc in {root}: {first_line(exc, whole=True)}") from None
    if dry_run:
        gone = [p for p in removals.paths if p in before]
    else:
        gone = [p for p in before if not p.exists()]
    report.deleted = {"cache objects": len(gone)}
    report.files, report.bytes = len(gone), sum(before[p] for p in gone)
    report.kept = f"{len(before) - len(gone)} objects the workspace uses"
    return report
