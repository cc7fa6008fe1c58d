"""The pipeline DAG that the ClearML controller runs (mirrors dvc.yaml)."""

from __future__ import annotations

from pathlib import Path

from housing.config import load_settings
from housing.orchestration.dag import Step, build_dag
from tests.conftest import CONF


def test_dag_has_one_train_step_per_candidate(tmp_path: Path) -> None:
    settings = load_settings(["selection.candidates=[ridge,random_forest]"], CONF, tmp_path)
    dag = build_dag(settings)
    assert [s.name for s in dag] == [
        "prepare",
        "train_ridge",
        "train_random_forest",
        "select_best",
        "evaluate",
    ]
    by_name = {s.name: s for s in dag}
    assert by_name["train_ridge"] == Step("train_ridge", "train", ("model=ridge",), ("prepare",))
    assert by_name["select_best"].parents == ("train_ridge", "train_random_forest")
    assert by_name["evaluate"].parents == ("select_best",)
