"""MLflow offline-first: a stage whose tracking server is unreachable records locally.

A server URI (http/https) is probed once per process (``GET /health`` within
``mlflow.timeout_sec``). Unreachable: the stage records into the spool, a local sqlite
store in ``mlflow.spool_dir``, and one warning line says so. A server that dies during
the stage: the first failed call switches the tracker to the spool, which replays the
stage's calls so far (a journal), so the spooled run is complete. Spooled runs carry
the server's URI (``housing.spool.target``); :func:`sync` replays them to it later, once
each, with their times, params, metrics, artifacts, models and champion decisions.

A new spool store is made from MLflow's empty schema
(:func:`housing.tracking.mlflow_store.create_store`), not by MLflow's migrations.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing.errors import first_line
from housing.io import file_lock
from housing.tracking.base import ChampionDecision, RegisteredModel, StageRun
from housing.tracking.lineage import decide_champion
from housing.tracking.mlflow import (
    TAG_PARENT,
    TAG_PIPELINE_RUN_ID,
    TAG_RUN_TYPE,
    MLflowTracker,
    close_orphans,
    is_server_uri,
    probe,
    unreachable,
)
from housing.tracking.mlflow_store import create_store

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from housing.config import MLflowSettings, Settings

__all__ = ["SpoolingTracker", "SyncResult", "open_tracker", "pending", "sync"]

log = logging.getLogger(__name__)

TAG_TARGET = "housing.spool.target"  # the server a spooled run is meant for
TAG_REASON = "housing.spool.reason"
TAG_PARTIAL = "housing.spool.partial_run"  # the server run a mid-stage switch left
TAG_SOURCE = "housing.spool.source_run"  # on the server: the spooled run replayed
TAG_COMPLETE = "housing.spool.complete"  # on the server: the replay finished
TAG_SYNCED = "housing.spool.synced_to"  # in the spool: the server run it became
_SPOOL_ONLY = (TAG_SYNCED, TAG_PARTIAL, TAG_REASON, "housing.pid", TAG_PARENT)

#: (uri, pid) -> why the server was unreachable ("" reachable): one probe per process.
_OFFLINE: dict[tuple[str, int], str] = {}
_ANNOUNCED: set[tuple[str, int]] = set()  # one warning line per server and process


def _offline_reason(uri: str, timeout_sec: float) -> str | None:
    key = (uri, os.getpid())
    if key not in _OFFLINE:
        reason = probe(uri, timeout_sec)
        _OFFLINE[key] = reason or ""
        if reason:
            _say_offline(uri, reason)
    return _OFFLINE[key] or None


def _say_offline(uri: str, reason: str) -> None:
    key = (uri, os.getpid())
    _OFFLINE[key] = reason  # the rest of this process records to the spool at once
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    log.warning(
        "mlflow: %s unreachable (%s); recording to the local spool, run `housing mlflow sync` "
        "later",
        uri,
        reason,
    )


def spool_uri(spool_dir: Path) -> str:
    """The spool's sqlite store URI."""
    return f"sqlite:///{Path(spool_dir).resolve() / 'mlflow.db'}"


def open_tracker(settings: Settings) -> MLflowTracker:
    """The MLflow tracker of a stage: plain for a local store; for a server, one that
    falls back to the spool. Local stores resolve against :func:`housing.runs.store_root`."""
    from housing.runs import store_root

    cfg, alias = settings.mlflow, settings.registry.champion_alias
    root = store_root(settings.root)
    if not is_server_uri(cfg.tracking_uri):
        return MLflowTracker(cfg.tracking_uri, cfg.experiment, cfg.registry_uri, alias, root=root)
    return SpoolingTracker(cfg, alias, root, spool_dir(settings))


def spool_dir(settings: Settings) -> Path:
    """``mlflow.spool_dir`` in the repository's store (not a DVC experiment's copy)."""
    from housing.runs import store_root

    folder = settings.mlflow.spool_dir
    try:
        return store_root(settings.root) / folder.relative_to(settings.root)
    except ValueError:  # a spool outside the project stays where it is
        return folder


