"""Typed settings composed from the Hydra config in ``conf/``.

Entry points call :func:`load_settings` (compose + validate) once; everything below
them receives plain, frozen dataclasses. Every check of a config value lives here
and names the key to fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from housing.errors import ConfigError

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
DATA_SOURCES = ("boston", "california", "csv", "synthetic")
TRACKING_BACKENDS = ("mlflow", "clearml")


def greater_is_better(metric: str) -> bool:
    """Whether a higher value of ``metric`` is better (r2) or worse (rmse, mae)."""
    return metric.endswith("r2")


@dataclass(frozen=True)
class ColumnRule:
    """Checks on one column: numeric range, allowed values, missing values."""

    min: float | None = None
    max: float | None = None
    allowed: tuple[float, ...] | None = None
    nullable: bool | None = None  # None: the schema's allow_missing decides


@dataclass(frozen=True)
class Schema:
    """Table-level checks plus per-column rules (listed columns are required)."""

    min_rows: int = 1
    allow_missing: bool = False
    columns: Mapping[str, ColumnRule] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSettings:
    """Where the raw table comes from and what it must look like."""

    name: str
    source: str
    target: str
    schema: Schema
    drop_columns: tuple[str, ...] = ()
    path: Path | None = None
    sep: str = ","
    cache_dir: Path | None = None
    n_rows: int | None = None
    noise: float = 0.05
    random_state: int = 42


@dataclass(frozen=True)
class ModelSettings:
    """One candidate model: the estimator key, its params, preprocessing options."""

    name: str
    estimator: str
    params: Mapping[str, Any]
    scale: bool = True


@dataclass(frozen=True)
class Paths:
    """Every file the pipeline reads or writes, absolute."""

    raw: Path
    train: Path
    test: Path
    models_dir: Path
    metrics_dir: Path
    plots_dir: Path
    reports_dir: Path

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


@dataclass(frozen=True)
class PrepareSettings:
    test_size: float
    random_state: int


@dataclass(frozen=True)
class TrainSettings:
    val_size: float
    random_state: int
    cv_folds: int
    large_table_rows: int
    cv_folds_large: int | None
    n_jobs: int
    refit_full: bool

    def folds_for(self, n_rows: int) -> int:
        """CV folds to use for a train split of ``n_rows`` rows (0: no CV)."""
        if self.cv_folds_large is not None and n_rows > self.large_table_rows:
            return self.cv_folds_large
        return self.cv_folds


@dataclass(frozen=True)
class SelectionSettings:
    candidates: tuple[str, ...]
    metric: str
    allow_missing: bool

    @property
    def greater_is_better(self) -> bool:
        return greater_is_better(self.metric)


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one pipeline run."""

    root: Path
    config_dir: Path
    data: DataSettings
    model: ModelSettings
    paths: Paths
    prepare: PrepareSettings
    train: TrainSettings
    selection: SelectionSettings
    tracking: tuple[str, ...]  # active backends, in order (mlflow, clearml)
    resolved: Mapping[str, Any]  # the whole composed config, plain values

    def section(self, key: str) -> Mapping[str, Any]:
        """A top-level config section as plain values ({} when absent)."""
        value = self.resolved.get(key)
        return value if isinstance(value, Mapping) else {}


# ---------------------------------------------------------------------------
# Composition


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
        raise ConfigError(f"{key}: {_first_line(exc)} (set it, e.g. {key}=...)") from None
    except OverrideParseException as exc:
        bad = _first_line(exc).rsplit(": ", 1)[-1]
        raise ConfigError(
            f"config override {bad!r}: cannot parse; quote special characters (key='value')"
        ) from None
    except HydraException as exc:
        raise ConfigError(f"config override: {_first_line(exc)}") from None
    if not isinstance(container, dict):  # pragma: no cover - pipeline.yaml is a mapping
        raise ConfigError(f"{cdir}/{CONFIG_NAME}.yaml must be a mapping")
    return {str(k): v for k, v in container.items()}


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_settings(
    overrides: Sequence[str] = (),
    config_dir: Path | None = None,
    root: Path | None = None,
) -> Settings:
    """Compose and validate the config; the one call every entry point makes."""
    cdir = (config_dir or default_config_dir()).resolve()
    resolved = compose(overrides, cdir)
    return build_settings(resolved, config_dir=cdir, root=root or Path.cwd())


# ---------------------------------------------------------------------------
# Validation


