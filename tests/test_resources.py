"""Resource guards: the large-table profile and the up-front memory refusal."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from housing import io
from housing.config import load_settings
from housing.data import sources
from housing.errors import ConfigError
from housing.stages import prepare, train
from tests.conftest import CONF, SettingsFactory
from tests.helpers import WarningLines, run_tool


@pytest.mark.slow
def test_a_large_table_switches_each_model_to_its_large_profile(
    make_settings: SettingsFactory,
) -> None:
    small = ["data=synthetic", "data.n_rows=200", "train.large_table_rows=100"]
    prepare.run(make_settings(small))  # 160 train rows > 100
    said = WarningLines()
    logger = logging.getLogger("housing.stages.train")
    logger.addHandler(said)
    try:
        quick = "model.large.params.max_iter=5"  # OpenMP on a busy machine: keep it short
        boosted = train.run(make_settings([*small, "model=gradient_boosting", quick]))
    finally:
        logger.removeHandler(said)
    assert boosted.estimator == "hist_gradient_boosting"  # what really ran, as trackers see it
    assert boosted.params["max_iter"] == 5
    meta = io.read_json(boosted.meta_path)
    assert (meta["estimator"], meta["profile"]) == ("hist_gradient_boosting", "large")
    scores = io.read_json(boosted.metrics_path)
    assert (scores["large_table"], scores["cv_folds"]) == (1, 2)
    assert said.lines == [
        "train gradient_boosting: 160 rows > train.large_table_rows=100: large-table profile: "
        "hist_gradient_boosting(max_iter=5, learning_rate=0.2, max_leaf_nodes=31, "
        "min_samples_leaf=20, l2_regularization=1.0) (model.large), "
        "2-fold CV (train.cv_folds_large)"
    ]

    forest = train.run(make_settings([*small, "model=random_forest"]))
    assert forest.estimator == "random_forest"
    assert forest.params | {"n_estimators": 50, "max_samples": 0.05} == forest.params
    assert forest.params["max_depth"] == 10  # the rest of params is kept
    assert len(forest.record["feature_importances"]) == 13

    below = train.run(make_settings(["data=synthetic", "data.n_rows=200", "model=ridge"]))
    assert io.read_json(below.meta_path)["profile"] == "default"
    assert io.read_json(below.metrics_path)["large_table"] == 0


def test_a_bad_large_profile_is_named_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.large\.params\.max_samples: random_forest"):
        load_settings(
            ["model=random_forest", "model.large.params.max_samples=3"],
            config_dir=CONF,
            root=tmp_path,
        )


def test_a_table_that_cannot_fit_is_refused_with_the_estimate_and_the_limit(
    make_settings: SettingsFactory,
) -> None:
    settings = make_settings(["data=synthetic", "data.n_rows=2000000000"])
    with pytest.raises(ConfigError) as refused:
        sources.check_memory(settings.data, available=20 * 2**30)
    assert str(refused.value) == (
        "data.n_rows=2000000000: needs ~2,086 GiB (estimate), limit 20 GiB "
        "(available memory); lower data.n_rows"
    )
    sources.check_memory(make_settings(["data=synthetic", "data.n_rows=1000"]).data)


def test_an_absurd_n_rows_is_one_line_and_exit_2_before_any_work(tmp_path: Path) -> None:
    from tests.scratch import make_scratch_repo

    repo = make_scratch_repo(tmp_path / "repo", defaults={"tracking": "none"})
    t0 = time.monotonic()
    done = run_tool("housing", repo, "prepare", "data=synthetic", "data.n_rows=10000000000000")
    seconds = time.monotonic() - t0
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.n_rows=10000000000000: needs ~"), (
        done.stderr
    )
    assert "(available memory); lower data.n_rows" in lines[0]
    assert not (repo / "data" / "raw").exists()  # nothing written
    assert seconds < 20