class SpoolingTracker(MLflowTracker):
    """An MLflow tracker for a server that records to the local spool when it cannot.

    Every call goes to the server tracker until one fails for want of the server; the
    calls so far (the journal) are then replayed into a spool tracker, which takes over.
    Attributes (``client``, ``run_id``...) are the active tracker's.
    """

    def __init__(self, cfg: MLflowSettings, champion_alias: str, root: Path, spool: Path) -> None:
        """Probe the server; unreachable: work on the spool from the start."""
        self._cfg, self._alias, self._root = cfg, champion_alias, Path(root)
        self._journal: list[tuple[str, tuple[Any, ...], Any]] = []
        self._registered: dict[tuple[str, str], RegisteredModel] = {}
        self._partial_run: str | None = None
        self._spooling = False
        self._reason = ""
        self.target = cfg.tracking_uri.rstrip("/")
        self.spool_dir = Path(spool)
        reason = _offline_reason(self.target, cfg.timeout_sec)
        if reason is None:
            self._active = MLflowTracker(
                cfg.tracking_uri, cfg.experiment, cfg.registry_uri, champion_alias, root=root
            )
        else:
            self._active = self._open_spool(reason)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_active") or name == "__setstate__":
            raise AttributeError(name)
        return getattr(self._active, name)

    @property
    def spooling(self) -> bool:
        """True once this stage records into the spool."""
        return self._spooling

    def _open_spool(self, reason: str) -> MLflowTracker:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        create_store(self.spool_dir / "mlflow.db")
        self._spooling = True
        self._reason = reason
        return MLflowTracker(
            spool_uri(self.spool_dir), self._cfg.experiment, None, self._alias, root=self._root
        )

    # ----------------------------------------------------------- switching

    def _call(self, name: str, *args: Any) -> Any:
        if self._spooling:
            result = self._on_spool(name, args)
        else:
            try:
                result = getattr(self._active, name)(*args)
            except Exception as exc:
                reason = unreachable(exc)
                if reason is None:
                    raise
                self._switch(reason)
                result = self._on_spool(name, args)
        self._journal.append((name, args, result))
        return result

    def _on_spool(self, name: str, args: tuple[Any, ...]) -> Any:
        mapped = tuple(
            self._registered.get((a.registry_name, a.version), a)
            if isinstance(a, RegisteredModel)
            else a
            for a in args
        )
        if name == "finish_pipeline":
            self._spool_finish_pipeline(str(args[0]), str(args[1]))
            return None
        result = getattr(self._active, name)(*mapped)
        if name == "start":
            self._tag_spooled()
        return result

    def _switch(self, reason: str) -> None:
        """The server went away: replay the stage's calls so far into the spool."""
        _say_offline(self.target, reason)
        self._partial_run = self._active.run_id
        self._active = self._open_spool(reason)
        for name, args, old in self._journal:
            new = self._on_spool(name, args)
            if isinstance(old, RegisteredModel):
                self._registered[(old.registry_name, old.version)] = new

    def _tag_spooled(self) -> None:
        active = self._active
        if active.run_id is None:
            return
        tags = {TAG_TARGET: self.target, TAG_REASON: self._reason}
        if self._partial_run:
            tags[TAG_PARTIAL] = self._partial_run
        for key, value in tags.items():
            active.client.set_tag(active.run_id, key, value)
        if active.parent_run_id:
            active.client.set_tag(active.parent_run_id, TAG_TARGET, self.target)

    # ------------------------------------------------------------ protocol

    def start(self, run: StageRun) -> None:
        """Open the stage run on the server, or in the spool."""
        self._journal.clear()
        self._call("start", run)

    def log_params(self, params: Mapping[str, Any], section: str) -> None:
        """See :meth:`MLflowTracker.log_params`."""
        self._call("log_params", params, section)

    def log_config(self, config: Mapping[str, Any], name: str) -> None:
        """See :meth:`MLflowTracker.log_config`."""
        self._call("log_config", config, name)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """See :meth:`MLflowTracker.log_metrics`."""
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path: Path, name: str | None = None) -> None:
        """See :meth:`MLflowTracker.log_artifact`."""
        self._call("log_artifact", path, name)

    def log_figure(self, figure: Any) -> None:
        """See :meth:`MLflowTracker.log_figure`."""
        self._call("log_figure", figure)

    def log_text(self, text: str) -> None:
        """See :meth:`MLflowTracker.log_text`."""
        self._call("log_text", text)

    def log_trials(self, study: str, trials: Any, best: int) -> None:
        """See :meth:`MLflowTracker.log_trials`."""
        self._call("log_trials", study, trials, best)

    def register_model(self, model: Any) -> RegisteredModel:
        """See :meth:`MLflowTracker.register_model`."""
        result: RegisteredModel = self._call("register_model", model)
        return result

    def champion(self, registry_name: str, metric: str) -> tuple[str, float] | None:
        """The champion on the server; in the spool, the spool's (sync re-decides)."""
        result: tuple[str, float] | None = self._call("champion", registry_name, metric)
        return result

    def promote(self, decision: ChampionDecision, registered: RegisteredModel) -> None:
        """See :meth:`MLflowTracker.promote`."""
        self._call("promote", decision, registered)

    def close(self, status: str, error: str | None = None) -> None:
        """See :meth:`MLflowTracker.close`."""
        self._call("close", status, error)

    def finish_pipeline(self, pipeline_run_id: str, status: str) -> None:
        """Close the pipeline's parent run on the server, or in the spool (a parent is
        made there if none, so that sync closes the server's parent the same way)."""
        self._call("finish_pipeline", pipeline_run_id, status)

    def _spool_finish_pipeline(self, pipeline_run_id: str, status: str) -> None:
        spool = self._active
        experiment_id = spool.experiment_id = spool._ensure_experiment()
        parent = spool._ensure_parent(experiment_id, pipeline_run_id, {})
        spool.client.set_tag(parent, TAG_TARGET, self.target)
        spool.finish_pipeline(pipeline_run_id, status)