def build_settings(cfg: Mapping[str, Any], *, config_dir: Path, root: Path) -> Settings:
    """Validate a composed config (plain mapping) into :class:`Settings`."""
    root = root.resolve()
    return Settings(
        root=root,
        config_dir=config_dir,
        data=_data(_section(cfg, "data")),
        model=_model(_section(cfg, "model")),
        paths=_paths(_section(cfg, "paths"), root),
        prepare=_prepare(_section(cfg, "prepare")),
        train=_train(_section(cfg, "train")),
        selection=_selection(_section(cfg, "selection"), config_dir),
        tracking=_tracking(cfg),
        resolved=cfg,
    )


def _section(cfg: Mapping[str, Any], key: str, parent: str = "") -> Mapping[str, Any]:
    full = f"{parent}{key}"
    value = cfg.get(key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{full}: missing or not a mapping in the config")
    return value


def _get(section: Mapping[str, Any], key: str, prefix: str) -> Any:
    if key not in section:
        raise ConfigError(f"{prefix}.{key}: required key is missing")
    return section[key]


def _number(section: Mapping[str, Any], key: str, prefix: str) -> float:
    value = _get(section, key, prefix)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{prefix}.{key}: expected a number, got {value!r}")
    return float(value)


def _int(section: Mapping[str, Any], key: str, prefix: str, minimum: int | None = None) -> int:
    value = _get(section, key, prefix)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{prefix}.{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{prefix}.{key}: must be >= {minimum}, got {value}")
    return value


def _bool(section: Mapping[str, Any], key: str, prefix: str) -> bool:
    value = _get(section, key, prefix)
    if not isinstance(value, bool):
        raise ConfigError(f"{prefix}.{key}: expected true or false, got {value!r}")
    return value


def _str(section: Mapping[str, Any], key: str, prefix: str) -> str:
    value = _get(section, key, prefix)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{prefix}.{key}: expected a non-empty string, got {value!r}")
    return value


def _fraction(section: Mapping[str, Any], key: str, prefix: str) -> float:
    value = _number(section, key, prefix)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{prefix}.{key}: must be between 0 and 1 (exclusive), got {value:g}")
    return value


def _str_list(section: Mapping[str, Any], key: str, prefix: str) -> tuple[str, ...]:
    value = section.get(key) or []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{prefix}.{key}: expected a list of names, got {value!r}")
    return tuple(value)


def _schema(section: Mapping[str, Any]) -> Schema:
    prefix = "data.schema"
    columns: dict[str, ColumnRule] = {}
    raw_cols = section.get("columns") or {}
    if not isinstance(raw_cols, Mapping):
        raise ConfigError(f"{prefix}.columns: expected a mapping of column rules")
    for name, raw_rule in raw_cols.items():
        cprefix = f"{prefix}.columns.{name}"
        rule = raw_rule or {}
        if not isinstance(rule, Mapping):
            raise ConfigError(f"{cprefix}: expected a mapping like {{min: 0, max: 100}}")
        unknown = set(rule) - {"min", "max", "allowed", "nullable"}
        if unknown:
            raise ConfigError(
                f"{cprefix}.{sorted(unknown)[0]}: unknown rule (min, max, allowed, nullable)"
            )
        lo = _number(rule, "min", cprefix) if rule.get("min") is not None else None
        hi = _number(rule, "max", cprefix) if rule.get("max") is not None else None
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"{cprefix}: min {lo:g} is greater than max {hi:g}")
        allowed = rule.get("allowed")
        if allowed is not None and (
            not isinstance(allowed, list) or not all(isinstance(v, int | float) for v in allowed)
        ):
            raise ConfigError(f"{cprefix}.allowed: expected a list of numbers, got {allowed!r}")
        nullable = rule.get("nullable")
        if nullable is not None and not isinstance(nullable, bool):
            raise ConfigError(f"{cprefix}.nullable: expected true or false, got {nullable!r}")
        columns[str(name)] = ColumnRule(
            lo, hi, tuple(float(v) for v in allowed) if allowed is not None else None, nullable
        )
    return Schema(
        min_rows=_int(section, "min_rows", prefix, minimum=1),
        allow_missing=_bool(section, "allow_missing", prefix),
        columns=columns,
    )


def _data(section: Mapping[str, Any]) -> DataSettings:
    prefix = "data"
    source = _str(section, "source", prefix)
    if source not in DATA_SOURCES:
        raise ConfigError(f"data.source: unknown source {source!r}; choose one of {DATA_SOURCES}")
    path = section.get("path")
    if source == "csv":
        path = _str(section, "path", prefix)
    sep = section.get("sep", ",")
    if not isinstance(sep, str) or not sep:
        raise ConfigError(f"data.sep: expected a separator string, got {sep!r}")
    n_rows = None
    if source == "synthetic":
        n_rows = _int(section, "n_rows", prefix, minimum=100)
    noise = float(section.get("noise", 0.05))
    if noise < 0:
        raise ConfigError(f"data.noise: must be >= 0, got {noise:g}")
    cache_dir = section.get("cache_dir")
    target = _str(section, "target", prefix)
    drop = _str_list(section, "drop_columns", prefix)
    if target in drop:
        raise ConfigError(f"data.drop_columns: cannot drop the target column {target!r}")
    return DataSettings(
        name=_str(section, "name", prefix),
        source=source,
        target=target,
        schema=_schema(_section(section, "schema", "data.")),
        drop_columns=drop,
        path=Path(path) if path else None,
        sep=sep,
        cache_dir=Path(cache_dir) if cache_dir else None,
        n_rows=n_rows,
        noise=noise,
        random_state=int(section.get("random_state", 42)),
    )


def _model(section: Mapping[str, Any]) -> ModelSettings:
    from housing.models import ESTIMATORS, check_params

    prefix = "model"
    estimator = _str(section, "estimator", prefix)
    if estimator not in ESTIMATORS:
        raise ConfigError(
            f"model.estimator: unknown estimator {estimator!r}; "
            f"choose one of {', '.join(ESTIMATORS)}"
        )
    params = section.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError("model.params: expected a mapping of estimator parameters")
    check_params(estimator, params)
    return ModelSettings(
        name=_str(section, "name", prefix),
        estimator=estimator,
        params=dict(params),
        scale=_bool(section, "scale", prefix),
    )


def _paths(section: Mapping[str, Any], root: Path) -> Paths:
    keys = ("raw", "train", "test", "models_dir", "metrics_dir", "plots_dir", "reports_dir")
    values = {k: root / _str(section, k, "paths") for k in keys}
    return Paths(**values)


def _prepare(section: Mapping[str, Any]) -> PrepareSettings:
    return PrepareSettings(
        test_size=_fraction(section, "test_size", "prepare"),
        random_state=_int(section, "random_state", "prepare", minimum=0),
    )


def _train(section: Mapping[str, Any]) -> TrainSettings:
    p = "train"
    folds = _int(section, "cv_folds", p, minimum=0)
    if folds == 1:
        raise ConfigError("train.cv_folds: must be 0 (no CV) or at least 2, got 1")
    large = section.get("cv_folds_large")
    if large is not None:
        large = _int(section, "cv_folds_large", p, minimum=0)
        if large == 1:
            raise ConfigError("train.cv_folds_large: must be 0 (no CV) or at least 2, got 1")
    n_jobs = _int(section, "n_jobs", p)
    if n_jobs == 0:
        raise ConfigError("train.n_jobs: must be -1 (all cores) or a positive count, got 0")
    return TrainSettings(
        val_size=_fraction(section, "val_size", p),
        random_state=_int(section, "random_state", p, minimum=0),
        cv_folds=folds,
        large_table_rows=_int(section, "large_table_rows", p, minimum=1),
        cv_folds_large=large,
        n_jobs=n_jobs,
        refit_full=_bool(section, "refit_full", p),
    )


def _selection(section: Mapping[str, Any], config_dir: Path) -> SelectionSettings:
    p = "selection"
    candidates = _str_list(section, "candidates", p)
    if not candidates:
        raise ConfigError("selection.candidates: name at least one model")
    known = available_choices(config_dir, "model")
    for name in candidates:
        if name not in known:
            raise ConfigError(
                f"selection.candidates: unknown model {name!r}; choose from {', '.join(known)}"
            )
    if len(set(candidates)) != len(candidates):
        raise ConfigError(f"selection.candidates: duplicate names in {list(candidates)}")
    metric = _str(section, "metric", p)
    if metric not in SELECTION_METRICS:
        raise ConfigError(
            f"selection.metric: unknown metric {metric!r}; "
            f"choose one of {', '.join(SELECTION_METRICS)}"
        )
    return SelectionSettings(
        candidates=candidates, metric=metric, allow_missing=_bool(section, "allow_missing", p)
    )


def _tracking(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    section = cfg.get("tracking") or {}
    if not isinstance(section, Mapping):
        raise ConfigError("tracking: expected a mapping; choose tracking=both|mlflow|clearml|none")
    backends = _str_list(section, "backends", "tracking")
    for name in backends:
        if name not in TRACKING_BACKENDS:
            raise ConfigError(
                f"tracking.backends: unknown backend {name!r}; choose from mlflow, clearml"
            )
    clearml = cfg.get("clearml") or {}
    if isinstance(clearml, Mapping) and clearml.get("enabled") is False:
        backends = tuple(b for b in backends if b != "clearml")
    return tuple(dict.fromkeys(backends))
