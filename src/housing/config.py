"""Typed settings composed from the Hydra config in ``conf/``.

Entry points call :func:`load_settings` (compose + validate) once; everything below
them receives frozen pydantic models. Every section of ``conf/pipeline.yaml`` has a
model here (unknown keys are refused), and every check of a config value lives here:
a bad value is one :class:`~housing.errors.ConfigError` line ``<dotted.key>: <why>``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from housing.errors import ConfigError, first_line

CONFIG_NAME = "pipeline"
#: Metrics every train stage reports, in the names every tracker uses.
TRAIN_METRICS = (
    "train/rmse",
    "train/mae",
    "train/r2",
    "val/rmse",
    "val/mae",
    "val/r2",
    "cv/rmse_mean",
    "cv/rmse_std",
)
SELECTION_METRICS = tuple(m for m in TRAIN_METRICS if m != "cv/rmse_std")

#: Keys the trackers' own environment variables set. One rule: a command-line override
#: beats the variable, which beats ``conf/``; ``CLEARML_CONFIG_FILE``'s ``api`` section
#: (the hosts) sits between the variables and ``conf/``, as in the ClearML SDK.
STANDARD_ENV: Final = {
    "clearml.server.api_host": "CLEARML_API_HOST",
    "clearml.server.web_host": "CLEARML_WEB_HOST",
    "clearml.server.files_host": "CLEARML_FILES_HOST",
    "mlflow.tracking_uri": "MLFLOW_TRACKING_URI",
    "mlflow.experiment": "MLFLOW_EXPERIMENT_NAME",
    "mlflow.registry_uri": "MLFLOW_REGISTRY_URI",
}
_CONFIG_FILE_KEYS: Final = {
    "clearml.server.api_host": "api_server",
    "clearml.server.web_host": "web_server",
    "clearml.server.files_host": "files_server",
}
#: Where a value came from when neither the command line nor the environment set it.
FROM_CONF: Final = "conf/"
FROM_COMMAND_LINE: Final = "command line"


def greater_is_better(metric: str) -> bool:
    """Whether a higher value of ``metric`` is better (r2) or worse (rmse, mae)."""
    return metric.endswith("r2")


def _under_root(value: Path, info: ValidationInfo) -> Path:
    """Relative paths join the project root (validation context ``root``, else the cwd)."""
    return Path((info.context or {}).get("root") or Path.cwd()) / value.expanduser()


def _refuse(bad: int, why: str) -> AfterValidator:
    def check(value: int) -> int:
        if value == bad:
            raise ValueError(why)
        return value

    return AfterValidator(check)


def _or_empty(value: Any) -> Any:
    return {} if value is None else value


Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Text = Annotated[str, Field(min_length=1)]
Fraction = Annotated[Number, Field(gt=0, lt=1)]
Seed = Annotated[StrictInt, Field(ge=0)]
Folds = Annotated[Seed, _refuse(1, "must be 0 (no CV) or at least 2")]
ProjectPath = Annotated[Path, AfterValidator(_under_root)]
Url = Annotated[Text, AfterValidator(lambda url: url.rstrip("/"))]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class ColumnRule(_Section):
    """Checks on one column: numeric range, allowed values, missing values."""

    min: Number | None = None
    max: Number | None = None
    allowed: tuple[Number, ...] | None = None
    nullable: StrictBool | None = None  # None: the schema's allow_missing decides

    _no_rules = model_validator(mode="before")(_or_empty)  # `rm:` with no rules is allowed

    @model_validator(mode="after")
    def _range(self) -> ColumnRule:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is greater than max {self.max:g}")
        return self


class Schema(_Section):
    """Table-level checks plus per-column rules (listed columns are required)."""

    min_rows: Annotated[StrictInt, Field(ge=1)] = 1
    allow_missing: StrictBool = False
    columns: dict[str, ColumnRule] = Field(default_factory=dict)

    _no_columns = field_validator("columns", mode="before")(_or_empty)


#: ``data.path`` when no snapshot is set (conf/pipeline.yaml): the dataset's own source.
#: It names an existing folder because the path is also prepare's DVC dependency.
OWN_SOURCE = Path("conf/data")


class DataSettings(_Section):
    """Where the raw table comes from and what it must look like.

    ``path``: a CSV read instead of the dataset's own source (a new snapshot of the
    table, or any table for ``source: csv``); None: the source itself.
    """

    name: Text
    source: Literal["boston", "california", "csv", "synthetic"]
    target: Text
    schema_: Schema = Field(alias="schema")
    drop_columns: tuple[str, ...] = ()
    path: Path | None = None
    sep: Text = ","
    cache_dir: Path | None = None
    n_rows: Annotated[StrictInt, Field(ge=100)] | None = None
    noise: Annotated[Number, Field(ge=0)] = 0.05
    random_state: Seed = 42

    @property
    def schema(self) -> Schema:  # type: ignore[override]  # BaseModel.schema is deprecated
        return self.schema_

    @field_validator("path", mode="before")
    @classmethod
    def _own_source(cls, value: Any) -> Any:
        return None if isinstance(value, str | Path) and Path(value) == OWN_SOURCE else value

    @model_validator(mode="after")
    def _per_source(self) -> DataSettings:
        if self.source == "csv" and self.path is None:
            raise ConfigError("data.path: required for data=csv (data.path=<file.csv>)")
        if self.source == "synthetic" and self.path is not None:
            raise ConfigError(
                f"data.path: data=synthetic generates its table; read {self.path} with "
                "data=boston (a Boston snapshot) or data=csv"
            )
        if self.source == "synthetic" and self.n_rows is None:
            raise ConfigError("data.n_rows: required for data=synthetic")
        if self.target in self.drop_columns:
            raise ConfigError(f"data.drop_columns: cannot drop the target column {self.target!r}")
        return self


class LargeTableProfile(_Section):
    """What a candidate runs as on a train split of more than ``train.large_table_rows``
    rows: another estimator (its own params), or the same one with ``params`` merged in."""

    estimator: Text | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    _no_params = field_validator("params", mode="before")(_or_empty)


class ModelSettings(_Section):
    """One candidate model: the estimator key, its params, preprocessing options."""

    name: Text
    estimator: Text
    params: dict[str, Any] = Field(default_factory=dict)
    scale: StrictBool = True
    large: LargeTableProfile | None = None

    _no_params = field_validator("params", mode="before")(_or_empty)

    @model_validator(mode="after")
    def _estimator(self) -> ModelSettings:
        from housing.models import ESTIMATORS, check_params

        for key, model in (("model", self), ("model.large", self.large_profile())):
            if model.estimator not in ESTIMATORS:
                raise ConfigError(
                    f"{key}.estimator: unknown estimator {model.estimator!r}; "
                    f"choose one of {', '.join(ESTIMATORS)}"
                )
            check_params(model.estimator, model.params, prefix=f"{key}.params")
        return self

    def large_profile(self) -> ModelSettings:
        """This candidate as it runs on a large table (itself without a ``large`` block)."""
        if self.large is None:
            return self
        swapped = self.large.estimator not in (None, self.estimator)
        params = dict(self.large.params) if swapped else {**self.params, **self.large.params}
        estimator = self.large.estimator or self.estimator
        return self.model_copy(update={"estimator": estimator, "params": params, "large": None})


class Paths(_Section):
    """Every file the pipeline reads or writes, absolute (relative ones join the root)."""

    raw: ProjectPath
    train: ProjectPath
    test: ProjectPath
    models_dir: ProjectPath
    metrics_dir: ProjectPath
    plots_dir: ProjectPath
    reports_dir: ProjectPath

    @field_validator("*", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError("expected a non-empty path")
        return value

    def model(self, name: str) -> Path:
        return self.models_dir / f"{name}.joblib"

    def train_metrics(self, name: str) -> Path:
        return self.metrics_dir / f"train_{name}.json"

    @property
    def best_model(self) -> Path:
        return self.models_dir / "best_model.joblib"

    @property
    def train_summary(self) -> Path:
        return self.metrics_dir / "train_metrics.json"

    @property
    def test_metrics(self) -> Path:
        return self.metrics_dir / "test_metrics.json"

    @property
    def test_summary(self) -> Path:
        """``metrics.json`` next to ``metrics_dir`` (the project root by default): the one
        DVC metrics file, the selected model's test scores as ``{"rmse", "mae", "r2"}``."""
        return self.metrics_dir.parent / "metrics.json"

    @staticmethod
    def meta(path: Path) -> Path:
        """The sibling ``<name>.meta.json`` holding a score file's non-numeric record."""
        return path.with_name(f"{path.stem}.meta.json")

    @property
    def fingerprint(self) -> Path:
        return self.metrics_dir / "data_fingerprint.json"

    @property
    def predictions(self) -> Path:
        return self.plots_dir / "test_predictions.csv"

    @property
    def comparison(self) -> Path:
        return self.plots_dir / "model_comparison.csv"

    @property
    def importances(self) -> Path:
        return self.plots_dir / "feature_importances.csv"


