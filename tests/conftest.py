"""Shared fixtures: project paths, settings in a temporary root, tiny tables."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from housing.config import Settings, load_settings

PROJECT = Path(__file__).resolve().parents[1]
CONF = PROJECT / "conf"

SettingsFactory = Callable[..., Settings]


def pytest_configure(config: pytest.Config) -> None:
    """Stage servers started by the tests' ``dvc repro`` runs exit soon after them."""
    os.environ.setdefault("HOUSING_STAGE_SERVER_IDLE", "10")


def settings_at(root: Path, overrides: Sequence[str] = ()) -> Settings:
    """Validated settings from the real conf/ (tracking off) with outputs under ``root``."""
    return load_settings(["tracking=none", *overrides], config_dir=CONF, root=root)


@pytest.fixture
def make_settings(tmp_path: Path) -> SettingsFactory:
    """Build validated settings from the real conf/ with outputs under ``tmp_path``."""

    def factory(overrides: Sequence[str] = (), root: Path | None = None) -> Settings:
        return settings_at(root or tmp_path, overrides)

    return factory


def table_120() -> pd.DataFrame:
    """A 120-row synthetic regression table: 3 numeric features and a target."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    y = 3 * x[:, 0] - 2 * x[:, 1] + 0.5 * x[:, 2] + rng.normal(scale=0.1, size=120) + 20
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "price": y})


@pytest.fixture
def small_table() -> pd.DataFrame:
    """``table_120()``: the tiny table most stage tests run on."""
    return table_120()


@pytest.fixture
def csv_file(tmp_path: Path, small_table: pd.DataFrame) -> Path:
    """``small_table`` written as a CSV file."""
    path = tmp_path / "input" / "houses.csv"
    path.parent.mkdir(parents=True)
    small_table.to_csv(path, index=False)
    return path


def csv_overrides(path: Path, *extra: str) -> list[str]:
    """Overrides selecting the CSV source for the ``small_table`` fixture."""
    return ["data=csv", f"data.path={path}", "data.target=price", *extra]


def require_tool(names: Sequence[str], hint: str) -> str:
    """The first of ``names`` on PATH; when none is: skip with the reason, or fail in CI.

    ``make test`` in CI installs every tool the suite needs (scripts/ensure_test_tools.sh,
    run by .ci/run through make test), so a missing one there is a defect, not a skip.
    """
    import os
    import shutil

    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{names[0]} is not installed: {hint}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def is_score_file(path: Path) -> bool:
    """A JSON file under metrics/ that holds scores (not a .meta.json, not the fingerprint)."""
    return (
        path.suffix == ".json"
        and not path.name.endswith(".meta.json")
        and path.name != "data_fingerprint.json"
    )


def metrics_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Each score file in ``folder`` (by name) read back with its ``.meta.json``.

    A record is the meta record, the numbers at top level, the ``split/metric`` ones also
    under ``metrics`` (what the trackers log), and ``best_value`` for the selection.
    """
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        if not is_score_file(path):
            continue
        scores = json.loads(path.read_text())
        meta_path = path.with_name(f"{path.stem}.meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        record = {**meta, **scores, "metrics": {k: v for k, v in scores.items() if "/" in k}}
        if "selection/best_value" in scores:
            record["best_value"] = scores["selection/best_value"]
        records[path.name] = record
    return records


#: The trackers' variables: a test's process is the parent of later tests' subprocesses.
_TRACKER_ENV = ("CLEARML_", "TRAINS_", "MLFLOW_")


@pytest.fixture(autouse=True)
def _restore_tracker_env() -> Iterator[None]:
    """Put the ``CLEARML_*``/``MLFLOW_*`` variables back after each test.

    An in-process ClearML task sets ``CLEARML_PROC_MASTER_ID`` to this process; inherited
    by a later test's ``housing`` subprocess, it makes that process's tasks sub-process
    stubs of a task it does not own. ``main()`` entry points called in-process set
    MLflow's HTTP budget variables.
    """
    before = {k: v for k, v in os.environ.items() if k.startswith(_TRACKER_ENV)}
    yield
    for key in [k for k in os.environ if k.startswith(_TRACKER_ENV)]:
        if key not in before:
            del os.environ[key]
    os.environ.update(before)
