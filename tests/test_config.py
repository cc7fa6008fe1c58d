"""Config composition (every group option) and one failure contract per bad value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from housing.cli import main
from housing.config import (
    FROM_COMMAND_LINE,
    FROM_CONF,
    STANDARD_ENV,
    Settings,
    available_choices,
    compose,
    load_settings,
)
from housing.errors import ConfigError

from .conftest import CONF


@pytest.mark.parametrize("group", ["data", "model", "tracking"])
def test_every_group_option_composes_and_validates(group: str, tmp_path: Path) -> None:
    choices = available_choices(CONF, group)
    assert len(choices) >= 1
    for choice in choices:
        extra = (
            ["data.path=x.csv", "data.target=price"] if (group, choice) == ("data", "csv") else []
        )
        settings = load_settings([f"{group}={choice}", *extra], config_dir=CONF, root=tmp_path)
        assert isinstance(settings, Settings)
        assert settings.resolved[group] is not None
        if group == "model":
            assert settings.model.name == choice
        if group == "data":
            assert settings.data.name == choice
        if group == "tracking":
            assert list(settings.tracking) == settings.resolved["tracking"]["backends"]
    assert settings.clearml.offline_dir == tmp_path / ".clearml"
    assert settings.notifications.file == tmp_path / "reports" / "pipeline_notifications.log"
    assert settings.clearml.pipeline.poll_sec == 5.0
    assert settings.registry.champion_alias == "champion"
    assert settings.mlflow.registry_uri is None


def test_clearml_disabled_drops_the_backend(tmp_path: Path) -> None:
    settings = load_settings(["clearml.enabled=false"], CONF, tmp_path)
    assert settings.tracking == ("mlflow",)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["clearml.mode=onlnie"], "clearml.mode: unknown value 'onlnie'; did you mean online?"),
        (["data=synthetic", "data.noise=abc"], "data.noise: expected a number, got 'abc'"),
        (["clearml.pipeline.poll_sec=-1"], "clearml.pipeline.poll_sec: must be > 0, got -1"),
        (
            ["model=ridge", "model.params.alhpa=3"],
            "model.params.alhpa: unknown key; did you mean model.params.alpha? "
            "(use +model.params.alhpa=3 to add a new key)",
        ),
        (["+trian.cv_folds=3"], "trian: unknown key; did you mean train?"),
        (["+train.cv_fold=3"], "train.cv_fold: unknown key; did you mean train.cv_folds?"),
        (
            ["+data.schema.columns.rm.mni=1"],
            "data.schema.columns.rm.mni: unknown key; did you mean data.schema.columns.rm.min?",
        ),
        (
            ["clearml.pipeline.schedule_cron=''"],
            "clearml.pipeline.schedule_cron: must not be empty",
        ),
        (["mlflow.experiment=''"], "mlflow.experiment: must not be empty, got ''"),
    ],
)
def test_bad_value_is_one_exact_line(overrides: list[str], line: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(overrides, config_dir=CONF, root=tmp_path)
    assert str(err.value).startswith(line)
    assert "\n" not in str(err.value)


def test_defaults_match_the_report() -> None:
    cfg = compose([], CONF)
    assert cfg["prepare"] == {"test_size": 0.2, "random_state": 42}
    assert cfg["train"]["val_size"] == 0.2
    assert cfg["train"]["cv_folds"] == 5
    assert cfg["data"]["name"] == "boston"
    assert cfg["selection"]["metric"] == "cv/rmse_mean"
    assert {"linear_regression", "ridge", "random_forest"} <= set(cfg["selection"]["candidates"])
    ridge = compose(["model=ridge"], CONF)["model"]
    assert ridge["params"]["alpha"] == 1.0
    rf = compose(["model=random_forest"], CONF)["model"]["params"]
    assert (rf["n_estimators"], rf["max_depth"]) == (100, 10)


def test_model_configs_are_named_after_their_file() -> None:
    for choice in available_choices(CONF, "model"):
        assert compose([f"model={choice}"], CONF)["model"]["name"] == choice


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["prepare.test_size=1.5"], "prepare.test_size"),
        (["prepare.test_size=0"], "prepare.test_size"),
        (["prepare.test_size=abc"], "prepare.test_size"),
        (["train.val_size=1"], "train.val_size"),
        (["train.cv_folds=1"], "train.cv_folds"),
        (["train.n_jobs=0"], "train.n_jobs"),
        (["model=ridge", "model.params.alpha=-1"], "model.params.alpha"),
        (["model=random_forest", "model.params.n_estimators=0"], "model.params.n_estimators"),
        (["model=gradient_boosting", "model.params.subsample=1.5"], "model.params.subsample"),
        (["model.estimator=svm"], "model.estimator"),
        (["model=unknown_model"], "model=unknown_model"),
        (["data=nope"], "data=nope"),
        (["selection.metric=accuracy"], "selection.metric"),
        (["selection.candidates=[ridge,lasso]"], "selection.candidates"),
        (["selection.candidates=[]"], "selection.candidates"),
        (["data=csv", "data.target=price"], "data.path"),
        (["data=csv", "data.path=x.csv"], "data.target"),
        (["data.drop_columns=[medv]"], "data.drop_columns"),
        (["data.sep=;"], "data.sep=;"),
        (["data.schema.min_rows=0"], "data.schema.min_rows"),
        (
            ["data.schema.columns.rm.min=9", "data.schema.columns.rm.max=1"],
            "data.schema.columns.rm",
        ),
    ],
)
def test_bad_config_names_the_key(overrides: list[str], key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(overrides, config_dir=CONF, root=tmp_path)
    message = str(err.value)
    assert key in message
    assert "\n" not in message


def test_unknown_model_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ridge"):
        load_settings(["model=xgb"], config_dir=CONF, root=tmp_path)


def test_cli_bad_config_exits_nonzero_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["--config-dir", str(CONF), "prepare", "prepare.test_size=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ConfigError.exit_code != 0
    assert err == [err[0]] and err[0].startswith("error: prepare.test_size")
    assert not (tmp_path / "data").exists()


def test_cli_refuses_a_misspelt_mode_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--config-dir", str(CONF), "prepare", "clearml.mode=onlnie"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: clearml.mode: unknown value 'onlnie'; did you mean online?"]
    assert not (tmp_path / "data").exists()


def test_cli_config_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config-dir", str(CONF), "config", "model=ridge"]) == 0
    out = capsys.readouterr().out
    assert "alpha: 1.0" in out
    assert "test_size: 0.2" in out


# --------------------------------------------------------------------------- precedence


def _at(values: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values[part]
    return values


@pytest.mark.parametrize(("key", "variable"), sorted(STANDARD_ENV.items()))
def test_a_standard_variable_beats_conf_and_the_command_line_beats_it(
    key: str, variable: str, tmp_path: Path
) -> None:
    from_env, from_cli = ("http://127.0.0.1:9", "http://127.0.0.1:7")
    if key == "mlflow.experiment":
        from_env, from_cli = ("from-env", "from-cli")
    env = {variable: from_env}
    conf = load_settings(config_dir=CONF, root=tmp_path, env={})
    assert conf.source(key) == FROM_CONF
    assert _at(conf.resolved, key) not in (from_env, from_cli)

    settings = load_settings(config_dir=CONF, root=tmp_path, env=env)
    assert _at(settings.resolved, key) == from_env
    assert _at(settings.model_dump(), key) == from_env  # the typed settings, not only the dump
    assert settings.source(key) == variable

    settings = load_settings([f"{key}={from_cli}"], config_dir=CONF, root=tmp_path, env=env)
    assert _at(settings.model_dump(), key) == from_cli
    assert settings.source(key) == FROM_COMMAND_LINE


def test_clearml_config_file_hosts_sit_between_the_variables_and_conf(tmp_path: Path) -> None:
    conf_file = tmp_path / "clearml.conf"
    conf_file.write_text(
        "api {\n"
        '    api_server: "http://file-api:8008"\n'
        "    api_server: ${?CLEARML_API_HOST}\n"
        "    web_server: http://file-web:8080\n"
        "}\n"
    )
    env = {"CLEARML_CONFIG_FILE": str(conf_file)}
    settings = load_settings(config_dir=CONF, root=tmp_path, env=env)
    server = settings.clearml.server
    assert (server.api_host, server.web_host) == ("http://file-api:8008", "http://file-web:8080")
    assert server.files_host == "http://127.0.0.1:8081"  # not in the file: conf/
    assert settings.source("clearml.server.api_host") == f"CLEARML_CONFIG_FILE ({conf_file})"
    assert settings.source("clearml.server.files_host") == FROM_CONF

    env["CLEARML_API_HOST"] = "http://env-api:8008"
    settings = load_settings(config_dir=CONF, root=tmp_path, env=env)
    assert settings.clearml.server.api_host == "http://env-api:8008"
    assert settings.clearml.server.web_host == "http://file-web:8080"

    missing = {"CLEARML_CONFIG_FILE": str(tmp_path / "nope.conf")}
    settings = load_settings(config_dir=CONF, root=tmp_path, env=missing)
    assert settings.clearml.server.api_host == "http://127.0.0.1:8008"


def test_cli_config_shows_where_values_came_from_and_hides_url_credentials(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://bob:s3cr3t-token@mlflow.example:5000")
    assert main(["--config-dir", str(CONF), "config", "model=ridge"]) == 0
    out = capsys.readouterr().out
    assert "tracking_uri: https://***@mlflow.example:5000" in out
    assert "s3cr3t" not in out
    assert "#   mlflow.tracking_uri: MLFLOW_TRACKING_URI" in out
    assert "#   model: command line" in out
    assert "clearml.server.api_host" not in out  # from conf/: not listed


def test_the_sdk_gets_the_command_line_host_over_an_exported_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import os

    from housing.tracking.clearml import sdk_env

    monkeypatch.setenv("CLEARML_API_HOST", "http://exported:8008")
    overrides = ["clearml.server.api_host=http://given:8008"]
    settings = load_settings(overrides, config_dir=CONF, root=tmp_path)
    assert sdk_env(settings.clearml, os.environ)["CLEARML_API_HOST"] == "http://given:8008"
    assert os.environ["CLEARML_API_HOST"] == "http://exported:8008"  # computed, not written