# --------------------------------------------------------------------------- stages


class PrepareSettings(_Section):
    test_size: Fraction
    random_state: Seed


class TrainSettings(_Section):
    val_size: Fraction
    random_state: Seed
    cv_folds: Folds
    large_table_rows: Annotated[StrictInt, Field(ge=1)]
    cv_folds_large: Folds | None
    n_jobs: Annotated[StrictInt, _refuse(0, "must be -1 (all cores) or a positive count")]
    refit_full: StrictBool

    def folds_for(self, n_rows: int) -> int:
        """CV folds to use for a train split of ``n_rows`` rows (0: no CV)."""
        if self.cv_folds_large is not None and n_rows > self.large_table_rows:
            return self.cv_folds_large
        return self.cv_folds


class SelectionSettings(_Section):
    candidates: Annotated[tuple[str, ...], Field(min_length=1)]
    metric: Literal[SELECTION_METRICS]  # type: ignore[valid-type]
    allow_missing: StrictBool

    @field_validator("candidates")
    @classmethod
    def _known(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        cdir = (info.context or {}).get("config_dir")
        known = available_choices(cdir, "model") if cdir else list(value)
        for name in value:
            if name not in known:
                raise ValueError(_unknown("model", name, known))
        if len(set(value)) != len(value):
            raise ValueError("duplicate names")
        return value

    @property
    def greater_is_better(self) -> bool:
        return greater_is_better(self.metric)


class RegistrySettings(_Section):
    champion_alias: Text = "champion"
    min_improvement: Annotated[Number, Field(ge=0)] = 0.0


class PredictSettings(_Section):
    """``housing predict``: rows read per chunk, where predictions go by default."""

    chunk_rows: Annotated[StrictInt, Field(ge=1)] = 100_000
    output_dir: ProjectPath = Path("predictions")


_AGE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def _age(value: Any) -> timedelta | None:
    """An age such as ``30d``, ``12h``, ``1d6h``, ``90m`` (None: no age limit)."""
    if value is None or isinstance(value, timedelta):
        return value
    match = _AGE.fullmatch(str(value).strip())
    if not str(value).strip() or match is None:
        raise ValueError(f"not an age like 30d, 12h or 1d6h, got {value!r}")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


class GcSettings(_Section):
    """``housing gc``: what retention keeps (``older_than`` None: any age may go)."""

    keep: Annotated[StrictInt, Field(ge=1)] = 5
    older_than: Annotated[timedelta | None, BeforeValidator(_age)] = None


class DriftSettings(_Section):
    """``housing drift`` and the drift checks of train, predict and prepare."""

    psi_threshold: Annotated[Number, Field(gt=0)] = 0.2
    p_value: Annotated[Number, Field(gt=0, lt=1)] = 0.01
    notify: StrictBool = True
    bins: Annotated[StrictInt, Field(ge=2, le=100)] = 10
    sample_size: Annotated[StrictInt, Field(ge=10, le=100_000)] = 1000


class ParamRange(_Section):
    """One searched parameter (``tune.space.<param>``): a ``float``/``int`` range from
    ``low`` to ``high`` (``log``: sampled on a log scale; ``step``: a grid), or
    ``categorical`` ``choices``."""

    type: Literal["float", "int", "categorical"]
    low: Number | None = None
    high: Number | None = None
    log: StrictBool = False
    step: Annotated[Number, Field(gt=0)] | None = None
    choices: Annotated[tuple[Any, ...], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParamRange:
        if self.type == "categorical":
            if self.choices is None or self.low is not None or self.high is not None:
                raise ValueError("categorical needs choices: [...] and no low/high")
            bad = [c for c in self.choices if not isinstance(c, str | int | float | None)]
            if bad:
                raise ValueError(f"choices must be numbers, strings or null, got {bad[0]!r}")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"{self.type} needs low and high (and no choices)")
        if self.low >= self.high:
            raise ValueError(f"low {self.low:g} must be < high {self.high:g}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log scale needs low > 0 and no step")
        if self.type == "int" and not all(
            float(v).is_integer() for v in (self.low, self.high, self.step or 1)
        ):
            raise ValueError("int needs whole low, high and step")
        return self


class TuneSettings(_Section):
    """``housing tune``: budget, parallel processes, sampler seed, where the study lives,
    and the search space of the chosen model (``conf/tune/<model>.yaml``)."""

    n_trials: Annotated[StrictInt, Field(ge=1)] | None = 50
    timeout: Annotated[Number, Field(gt=0)] | None = None  # seconds; None: no limit
    n_jobs: Annotated[StrictInt, Field(ge=1)] = 1
    seed: Seed = 42
    storage: ProjectPath = Path(".optuna/journal.log")
    space: dict[str, ParamRange] = Field(default_factory=dict)

    _no_space = field_validator("space", mode="before")(_or_empty)

    @model_validator(mode="after")
    def _budget(self) -> TuneSettings:
        if self.n_trials is None and self.timeout is None:
            raise ConfigError("tune.n_trials: null needs a tune.timeout (else no end)")
        return self


# --------------------------------------------------------------------------- tracking


class TrackingSettings(_Section):
    backends: tuple[Literal["mlflow", "clearml"], ...] = ()


class MLflowSettings(_Section):
    """The ``mlflow:`` section (``spool_dir`` absolute)."""

    tracking_uri: Text = "sqlite:///mlflow.db"
    experiment: Text = "housing"
    registry_uri: Text | None = None  # None: same as tracking_uri
    # A tracking server's budget: whole seconds per HTTP attempt (MLflow reads an int),
    # retries per call; an unreachable server sends the stage's record to spool_dir.
    timeout_sec: Annotated[StrictInt, Field(ge=1, le=600)] = 2
    retries: Annotated[StrictInt, Field(ge=0, le=10)] = 1
    spool_dir: ProjectPath = Path(".mlflow-spool")


class ClearMLServer(_Section):
    api_host: Url = "http://127.0.0.1:8008"
    web_host: Url = "http://127.0.0.1:8080"
    files_host: Url = "http://127.0.0.1:8081"


class ClearMLAuth(_Section):
    """Names of the environment variables holding the credentials (never the keys)."""

    access_key_env: Text = "CLEARML_API_ACCESS_KEY"
    secret_key_env: Text = "CLEARML_API_SECRET_KEY"


class ClearMLPipeline(_Section):
    execution_queue: Text = "default"
    run_locally: StrictBool = True
    controller_queue: Text | None = "services"
    schedule_cron: Text | None = None
    cache: StrictBool = True
    poll_sec: Annotated[Number, Field(gt=0)] = 5.0
    # on_change: skip the run ("skipped: no change") when the data's md5 is the newest
    # registered best version's, promoted or not, and nothing drifts
    # (housing.orchestration.pipeline.retrain_decision)
    retrain: Literal["always", "on_change"] = "always"

    @field_validator("schedule_cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        from housing.schedule import CronError, validate_cron

        try:
            return None if value is None else validate_cron(value, key="")
        except CronError as exc:
            raise ValueError(str(exc).removeprefix(": ")) from None


class ClearMLSettings(_Section):
    """The ``clearml:`` section (``offline_dir`` absolute)."""

    enabled: StrictBool = True
    mode: Literal["auto", "online", "offline"] = "auto"
    project_name: Text = "housing"
    task_prefix: Text = "housing"
    model_name: Text = "housing"
    output_uri: Text | None = None
    tags: tuple[str, ...] = ()
    offline_dir: ProjectPath = Path(".clearml")
    server: ClearMLServer = ClearMLServer()
    auth: ClearMLAuth = ClearMLAuth()
    connect_timeout_sec: Annotated[Number, Field(gt=0)] = 2.0
    pipeline: ClearMLPipeline = ClearMLPipeline()

    # Flat names still read by housing.reporting.compare; elsewhere, use server / auth.
    @property
    def api_host(self) -> str:
        return self.server.api_host

    @property
    def access_key_env(self) -> str:
        return self.auth.access_key_env

    @property
    def secret_key_env(self) -> str:
        return self.auth.secret_key_env


class WebhookSettings(_Section):
    url_env: Text = "HOUSING_WEBHOOK_URL"
    timeout_sec: Annotated[Number, Field(gt=0)] = 3.0
    retries: Annotated[StrictInt, Field(ge=0)] = 2
    backoff_sec: Annotated[Number, Field(ge=0)] = 0.5


class NotificationSettings(_Section):
    """Who hears about stage events besides ``metrics/pipeline_events.jsonl``."""

    console: StrictBool = False
    file: ProjectPath | None = None
    webhook: WebhookSettings | None = None  # true: defaults; null/false: off
    on: tuple[str, ...] = ("failed", "pipeline")

    @field_validator("webhook", mode="before")
    @classmethod
    def _webhook(cls, value: Any) -> Any:
        return {} if value is True else None if value is False else value

    @field_validator("file", mode="before")
    @classmethod
    def _file(cls, value: Any) -> Any:
        return None if value is False or value == "" else value

    @field_validator("on")
    @classmethod
    def _triggers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from housing.monitoring import NOTIFY_TRIGGERS

        for name in value:
            if name not in NOTIFY_TRIGGERS:
                raise ValueError(_unknown("trigger", name, sorted(NOTIFY_TRIGGERS)))
        return value


class Settings(_Section):
    """The validated configuration of one pipeline run."""

    root: Path
    config_dir: Path
    resolved: dict[str, Any]  # the whole composed config, plain values
    # Dotted key -> where its value came from, for keys not from conf/ (see source()).
    sources: dict[str, str] = {}
    data: DataSettings
    model: ModelSettings
    paths: Paths
    prepare: PrepareSettings
    train: TrainSettings
    selection: SelectionSettings
    tracking_: TrackingSettings = Field(alias="tracking")
    mlflow: MLflowSettings = MLflowSettings()
    clearml: ClearMLSettings = ClearMLSettings()
    registry: RegistrySettings = RegistrySettings()
    predict: PredictSettings = PredictSettings()
    gc: GcSettings = GcSettings()
    drift: DriftSettings = DriftSettings()
    tune: TuneSettings = TuneSettings()
    notifications: NotificationSettings = NotificationSettings()

    def source(self, key: str) -> str:
        """Where ``key``'s value came from: the command line, an environment variable
        (its name), ``CLEARML_CONFIG_FILE (<path>)`` or ``conf/``."""
        return self.sources.get(key, FROM_CONF)

    @property
    def tracking(self) -> tuple[str, ...]:
        """Active backends, in order; ``clearml.enabled: false`` drops ClearML."""
        return tuple(
            dict.fromkeys(
                b for b in self.tracking_.backends if b != "clearml" or self.clearml.enabled
            )
        )


# --------------------------------------------------------------------------- composition


def default_config_dir() -> Path:
    """``$HOUSING_CONFIG_DIR``, else ``./conf``, else the repository's ``conf/``."""
    env = os.environ.get("HOUSING_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    local = Path.cwd() / "conf"
    if (local / f"{CONFIG_NAME}.yaml").is_file():
        return local.resolve()
    return (Path(__file__).resolve().parents[2] / "conf").resolve()


def available_choices(config_dir: Path, group: str) -> list[str]:
    """The option names of a config group (``conf/<group>/*.yaml``)."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def compose(overrides: Sequence[str] = (), config_dir: Path | None = None) -> dict[str, Any]:
    """Compose ``conf/pipeline.yaml`` with Hydra overrides into plain, resolved values."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cdir = (config_dir or default_config_dir()).resolve()
    if not (cdir / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError(f"{cdir / (CONFIG_NAME + '.yaml')}: config file not found")
    _check_group_choices(cdir, overrides)
    try:
        with initialize_config_dir(config_dir=str(cdir), version_base=None):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{key}: {first_line(exc)} (set it, e.g. {key}=...)") from None
    except OverrideParseException as exc:
        bad = first_line(exc).rsplit(": ", 1)[-1]
        raise ConfigError(
            f"config override {bad!r}: cannot parse; quote special characters (key='value')"
        ) from None
    except HydraException as exc:
        raise _override_error(exc, overrides) from None
    if not isinstance(container, dict):  # pragma: no cover - pipeline.yaml is a mapping
        raise ConfigError(f"{cdir}/{CONFIG_NAME}.yaml must be a mapping")
    notifications = container.get("notifications")
    if isinstance(notifications, dict) and True in notifications:
        # `dvc exp run -S conf/pipeline.yaml:...` rewrites the file without the quotes
        # around "on", which Hydra's YAML 1.1 loader then reads as the key true.
        container["notifications"] = {
            "on" if key is True else key: item for key, item in notifications.items()
        }
    return {str(k): v for k, v in container.items()}


def _override_error(exc: BaseException, overrides: Sequence[str]) -> ConfigError:
    """``key: unknown key; did you mean ...?`` for an override of a key the config lacks."""
    cause = exc.__cause__
    parent, key = getattr(cause, "parent_node", None), getattr(cause, "key", None)
    full_key = str(getattr(cause, "full_key", "") or "")
    if not isinstance(parent, Mapping) or not isinstance(key, str) or not full_key:
        return ConfigError(f"config override: {first_line(exc)}")
    prefix = full_key[: -len(key)]
    hint = _did_you_mean(key, [str(k) for k in parent], prefix)
    item = next((o for o in overrides if o.partition("=")[0].startswith(full_key)), None)
    add = f" (use +{item} to add a new key)" if item else ""
    return ConfigError(f"{full_key}: unknown key{hint}{add}")


def _check_group_choices(config_dir: Path, overrides: Sequence[str]) -> None:
    """Name the valid choices when an override picks a config that does not exist."""
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if not sep or "." in key or not (config_dir / key).is_dir():
            continue
        choices = available_choices(config_dir, key)
        if value not in choices:
            raise ConfigError(f"{key}={value}: unknown {key}; choose one of {', '.join(choices)}")


def load_settings(
    overrides: Sequence[str] = (),
    config_dir: Path | None = None,
    root: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Compose and validate the config; the one call every entry point makes.

    ``env`` (default ``os.environ``) supplies the trackers' standard variables
    (:data:`STANDARD_ENV`) for the keys no override sets."""
    cdir = (config_dir or default_config_dir()).resolve()
    cfg = compose(overrides, cdir)
    root = (root or Path.cwd()).resolve()
    extra = sorted(set(cfg) & {"root", "config_dir", "resolved", "sources"})
    if extra:
        raise ConfigError(f"{extra[0]}: unknown key")
    sources = apply_environment(cfg, overrides, os.environ if env is None else env)
    values = {**cfg, "root": root, "config_dir": cdir, "resolved": dict(cfg), "sources": sources}
    try:
        return Settings.model_validate(values, context={"root": root, "config_dir": cdir})
    except ValidationError as exc:
        raise ConfigError(_error_line(exc.errors()[0])) from None


def apply_environment(
    cfg: dict[str, Any], overrides: Sequence[str], env: Mapping[str, str]
) -> dict[str, str]:
    """Set the :data:`STANDARD_ENV` keys no override names from ``env`` (in place); return
    where each non-``conf/`` value came from."""
    named = [o.partition("=")[0].lstrip("+~") for o in overrides if "=" in o or o.startswith("~")]
    sources: dict[str, str] = {}
    file_values: dict[str, str] | None = None
    conf_file = env.get("CLEARML_CONFIG_FILE", "")
    for key, variable in STANDARD_ENV.items():
        if any(key == n or key.startswith(n + ".") for n in named):
            sources[key] = FROM_COMMAND_LINE
            continue
        value, source = env.get(variable, ""), variable
        if not value and key in _CONFIG_FILE_KEYS and conf_file:
            if file_values is None:
                file_values = read_clearml_conf(Path(conf_file).expanduser())
            value = file_values.get(_CONFIG_FILE_KEYS[key], "")
            source = f"CLEARML_CONFIG_FILE ({conf_file})"
        if not value:
            continue
        section, *middle, leaf = key.split(".")
        node = cfg.get(section)
        for part in middle:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[leaf] = value
            sources[key] = source
    for name in named:  # other keys the command line set, for `housing config`
        sources.setdefault(name, FROM_COMMAND_LINE)
    return sources


_CONF_VALUE: Final = re.compile(
    r"""^\s*(?:api\s*\.\s*|credentials\s*\.\s*|api\.credentials\s*\.\s*)?
        "?(?P<key>access_key|secret_key|api_server|web_server|files_server)"?
        \s*[:=]\s*(?P<value>"[^"\n]*"|[^\s"#,}{]+)""",
    re.VERBOSE,
)


def read_clearml_conf(path: Path) -> dict[str, str]:
    """Best-effort read of the literal hosts and API keys of a ClearML HOCON file.

    Only plain ``key: value`` lines are understood (parsing HOCON properly means
    importing the SDK, about 1 s, in every command); substitutions (``${?VAR}``) are
    skipped (the variables are consulted first anyway). Later lines win, as in HOCON. An
    unreadable file gives nothing.
    """
    found: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return found
    for match in filter(None, map(_CONF_VALUE.match, text.splitlines())):
        value = match.group("value").strip('"').strip()
        if value and not value.startswith("$"):
            found[match.group("key")] = value
    return found


_EXPECTED = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "string": "a string",
    "dict": "a mapping",
    "model": "a mapping",
    "tuple": "a list",
    "list": "a list",
    "path": "a path",
}


def _error_line(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    kind, ctx, value = str(error["type"]), error.get("ctx") or {}, error.get("input")
    if kind == "extra_forbidden":
        names = _fields_at(Settings, loc[:-1])
        prefix = key[: -len(str(loc[-1]))]
        return f"{key}: unknown key{_did_you_mean(str(loc[-1]), names, prefix)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "value_error":
        why = str(ctx.get("error", error["msg"]))
        if repr(value) in why or isinstance(value, list | tuple | dict):
            return f"{key}: {why}"
    elif kind.endswith("too_short"):
        why = "must not be empty"
    elif kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"{key}: {_unknown('value', value, choices)}"
    elif kind.partition("_")[0] in _EXPECTED and kind.endswith(("_type", "_parsing")):
        why = f"expected {_EXPECTED[kind.partition('_')[0]]}"
    else:
        why = re.sub(r"^Input should (be )?", "must be ", str(error["msg"]))
        for word, sign in (("greater", ">"), ("less", "<")):
            why = why.replace(f"{word} than or equal to", f"{sign}=").replace(f"{word} than", sign)
    return f"{key}: {why}, got {value!r}"


def _unknown(what: str, value: Any, choices: Sequence[str]) -> str:
    hint = _did_you_mean(str(value), choices)
    return f"unknown {what} {value!r}{hint or '; choose one of ' + ', '.join(choices)}"


def _did_you_mean(name: str, choices: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Input names of the model found at ``loc`` (dict keys and list indexes skipped)."""
    for part in loc:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        if part not in fields:
            continue
        annotation = fields[part].annotation
        nested = [a for a in (annotation, *get_args(annotation)) if _is_model(a)]
        if nested:  # Model, Model | None, dict[str, Model]
            model = nested[0]
    return [f.alias or n for n, f in model.model_fields.items()]


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)