# --------------------------------------------------------------------------- sync


@dataclass
class SyncResult:
    """What :func:`sync` did: replayed runs, runs left in the spool, champion decisions."""

    target: str
    replayed: list[str] = field(default_factory=list)
    already: int = 0
    running: int = 0  # stage runs still open in the spool: replayed by a later sync
    left: int = 0
    decisions: list[str] = field(default_factory=list)
    error: str | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def summary(self) -> str:
        """One line."""
        if self.error:
            return f"mlflow sync: {self.error}"
        if self.note:
            return f"mlflow sync: {self.note}"
        if not self.replayed and not self.already and not self.running:
            return f"mlflow sync: nothing to sync for {self.target}"
        text = f"mlflow sync: {len(self.replayed)} run(s) replayed to {self.target}"
        if self.already:
            text += f", {self.already} already there"
        if self.running:
            text += f", {self.running} still running (next sync)"
        if self.decisions:
            text += "; " + "; ".join(self.decisions)
        return text


def _spooled_runs(spool: MlflowClient, target: str) -> list[Run]:
    runs: list[Run] = []
    for experiment in spool.search_experiments():
        runs.extend(
            spool.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.\"{TAG_TARGET}\" = '{target}'",
                max_results=5000,
            )
        )
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def pending(settings: Settings) -> int:
    """How many spooled stage runs wait for ``mlflow.tracking_uri`` (0 without a spool)."""
    cfg, folder = settings.mlflow, spool_dir(settings)
    if not is_server_uri(cfg.tracking_uri) or not (folder / "mlflow.db").is_file():
        return 0
    from mlflow import MlflowClient

    spool = MlflowClient(spool_uri(folder))
    target = cfg.tracking_uri.rstrip("/")
    return sum(
        1
        for run in _spooled_runs(spool, target)
        if run.data.tags.get(TAG_RUN_TYPE) == "stage" and TAG_SYNCED not in run.data.tags
    )


def sync(settings: Settings) -> SyncResult:
    """Replay every spooled run not yet on ``mlflow.tracking_uri``, once each.

    Idempotent: a server run carries ``housing.spool.source_run``; one found complete is
    adopted, one left incomplete by a crash is deleted and replayed. The spool is only
    marked (``housing.spool.synced_to``), never emptied. Champion aliases are re-decided
    against the server's champion (:func:`decide_champion`, ``registry.min_improvement``).
    """
    cfg = settings.mlflow
    target = cfg.tracking_uri.rstrip("/")
    result = SyncResult(target)
    if not is_server_uri(target):
        result.note = f"mlflow.tracking_uri {target} is a local store: nothing to sync"
        return result
    folder = spool_dir(settings)
    if not (folder / "mlflow.db").is_file():
        return result
    from mlflow import MlflowClient

    with file_lock(folder / "sync.lock"):
        spool = MlflowClient(spool_uri(folder))
        for experiment in spool.search_experiments():  # stages killed while spooling
            close_orphans(spool, str(experiment.experiment_id))
        runs = _spooled_runs(spool, target)
        stages = [
            r
            for r in runs
            if r.data.tags.get(TAG_RUN_TYPE) == "stage" and TAG_SYNCED not in r.data.tags
        ]
        result.running = sum(1 for r in stages if r.info.status == "RUNNING")
        stages = [r for r in stages if r.info.status != "RUNNING"]
        wanted = {r.data.tags.get(TAG_PARENT) for r in stages}
        parents = [
            r
            for r in runs
            if r.data.tags.get(TAG_RUN_TYPE) == "pipeline"
            and (TAG_SYNCED not in r.data.tags or r.info.run_id in wanted)
        ]
        reason = probe(target, cfg.timeout_sec)
        if reason is not None:
            result.left = len(stages)
            result.error = (
                f"{target} unreachable ({reason}); {len(stages)} spooled run(s) kept in {folder}"
            )
            return result
        try:
            replayer = _Replayer(settings, spool, result)
            for run in parents:
                replayer.parent(run)
            for run in stages:
                replayer.stage(run)
        except Exception as exc:
            why = unreachable(exc)
            result.left = len(stages) - len(result.replayed) - result.already
            detail = f"unreachable ({why})" if why else first_line(exc, typed=True)
            result.error = (
                f"{target} {first_line(detail, 300)}; {result.left} spooled run(s) kept in {folder}"
            )
    return result


