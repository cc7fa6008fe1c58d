"""The fork server's warm-up: ClearML's config read with the trackers' environment."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from housing.config import ClearMLSettings
from housing.entry import start_up_environment as scoped_env
from housing.tracking import clearml as clearml_tracking
from housing.tracking.warmup import ENV_VARIABLE, warm


def _settings(root: Path) -> ClearMLSettings:
    return ClearMLSettings.model_validate(
        {"mode": "offline", "offline_dir": "offline"}, context={"root": root}
    )


@pytest.fixture
def sdk_config() -> Iterator[None]:
    """Put the SDK's parsed config back as it was (the tests replace it)."""
    from clearml.config import ConfigSDKWrapper, ConfigWrapper

    before = (ConfigWrapper._config, ConfigSDKWrapper._config_sdk)
    loaded_from = list(clearml_tracking._sdk_config_from)
    yield
    ConfigWrapper._config, ConfigSDKWrapper._config_sdk = before
    clearml_tracking._sdk_config_from[:] = loaded_from


def test_scoped_env_restores_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOUSING_T_SET", "before")
    monkeypatch.delenv("HOUSING_T_UNSET", raising=False)
    with scoped_env({"HOUSING_T_SET": "inside", "HOUSING_T_UNSET": "inside"}):
        assert os.environ["HOUSING_T_SET"] == os.environ["HOUSING_T_UNSET"] == "inside"
    assert os.environ["HOUSING_T_SET"] == "before"
    assert "HOUSING_T_UNSET" not in os.environ


def test_client_env_writes_the_client_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLEARML_CONFIG_FILE", raising=False)
    env = clearml_tracking.client_env(_settings(tmp_path))
    assert env["CLEARML_CACHE_DIR"] == str(tmp_path / "offline")
    conf = Path(env["CLEARML_CONFIG_FILE"])
    assert conf.parent == tmp_path / "offline"
    assert "report_use_subprocess: false" in conf.read_text(encoding="utf-8")
    assert "CLEARML_CACHE_DIR" not in os.environ or os.environ["CLEARML_CACHE_DIR"] != str(
        tmp_path / "offline"
    )


def test_client_env_keeps_a_user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "mine.conf"))
    env = clearml_tracking.client_env(_settings(tmp_path))
    assert env["CLEARML_CONFIG_FILE"] == str(tmp_path / "mine.conf")


@pytest.mark.usefixtures("sdk_config")
def test_warm_reads_the_config_with_the_engine_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clearml.config import ConfigWrapper

    monkeypatch.delenv("CLEARML_CONFIG_FILE", raising=False)
    monkeypatch.delenv("CLEARML_CACHE_DIR", raising=False)
    env = clearml_tracking.client_env(_settings(tmp_path))
    monkeypatch.setenv(ENV_VARIABLE, json.dumps(env))
    ConfigWrapper._config = None
    warm()
    assert ENV_VARIABLE not in os.environ  # consumed
    assert "CLEARML_CONFIG_FILE" not in os.environ  # only set while reading
    assert clearml_tracking._sdk_config_from == [env["CLEARML_CONFIG_FILE"]]
    loaded = ConfigWrapper._config
    assert loaded is not None
    assert loaded.get("sdk.development.report_use_subprocess") is False

    # the same file: the tracker keeps the parsed config
    with scoped_env(env):
        clearml_tracking._drop_stale_sdk_config()
    assert ConfigWrapper._config is loaded
    # another file: the SDK reads that one on first use
    with scoped_env({**env, "CLEARML_CONFIG_FILE": str(tmp_path / "other.conf")}):
        clearml_tracking._drop_stale_sdk_config()
    assert ConfigWrapper._config is None
    assert clearml_tracking._sdk_config_from == []


def test_warm_without_clearml_env_leaves_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VARIABLE, raising=False)
    before = list(clearml_tracking._sdk_config_from)
    warm()
    assert clearml_tracking._sdk_config_from == before


def test_warm_freezes_what_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    monkeypatch.delenv(ENV_VARIABLE, raising=False)
    try:
        warm()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
