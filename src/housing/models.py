"""Estimator factory: the one place that knows every algorithm.

``ESTIMATORS`` maps a config key (``model.estimator``) to its scikit-learn class,
imported only when a model is built, so stages that never fit pay no import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from housing.errors import ConfigError, first_line
from housing.quirks.sklearn import validate_params

#: config key -> (module, class, whether it accepts n_jobs)
ESTIMATORS: dict[str, tuple[str, str, bool]] = {
    "linear_regression": ("sklearn.linear_model", "LinearRegression", False),
    "ridge": ("sklearn.linear_model", "Ridge", False),
    "random_forest": ("sklearn.ensemble", "RandomForestRegressor", True),
    "extra_trees": ("sklearn.ensemble", "ExtraTreesRegressor", True),
    "gradient_boosting": ("sklearn.ensemble", "GradientBoostingRegressor", False),
    "hist_gradient_boosting": ("sklearn.ensemble", "HistGradientBoostingRegressor", False),
}

Rule = Callable[[Any], bool]


def _number(text: str, test: Callable[[float], bool], allow_none: bool) -> tuple[Rule, str]:
    def rule(v: Any) -> bool:
        if v is None:
            return allow_none
        return isinstance(v, int | float) and not isinstance(v, bool) and test(v)

    return rule, text + (" or null" if allow_none else "")


def _ge(bound: float, *, allow_none: bool = False) -> tuple[Rule, str]:
    return _number(f"a number >= {bound:g}", lambda v: v >= bound, allow_none)


def _gt(bound: float) -> tuple[Rule, str]:
    return _number(f"a number > {bound:g}", lambda v: v > bound, False)


def _unit(*, allow_none: bool = False) -> tuple[Rule, str]:
    return _number("a fraction in (0, 1]", lambda v: 0 < v <= 1, allow_none)


#: Cheap checks done when the config is validated, before any import or data read.
#: Everything else scikit-learn validates when the estimator is built.
_RULES: dict[str, dict[str, tuple[Rule, str]]] = {
    "ridge": {"alpha": _ge(0)},
    "random_forest": {
        "n_estimators": _ge(1),
        "max_depth": _ge(1, allow_none=True),
        "max_samples": _unit(allow_none=True),
    },
    "extra_trees": {"n_estimators": _ge(1), "max_depth": _ge(1, allow_none=True)},
    "gradient_boosting": {
        "n_estimators": _ge(1),
        "learning_rate": _gt(0),
        "max_depth": _ge(1, allow_none=True),
        "subsample": _unit(),
    },
    "hist_gradient_boosting": {
        "max_iter": _ge(1),
        "learning_rate": _gt(0),
        "max_leaf_nodes": _ge(2, allow_none=True),
        "min_samples_leaf": _ge(1),
        "l2_regularization": _ge(0),
    },
}


def check_params(
    estimator: str, params: Mapping[str, Any], *, prefix: str = "model.params"
) -> None:
    """Raise :class:`ConfigError` naming ``<prefix>.<key>`` for an out-of-range value."""
    for key, (rule, expected) in _RULES.get(estimator, {}).items():
        if key in params and not rule(params[key]):
            raise ConfigError(f"{prefix}.{key}: {estimator} needs {expected}, got {params[key]!r}")


def build_estimator(estimator: str, params: Mapping[str, Any], n_jobs: int | None = None) -> Any:
    """Instantiate and validate an estimator; bad params become a one-line ConfigError."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"model.estimator: unknown estimator {estimator!r}")
    check_params(estimator, params)
    module, cls_name, takes_n_jobs = ESTIMATORS[estimator]
    cls = getattr(importlib.import_module(module), cls_name)
    known = set(cls().get_params())
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"model.params.{unknown[0]}: not a parameter of {cls_name}; "
            f"known: {', '.join(sorted(known))}"
        )
    kwargs = dict(params)
    if takes_n_jobs and n_jobs is not None and "n_jobs" not in kwargs:
        kwargs["n_jobs"] = n_jobs
    model = cls(**kwargs)
    try:
        validate_params(model)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.params: {first_line(exc)}") from None
    return model


def build_pipeline(
    estimator: str,
    params: Mapping[str, Any],
    features: Sequence[str],
    *,
    scale: bool = True,
    n_jobs: int | None = None,
) -> Any:
    """Preprocessing + estimator as one scikit-learn ``Pipeline`` (the saved artifact)."""
    from sklearn.pipeline import Pipeline

    from housing.features import build_preprocessor

    return Pipeline(
        [
            ("preprocess", build_preprocessor(features, scale=scale)),
            ("model", build_estimator(estimator, params, n_jobs=n_jobs)),
        ]
    )
