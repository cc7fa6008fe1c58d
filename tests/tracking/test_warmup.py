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
from housing.tracking.offline import CLIENT_CONFIG_FILE
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


def test_sdk_env_writes_the_client_config(tmp_path: Path) -> None:
    env = clearml_tracking.sdk_env(_settings(tmp_path), {})
    assert env["CLEARML_CACHE_DIR"] == str(tmp_path / "offline")
    conf = Path(str(env["CLEARML_CONFIG_FILE"]))
    assert conf.parent == tmp_path / "offline"
    assert "report_use_subprocess: false" in conf.read_text(encoding="utf-8")
    assert os.environ.get("CLEARML_CACHE_DIR") != str(tmp_path / "offline")  # not written


def test_sdk_env_keeps_a_user_config_not_one_settled_for_another_folder(tmp_path: Path) -> None:
    mine = {"CLEARML_CONFIG_FILE": str(tmp_path / "mine.conf")}
    assert clearml_tracking.sdk_env(_settings(tmp_path), mine)["CLEARML_CONFIG_FILE"] == str(
        tmp_path / "mine.conf"
    )
    # a config settled earlier for another offline folder is generated, not the user's
    other = clearml_tracking.sdk_env(_settings(tmp_path / "other"), {})
    settled = {k: v for k, v in other.items() if v is not None}
    env = clearml_tracking.sdk_env(_settings(tmp_path), settled)
    assert env["CLEARML_CONFIG_FILE"] == str(tmp_path / "offline" / CLIENT_CONFIG_FILE)


@pytest.mark.usefixtures("sdk_config")
def test_warm_reads_the_config_with_the_engine_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clearml.config import ConfigWrapper

    monkeypatch.delenv("CLEARML_CONFIG_FILE", raising=False)
    monkeypatch.delenv("CLEARML_CACHE_DIR", raising=False)
    env = {k: str(v) for k, v in clearml_tracking.sdk_env(_settings(tmp_path), {}).items()}
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