class _Replayer:
    """Copies spooled runs to the server (one sync)."""

    def __init__(self, settings: Settings, spool: MlflowClient, result: SyncResult) -> None:
        from housing.runs import store_root

        cfg = settings.mlflow
        self.server_tracker = MLflowTracker(
            cfg.tracking_uri,
            cfg.experiment,
            cfg.registry_uri,
            settings.registry.champion_alias,
            root=store_root(settings.root),
        )
        self.server: MlflowClient = self.server_tracker.client
        self.spool = spool
        self.min_improvement = float(settings.registry.min_improvement)
        self.result = result
        self.experiment_id = self.server_tracker._ensure_experiment()
        self.server_tracker.experiment_id = self.experiment_id
        self.parents: dict[str, str] = {}  # spool parent run id -> server parent run id

    def _find(self, filter_string: str) -> list[Run]:
        return list(self.server.search_runs([self.experiment_id], filter_string=filter_string))

    def parent(self, run: Run) -> None:
        """The server's parent of this pipeline run (created from the spool's if none)."""
        tags = run.data.tags
        pipeline_id = tags.get(TAG_PIPELINE_RUN_ID, "")
        found = self._find(
            f"tags.\"{TAG_PIPELINE_RUN_ID}\" = '{pipeline_id}' "
            f"and tags.\"{TAG_RUN_TYPE}\" = 'pipeline'"
        )
        found.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
        if found:
            server_id = str(found[0].info.run_id)
            if found[0].info.status == "RUNNING" and run.info.status != "RUNNING":
                self.server.set_terminated(server_id, run.info.status, run.info.end_time)
        else:
            kept = {k: v for k, v in tags.items() if k not in _SPOOL_ONLY}
            kept[TAG_SOURCE] = run.info.run_id
            server_id = self._create(run, kept)
            if run.info.status != "RUNNING":
                self.server.set_terminated(server_id, run.info.status, run.info.end_time)
        self.parents[run.info.run_id] = server_id
        if run.info.status != "RUNNING":  # an open pipeline run is looked at again
            self.spool.set_tag(run.info.run_id, TAG_SYNCED, server_id)

    def stage(self, run: Run) -> None:
        """Replay one spooled stage run (skipped if a complete copy is on the server)."""
        spool_id = str(run.info.run_id)
        for old in self._find(f"tags.\"{TAG_SOURCE}\" = '{spool_id}'"):
            if old.data.tags.get(TAG_COMPLETE) == "true":
                self.spool.set_tag(spool_id, TAG_SYNCED, old.info.run_id)
                self.result.already += 1
                return
            self.server.delete_run(old.info.run_id)  # an earlier sync died half-way
        server_id = self._copy_run(run)
        self._copy_models(spool_id, server_id)
        partial = run.data.tags.get(TAG_PARTIAL)
        if partial:
            self._supersede(partial, server_id)
        self.server.set_tag(server_id, TAG_COMPLETE, "true")
        self.spool.set_tag(spool_id, TAG_SYNCED, server_id)
        self.result.replayed.append(server_id)

    def _create(self, run: Run, tags: dict[str, str]) -> str:
        """A server run with the spooled run's name and start time; its id."""
        created = self.server.create_run(
            self.experiment_id,
            start_time=run.info.start_time,
            tags=tags,
            run_name=run.info.run_name,
        )
        return str(created.info.run_id)

    def _copy_run(self, run: Run) -> str:
        from mlflow.entities import Metric, Param

        spool_id = str(run.info.run_id)
        tags = {k: v for k, v in run.data.tags.items() if k not in _SPOOL_ONLY}
        parent = self.parents.get(run.data.tags.get(TAG_PARENT, ""))
        if parent:
            tags[TAG_PARENT] = parent
        tags[TAG_SOURCE] = spool_id
        server_id = self._create(run, tags)
        params = [Param(k, v) for k, v in run.data.params.items()]
        metrics = [
            Metric(m.key, m.value, m.timestamp, m.step)
            for key in run.data.metrics
            for m in self.spool.get_metric_history(spool_id, key)
        ]
        for start in range(0, max(len(params), len(metrics)), 100):
            self.server.log_batch(
                server_id, params=params[start : start + 100], metrics=metrics[start : start + 100]
            )
        with tempfile.TemporaryDirectory(prefix="housing-sync-") as tmp:
            if self.spool.list_artifacts(spool_id):
                local = self.spool.download_artifacts(spool_id, "", tmp)
                self.server.log_artifacts(server_id, local)
        self.server.set_terminated(server_id, run.info.status, run.info.end_time)
        return server_id

    def _copy_models(self, spool_id: str, server_id: str) -> None:
        from mlflow.entities import LoggedModelOutput

        from housing.quirks.mlflow import version_model_id

        versions = self.spool.search_model_versions(f"run_id = '{spool_id}'")
        for version in sorted(versions, key=lambda v: int(v.version)):
            name = str(version.name)
            model_id = version_model_id(version)  # None from a sqlite registry otherwise
            logged = self.spool.get_logged_model(model_id) if model_id else None
            new = self.server.create_logged_model(
                self.experiment_id,
                name=logged.name if logged else name,
                source_run_id=server_id,
                tags=dict(logged.tags) if logged else {},
                params=dict(logged.params) if logged else {},
                model_type=logged.model_type if logged else None,
            )
            with tempfile.TemporaryDirectory(prefix="housing-sync-") as tmp:
                import mlflow.artifacts

                source = self.spool.get_model_version_download_uri(name, version.version)
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=tmp, tracking_uri=self.spool.tracking_uri
                )
                self.server.log_model_artifacts(new.model_id, local)
            self.server.finalize_logged_model(new.model_id, "READY")
            self.server.log_outputs(server_id, [LoggedModelOutput(new.model_id, step=0)])
            self.server_tracker._ensure_registered_model(name)
            tags = dict(version.tags or {})
            record = {**(dict(logged.tags) if logged else {}), **tags}  # the full record
            spooled = {k: v for k, v in record.items() if k.split(".")[0] == "champion"}
            kept = {k: v for k, v in tags.items() if k.split(".")[0] != "champion"}
            for key, value in spooled.items():
                kept[f"spool.{key}"] = value
            created = self.server.create_model_version(
                name=name,
                source=f"models:/{new.model_id}",
                run_id=server_id,
                tags=kept,
                model_id=new.model_id,
            )
            if "champion.decision" in spooled:
                self._gate(name, str(created.version), record)

    def _gate(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        """Re-decide the champion against the server's; record it like a stage would."""
        from housing.config import greater_is_better

        metric = tags.get("champion.metric", "")
        raw = tags.get(f"metric.{metric}")
        value = float(raw) if raw is not None else float("nan")
        current = self.server_tracker.champion(name, metric)
        decision = decide_champion(
            name,
            version,
            value,
            current,
            metric=metric,
            greater_is_better=greater_is_better(metric),
            min_improvement=self.min_improvement,
        )
        registered = RegisteredModel("mlflow", name, version, f"models:/{name}/{version}")
        self.server_tracker.promote(decision, registered)
        verdict = "promoted" if decision.promoted else "kept the champion"
        self.result.decisions.append(f"{name} v{version}: {verdict} ({decision.reason})")

    def _supersede(self, partial: str, server_id: str) -> None:
        """The server run a mid-stage switch left half-done: point it at its replay."""
        try:
            old = self.server.get_run(partial)
        except Exception as exc:
            if unreachable(exc):
                raise
            return
        self.server.set_tag(partial, "housing.superseded_by", server_id)
        if old.info.status == "RUNNING":
            self.server.set_terminated(partial, "KILLED")
