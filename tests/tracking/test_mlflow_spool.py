"""MLflow offline-first: a dead, absent or silent tracking server costs a stage a few
seconds, its record goes to the local spool, and `housing mlflow sync` replays it once.

Real parts: a real ``mlflow server`` on 127.0.0.1 (killed with SIGKILL and restarted on
the same store), a real listening socket that never answers, real sqlite spools, the
stages run through :func:`housing.runner.execute_stage` and the sync through the CLI.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from housing import runs
from housing.cli import main
from housing.config import Settings, load_settings
from housing.entry import bound_mlflow_http
from housing.runner import execute_stage
from housing.tracking import mlflow_spool, mlflow_store
from housing.tracking.mlflow import MLflowTracker, load_registered_model, version_record
from housing.tracking.mlflow_spool import TAG_PARTIAL, TAG_SOURCE, TAG_SYNCED, TAG_TARGET

from ..conftest import CONF
from ..helpers import WarningLines, serve
from .conftest import free_port, start_server, stop, wait_healthy

#: Added time per stage allowed with a dead or silent server (the issue's figure).
ADDED_LIMIT_SEC = 5.0
BASE = ["tracking=mlflow", "data=synthetic", "data.n_rows=200"]
_BUDGET_VARS = (
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER",
    "HOUSING_MLFLOW_HTTP_BUDGET",
)


def _start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a command's start-up does (the MLflow HTTP budget), and no probe remembered
    from another test of this process."""
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # as entry does
    for name in _BUDGET_VARS:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    bound_mlflow_http()
    monkeypatch.setattr(mlflow_spool, "_OFFLINE", {})
    monkeypatch.setattr(mlflow_spool, "_ANNOUNCED", set())
    monkeypatch.setenv("HOUSING_CONFIG_DIR", str(CONF))


@pytest.fixture(autouse=True)
def _a_fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    _start_up(monkeypatch)


def _settings(*extra: str) -> Settings:
    return load_settings([*BASE, *extra], CONF)


def _timed(stage: str, settings: Settings) -> float:
    started = time.monotonic()
    execute_stage(stage, settings, context=runs.current())
    return time.monotonic() - started


def _offline_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]


def _spool_client(root: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_spool.spool_uri(root / ".mlflow-spool"))


def _spooled_stages(root: Path) -> list[Any]:
    spool = _spool_client(root)
    experiment = spool.get_experiment_by_name("housing")
    found = spool.search_runs(
        [experiment.experiment_id], filter_string="tags.\"housing.run_type\" = 'stage'"
    )
    return sorted(found, key=lambda r: r.info.start_time)


@pytest.fixture(scope="module")
def local_prepare_sec(tmp_path_factory: pytest.TempPathFactory) -> float:
    """``prepare`` on a new local sqlite store (as a spool is new), libraries imported."""
    import mlflow.sklearn  # noqa: F401  (imports are no tracking time)

    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path_factory.mktemp("local"))
    mp.setenv("HOUSING_CONFIG_DIR", str(CONF))
    try:
        return _timed("prepare", load_settings(BASE, CONF))
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def refused(
    tmp_path_factory: pytest.TempPathFactory, local_prepare_sec: float
) -> Iterator[dict[str, Any]]:
    """``prepare`` with a tracking URI where nothing listens: its time, lines, settings."""
    root = tmp_path_factory.mktemp("refused") / "project"
    root.mkdir()
    uri = f"http://127.0.0.1:{free_port()}"
    mp = pytest.MonkeyPatch()
    _start_up(mp)
    mp.chdir(root)
    mp.setenv("HOUSING_RUN_ID", "run-refused")
    handler = WarningLines()
    logging.getLogger("housing").addHandler(handler)
    try:
        settings = load_settings([*BASE, f"mlflow.tracking_uri={uri}"], CONF)
        elapsed = _timed("prepare", settings)
        yield {"root": root, "uri": uri, "sec": elapsed, "lines": handler.lines, "s": settings}
    finally:
        logging.getLogger("housing").removeHandler(handler)
        mp.undo()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOUSING_RUN_ID", f"run-{tmp_path.name}")
    return root


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


def _assert_spooled_prepare(root: Path, uri: str) -> None:
    import json

    (run,) = _spooled_stages(root)
    assert run.data.tags[TAG_TARGET] == uri
    assert run.info.status == "FINISHED"
    fingerprint = json.loads((root / "metrics" / "data_fingerprint.json").read_text())
    assert run.data.metrics["data/rows"] == fingerprint["raw"]["rows"]
    assert run.data.metrics["data/test_rows"] == fingerprint["test"]["rows"]
    assert run.data.params["prepare.data.source"] == "synthetic"


