"""``housing gc`` on real stores: an MLflow sqlite store with runs, logged models and
registry versions (written with the MLflow client), ClearML offline sessions with the
sync ledger, and a real DVC cache; read back with the same tools afterwards.

Three pipeline runs p0 < p1 < p2, one ``train`` run each registering housing-ridge v1..v3;
v1 is the champion. With ``--keep 1`` the newest pipeline (p2, v3) and the champion's (p0)
stay; p1 goes, with v2 and its logged model. Offline, p1's synced session goes and its
unsynced one stays; p0's session holds the offline champion.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from housing.cli import main
from housing.tracking.mlflow import TAG_PARENT, TAG_PIPELINE_RUN_ID, TAG_RUN_TYPE
from housing.tracking.mlflow_spool import create_store
from housing.tracking.offline import CHAMPIONS_FILE, IMPORTED_FILE, sessions_root

PROJECT = Path(__file__).resolve().parents[1]
HOST = "http://127.0.0.1:8008"  # conf/pipeline.yaml's clearml.server.api_host
PIPELINES = ("p0", "p1", "p2")
T0 = 1_780_000_000_000  # ms; the pipelines start a minute apart


@dataclass
class World:
    root: Path
    client: Any
    runs: dict[str, list[str]] = field(default_factory=dict)  # pipeline -> run ids
    models: dict[str, str] = field(default_factory=dict)  # pipeline -> logged model id
    sessions: dict[str, Path] = field(default_factory=dict)  # name -> session folder
    dvc_old: Path | None = None
    dvc_used: Path | None = None

    def files(self) -> dict[str, int]:
        return {
            str(p.relative_to(self.root)): p.stat().st_size
            for p in self.root.rglob("*")
            if p.is_file() and ".housing" not in p.parts and p.name != "mlflow.db"
        }


def _mlflow(world: World) -> None:
    from mlflow import MlflowClient

    create_store(world.root / "mlflow.db")
    client = MlflowClient(f"sqlite:///{world.root / 'mlflow.db'}")
    experiment = client.create_experiment("housing", (world.root / "mlruns").as_uri())
    client.create_registered_model("housing-ridge")
    for i, name in enumerate(PIPELINES):
        start = T0 + i * 60_000
        tags = {TAG_PIPELINE_RUN_ID: name, TAG_RUN_TYPE: "pipeline"}
        parent = client.create_run(experiment, start, tags, f"pipeline-{name}").info.run_id
        tags = {TAG_PIPELINE_RUN_ID: name, TAG_RUN_TYPE: "stage", TAG_PARENT: parent}
        train = client.create_run(experiment, start + 1000, tags, "train_ridge").info.run_id
        for run in (parent, train):
            client.log_text(run, "x" * 10_000, "logs/stage.log")
            client.set_terminated(run, "FINISHED")
        model = client.create_logged_model(experiment, "ridge", source_run_id=train)
        weights = world.root / "model.pkl"
        weights.write_bytes(b"w" * 20_000)
        client.log_model_artifact(model.model_id, str(weights))
        client.create_model_version(
            "housing-ridge", model.artifact_location, train, model_id=model.model_id
        )
        world.runs[name], world.models[name] = [parent, train], model.model_id
    weights.unlink()
    client.set_registered_model_alias("housing-ridge", "champion", "1")
    world.client = client


def _session(world: World, name: str, pipeline: str, minute: int, synced: bool) -> None:
    """A closed offline session as the ClearML SDK leaves it (folder + zip)."""
    folder = sessions_root(world.root / ".clearml") / f"offline-{name}"
    folder.mkdir(parents=True)
    task = {
        "id": f"offline-{name}",
        "name": f"housing train {name}",
        "project_name": "housing",
        "tags": ["housing", "train"],
        "hyperparams": {"properties": {"pipeline_run_id": {"value": pipeline}}},
    }
    (folder / "task.json").write_text(json.dumps(task))
    stamp = {"timestamp": T0 + minute * 60_000, "msg": "created"}
    (folder / "log.jsonl").write_text(json.dumps(stamp) + "\n")
    (folder / "metrics.jsonl").write_text("{}\n" * 500)
    with zipfile.ZipFile(folder.with_suffix(".zip"), "w") as archive:
        for path in folder.iterdir():
            archive.write(path, path.name)
    world.sessions[name] = folder
    if synced:
        ledger = world.root / ".clearml" / IMPORTED_FILE
        data = json.loads(ledger.read_text()) if ledger.exists() else {"sessions": {}}
        data["sessions"][f"offline-{name}"] = [{"api_host": HOST, "task_id": f"t-{name}"}]
        ledger.write_text(json.dumps(data))


def _dvc(world: World) -> None:
    from dvc.repo import Repo

    repo = Repo.init(str(world.root), no_scm=True)
    data = world.root / "data.csv"
    data.write_text("a,b\n1,2\n")
    repo.add(str(data))
    cache = Path(repo.cache.local.path)
    world.dvc_old = next(p for p in cache.rglob("*") if p.is_file())
    data.write_text("a,b\n1,2\n3,4\n")
    repo.add(str(data))
    world.dvc_used = next(p for p in cache.rglob("*") if p.is_file() and p != world.dvc_old)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    made = World(tmp_path, None)
    _mlflow(made)
    _session(made, "s0", "p0", 0, synced=True)  # the offline champion's
    _session(made, "s1", "p1", 1, synced=True)  # goes
    _session(made, "s1b", "p1", 1, synced=False)  # not synced: stays
    _session(made, "s2", "p2", 2, synced=True)  # newest pipeline: stays
    champion = {"housing-best": {"task_id": "offline-s0", "version": "1"}}
    (tmp_path / ".clearml" / CHAMPIONS_FILE).write_text(json.dumps(champion))
    _dvc(made)
    monkeypatch.chdir(tmp_path)
    return made


def _gc(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert main(["gc", "--config-dir", str(PROJECT / "conf"), *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_says_what_gc_frees_and_deletes_nothing(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    before = world.files()
    runs = {r.info.run_id for r in world.client.search_runs(["1"], run_view_type=3)}

    lines = _gc(capsys, "--keep", "1", "--dry-run")

    assert world.files() == before
    assert {r.info.run_id for r in world.client.search_runs(["1"], run_view_type=3)} == runs
    assert lines[0] == "dry run: nothing deleted"
    mlflow, clearml, dvc = lines[1:]
    # p1: 2 runs (a 10 kB log each), v2 of housing-ridge and its logged model (20 kB)
    assert mlflow.startswith(
        f"mlflow (sqlite:///{world.root / 'mlflow.db'}): would delete 2 runs, "
        "1 model versions, 1 logged models; would free 3 files, 0.04 MB (kept 4 runs of 2 "
        "pipelines)"
    ), mlflow
    s1 = sum(p.stat().st_size for p in world.sessions["s1"].rglob("*"))
    s1 += world.sessions["s1"].with_suffix(".zip").stat().st_size
    assert clearml == (
        f"clearml ({world.root / '.clearml'}): would delete 1 synced sessions; would free "
        f"4 files, {s1 / 1e6:.2f} MB (kept 3 sessions, 1 not yet synced)"
    )
    assert world.dvc_old is not None
    assert dvc.startswith(f"dvc ({world.dvc_old.parents[1]}): would delete 1 cache objects;")
    assert dvc.endswith("would free 1 files, 0.00 MB (kept 1 objects the workspace uses)")

    # the pipelines started in 2026-05: with --older-than 400d they are all too young
    young = _gc(capsys, "--keep", "1", "--older-than", "400d", "--dry-run")
    assert [line.split("): ", 1)[1].split(";")[0] for line in young[1:3]] == [
        "would delete nothing"
    ] * 2
    assert world.files() == before


@pytest.mark.slow
def test_gc_keeps_the_champion_the_last_n_and_what_is_not_synced(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.exceptions import MlflowException

    client = world.client
    lines = _gc(capsys, "--keep", "1")

    assert lines[0].endswith(
        "deleted 2 runs, 1 model versions, 1 logged models; freed 3 files, 0.04 MB "
        "(kept 4 runs of 2 pipelines)"
    )
    left = {r.info.run_id for r in client.search_runs(["1"], run_view_type=3)}  # ALL
    assert left == {*world.runs["p0"], *world.runs["p2"]}  # purged, not only deleted
    for run in world.runs["p1"]:
        assert not (world.root / "mlruns" / run).exists()
    for run in (*world.runs["p0"], *world.runs["p2"]):
        assert (world.root / "mlruns" / run / "artifacts" / "logs" / "stage.log").is_file()
    versions = client.search_model_versions("name = 'housing-ridge'")
    assert sorted(int(v.version) for v in versions) == [1, 3]
    assert int(client.get_model_version_by_alias("housing-ridge", "champion").version) == 1
    with pytest.raises(MlflowException):
        client.get_logged_model(world.models["p1"])
    assert client.get_logged_model(world.models["p0"]).source_run_id in world.runs["p0"]

    gone = world.sessions["s1"]
    assert not gone.exists() and not gone.with_suffix(".zip").exists()
    for name in ("s0", "s1b", "s2"):
        assert world.sessions[name].is_dir() and world.sessions[name].with_suffix(".zip").is_file()

    assert world.dvc_old is not None and world.dvc_used is not None
    assert not world.dvc_old.exists() and world.dvc_used.is_file()

    again = _gc(capsys, "--keep", "1")  # nothing left to free
    assert [line.split(": ", 1)[1].split(";")[0] for line in again] == ["deleted nothing"] * 3


def test_a_damaged_store_is_refused_in_one_line_before_anything_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mlflow.db").write_bytes(b"not a database" * 100)
    _session(World(tmp_path, None), "s0", "p0", 0, synced=True)
    monkeypatch.chdir(tmp_path)

    code = main(["gc", "--keep", "1", "--config-dir", str(PROJECT / "conf")])

    err = capsys.readouterr().err
    assert code == 4 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: MLflow store {tmp_path / 'mlflow.db'}: not an SQLite database")
    assert (tmp_path / ".clearml" / "offline" / "offline-s0").is_dir()
