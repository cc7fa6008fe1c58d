"""The preprocessing half of the model ``Pipeline``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def build_preprocessor(features: Sequence[str], *, scale: bool = True) -> Any:
    """Median imputation (then standard scaling when ``scale``) of numeric features.

    Output keeps the feature names (``set_output(transform="pandas")`` is not used, to
    keep prediction on plain arrays cheap); ``features`` fixes the input columns.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median"))]
    if scale:
        steps.append(("scale", StandardScaler()))
    return ColumnTransformer(
        [("numeric", Pipeline(steps), list(features))],
        remainder="drop",
        verbose_feature_names_out=False,
    )