@pytest.mark.slow
@pytest.mark.integration
def test_nothing_listening_costs_under_5s_and_spools_with_one_line(
    refused: dict[str, Any], local_prepare_sec: float
) -> None:
    uri = refused["uri"]
    assert refused["sec"] - local_prepare_sec < ADDED_LIMIT_SEC, (refused, local_prepare_sec)
    assert refused["lines"] == [
        f"mlflow: {uri} unreachable (connection refused); recording to the local spool, "
        "run `housing mlflow sync` later"
    ]
    _assert_spooled_prepare(refused["root"], uri)


@pytest.mark.slow
@pytest.mark.integration
def test_silent_server_costs_under_5s_and_spools(
    project: Path,
    local_prepare_sec: float,
    silent_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = f"http://127.0.0.1:{silent_port}"
    elapsed = _timed("prepare", _settings(f"mlflow.tracking_uri={uri}"))
    assert elapsed - local_prepare_sec < ADDED_LIMIT_SEC, (elapsed, local_prepare_sec)
    assert _offline_lines(caplog) == [
        f"mlflow: {uri} unreachable (timed out); recording to the local spool, "
        "run `housing mlflow sync` later"
    ]
    _assert_spooled_prepare(project, uri)


@pytest.mark.slow
@pytest.mark.integration
def test_sync_with_the_server_down_fails_in_one_line_and_keeps_the_spool(
    refused: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    uri, settings, project = refused["uri"], refused["s"], refused["root"]
    monkeypatch.chdir(project)
    capsys.readouterr()
    started = time.monotonic()
    code = main(["mlflow", "sync", *BASE, f"mlflow.tracking_uri={uri}"])
    assert time.monotonic() - started < ADDED_LIMIT_SEC
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith(f"mlflow sync: {uri} unreachable"), err
    assert "1 spooled run(s) kept" in err[0]
    assert mlflow_spool.pending(settings) == 1
    (run,) = _spooled_stages(project)
    assert TAG_SYNCED not in run.data.tags


def _server_champion(uri: str, root: Path, name: str) -> str:
    """Register ``name`` on the server with a cv/rmse_mean no run can beat; make it the
    champion; return its version."""
    from housing.io import file_sha256
    from housing.tracking.base import ModelVersion, StageRun
    from housing.tracking.lineage import decide_champion

    path = root / "models" / "linear_regression.joblib"
    tracker = MLflowTracker(uri, "housing", None, "champion", root=root)
    tracker.start(StageRun("train", "seed_champion", "seed"))
    version = ModelVersion(name, path, "LinearRegression", {"cv/rmse_mean": 0.001}, {},
                           {"model_sha256": file_sha256(path)})  # fmt: skip
    registered = tracker.register_model(version)
    metric = "cv/rmse_mean"
    decision = decide_champion(
        name, registered.version, 0.001, None, metric=metric, greater_is_better=False,
        min_improvement=0.0,
    )  # fmt: skip
    tracker.promote(decision, registered)
    tracker.close("completed")
    return registered.version


def _kill_at_first(method: str, proc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the server's process group when the stage first calls ``method``."""
    original: Callable[..., Any] = getattr(MLflowTracker, method)

    def kill_then_call(self: MLflowTracker, *args: Any) -> Any:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        return original(self, *args)

    monkeypatch.setattr(MLflowTracker, method, kill_then_call)


@pytest.mark.slow
@pytest.mark.integration
def test_server_killed_mid_run_then_sync_replays_each_run_once(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    store = tmp_path / "server"
    candidates = "selection.candidates=[linear_regression,ridge]"
    proc = start_server(store, port)
    try:
        online = [candidates, f"mlflow.tracking_uri={uri}"]
        _timed("prepare", _settings(*online))
        baseline = _timed("train", _settings(*online, "model=linear_regression"))
        better = _server_champion(uri, project, "housing-best")  # unbeatable: kept
        # The spool exists (as after an earlier offline stage): its one-time creation,
        # as long as a new local store's, is in the time of the tests above.
        (project / ".mlflow-spool").mkdir()
        _spool_client(project).search_experiments()
        _kill_at_first("register_model", proc, monkeypatch)  # mid-stage
        killed = _timed("train", _settings(*online, "model=ridge"))
        stop(proc)
        proc = start_server(store, port, wait=False)  # back on its store; boots meanwhile
        _timed("select_best", _settings(*online))
        _timed("evaluate", _settings(*online))
        assert killed - baseline < ADDED_LIMIT_SEC, (killed, baseline)
        (line,) = _offline_lines(caplog)
        assert line.startswith(f"mlflow: {uri} unreachable (")

        spooled = {r.data.tags["mlflow.runName"]: r for r in _spooled_stages(project)}
        assert set(spooled) == {"train_ridge", "select_best", "evaluate"}
        assert TAG_PARTIAL in spooled["train_ridge"].data.tags  # switched mid-stage

        monkeypatch.undo()  # the server's register_model as it is; restart on its store
        monkeypatch.chdir(project)
        monkeypatch.setenv("HOUSING_CONFIG_DIR", str(CONF))
        monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        bound_mlflow_http()
        wait_healthy(proc, store, port)
        capsys.readouterr()
        assert main(["mlflow", "sync", *BASE, *online]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and out[0].startswith(f"mlflow sync: 3 run(s) replayed to {uri}")
        assert "housing-best v2: kept the champion" in out[0]

        server = MlflowClient(uri)
        experiment = server.get_experiment_by_name("housing")
        replayed = server.search_runs(
            [experiment.experiment_id], filter_string=f"tags.\"{TAG_SOURCE}\" LIKE '%'"
        )
        stage_copies = [r for r in replayed if r.data.tags.get("housing.run_type") == "stage"]
        assert sorted(r.data.tags[TAG_SOURCE] for r in stage_copies) == sorted(
            r.info.run_id for r in spooled.values()
        )
        spool = _spool_client(project)
        for copy in stage_copies:
            original = spool.get_run(copy.data.tags[TAG_SOURCE])
            assert copy.info.start_time == original.info.start_time
            assert copy.info.end_time == original.info.end_time
            assert copy.info.status == "FINISHED"
            assert copy.data.params == original.data.params
            for key in original.data.metrics:
                got = [(m.value, m.timestamp, m.step) for m in server.get_metric_history(
                    copy.info.run_id, key)]  # fmt: skip
                want = [(m.value, m.timestamp, m.step) for m in spool.get_metric_history(
                    original.info.run_id, key)]  # fmt: skip
                assert got == want, key
            assert spool.get_run(original.info.run_id).data.tags[TAG_SYNCED] == copy.info.run_id

        # one parent for the whole pipeline run: online stages and replayed ones
        all_stages = server.search_runs(
            [experiment.experiment_id],
            filter_string="tags.\"housing.run_type\" = 'stage' "
            "and tags.\"housing.pipeline_run_id\" != 'seed'",
        )
        (parent_id,) = {r.data.tags["mlflow.parentRunId"] for r in all_stages}
        assert server.get_run(parent_id).info.status == "FINISHED"  # reopened, then spooled
        partial = server.get_run(spooled["train_ridge"].data.tags[TAG_PARTIAL])
        assert partial.info.status == "KILLED"
        assert partial.data.tags["housing.superseded_by"] in {r.info.run_id for r in stage_copies}

        # models and the champion decision, re-made against the server's champion
        copies = {r.data.tags["mlflow.runName"]: r.info.run_id for r in stage_copies}
        ridge = server.search_model_versions("name = 'housing-ridge'")
        assert copies["train_ridge"] in {v.run_id for v in ridge}
        # the spool had no champion and promoted; the server's better one stays
        assert server.get_model_version_by_alias("housing-best", "champion").version == better
        (best,) = server.search_model_versions(f"run_id = '{copies['select_best']}'")
        assert best.tags["spool.champion.decision"] == "promoted"
        assert best.tags["champion"] == "rejected"
        decided = version_record(server, best)
        assert decided["champion.decision"] == "rejected"
        assert f"does not beat v{better} " in decided["champion.reason"]
        model = load_registered_model(server, "housing-best", best.version)
        assert hasattr(model, "predict")

        # once each: the second sync finds nothing to do
        assert main(["mlflow", "sync", *BASE, *online]) == 0
        assert capsys.readouterr().out.strip() == f"mlflow sync: nothing to sync for {uri}"
        again = server.search_runs(
            [experiment.experiment_id], filter_string=f"tags.\"{TAG_SOURCE}\" LIKE '%'"
        )
        assert len(again) == len(replayed)
    finally:
        stop(proc)


@pytest.mark.parametrize(("status", "reachable"), [(200, True), (403, True), (404, False)])
def test_probe_counts_an_answer_but_not_a_missing_health_endpoint(
    status: int, reachable: bool
) -> None:
    """A refusing auth proxy is a server; a 404 on /health is no MLflow server."""
    import http.server

    from housing.tracking.mlflow import probe

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            return

    with serve(Handler) as url:
        reason = probe(url, 2)
    assert (reason is None) is reachable, reason


@pytest.mark.parametrize(
    ("uri", "server"),
    [("databricks", True), ("http://127.0.0.1:9", True), ("sqlite:///m.db", False)],
)
def test_the_spool_and_compare_agree_on_what_a_server_is(
    uri: str, server: bool, tmp_path: Path
) -> None:
    """One answer (``is_server_uri``) for the spool and compare's ``source=``: a
    ``databricks`` store is a server to both, and is not probed over HTTP."""
    from housing.reporting.compare import collect_mlflow
    from housing.tracking.mlflow import is_server_uri, probe

    settings = load_settings([*BASE, f"mlflow.tracking_uri={uri}"], root=tmp_path)
    assert is_server_uri(uri) is server
    if uri != "databricks":  # its client waits minutes for a workspace
        assert collect_mlflow(settings).source == ("server" if server else "local")
    note = mlflow_spool.sync(settings).note or ""  # nothing spooled: nothing to replay
    assert ("is a local store: nothing to sync" in note) is not server
    assert mlflow_spool.pending(settings) == 0
    if uri == "databricks":
        assert probe(uri, 1) is None


def _clauses(sql: str) -> tuple[str, ...]:
    """A CREATE statement's top-level clauses, sorted: MLflow's migrations write a
    table's constraints in an order that varies with the hash seed."""
    parts, depth, current = [], 0, ""
    for char in " ".join(sql.split()):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 1:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return tuple(sorted([*parts, current.strip()]))


def _schema(db: Path) -> set[tuple[str, str, tuple[str, ...]]]:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL")
        schema = {(str(t), str(n), _clauses(str(q))) for t, n, q in rows}
        revision = con.execute("SELECT version_num FROM alembic_version").fetchall()
    finally:
        con.close()
    return schema | {("revision", str(revision), ())}


@pytest.mark.slow
def test_the_spool_store_template_is_the_schema_mlflow_makes(tmp_path: Path) -> None:
    # After an MLflow upgrade this fails: rewrite it with write_store_template().
    from mlflow import MlflowClient

    made, templated = tmp_path / "made" / "mlflow.db", tmp_path / "templated" / "mlflow.db"
    made.parent.mkdir()
    MlflowClient(f"sqlite:///{made}").search_experiments()
    templated.parent.mkdir()
    mlflow_store.create_store(templated)
    assert _schema(templated) == _schema(made)


def test_a_spool_store_from_the_template_opens_at_once_and_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    started = time.monotonic()
    mlflow_store.create_store(db)
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.create_experiment("housing")
    assert time.monotonic() - started < 3  # MLflow's migrations take ~6 s
    assert [e.name for e in client.search_experiments()] == ["housing", "Default"]
    before = db.read_bytes()
    mlflow_store.create_store(db)  # an existing store is kept as it is
    assert db.read_bytes() == before and client.get_experiment(experiment).name == "housing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.create.lock"]
    monkeypatch.setattr(mlflow_store, "STORE_TEMPLATE", tmp_path / "absent.sql")
    mlflow_store.create_store(tmp_path / "other.db")  # no template: MLflow creates it
    assert not (tmp_path / "other.db").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_a_server_that_stops_answering_mid_stage_costs_seconds_and_the_run_is_spooled(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_prepare_sec: float
) -> None:
    # The real server frozen (SIGSTOP) at the stage's first metrics: its socket accepts,
    # nothing answers. The stage goes on within the budget (mlflow.timeout_sec=1,
    # retries=0 here), the run is spooled whole, one line says so.
    port = free_port()
    proc = start_server(tmp_path / "server", port)
    uri = f"http://127.0.0.1:{port}"
    original: Callable[..., Any] = MLflowTracker.log_metrics

    def freeze_then_call(self: MLflowTracker, *args: Any) -> Any:
        os.killpg(proc.pid, signal.SIGSTOP)
        return original(self, *args)

    handler = WarningLines()
    logging.getLogger("housing").addHandler(handler)
    try:
        settings = _settings(
            f"mlflow.tracking_uri={uri}", "mlflow.timeout_sec=1", "mlflow.retries=0"
        )
        bound_mlflow_http(1, 0)  # the stage command's start-up, from these settings
        monkeypatch.setattr(MLflowTracker, "log_metrics", freeze_then_call)
        started = time.monotonic()
        execute_stage("prepare", settings, context=runs.current())
        elapsed = time.monotonic() - started
    finally:
        logging.getLogger("housing").removeHandler(handler)
        os.killpg(proc.pid, signal.SIGCONT)
        stop(proc)
    assert elapsed - local_prepare_sec < ADDED_LIMIT_SEC, (elapsed, local_prepare_sec)
    assert handler.lines == [
        f"mlflow: {uri} unreachable (timed out); recording to the local spool, run "
        "`housing mlflow sync` later"
    ]
    _assert_spooled_prepare(project, uri)
    (run,) = _spooled_stages(project)
    assert run.data.tags[TAG_PARTIAL]  # the server's half-done run, superseded at sync
