"""Regression metrics and the data behind the standard figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, prefix: str) -> dict[str, float]:
    """``<prefix>/rmse``, ``<prefix>/mae`` and ``<prefix>/r2`` as plain floats."""
    import numpy as np

    yt = np.asarray(y_true, dtype="float64")
    yp = np.asarray(y_pred, dtype="float64")
    err = yp - yt
    ss_res = float(np.sum(err**2))
    ss_tot = float(np.sum((yt - yt.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {
        f"{prefix}/rmse": float(np.sqrt(np.mean(err**2))),
        f"{prefix}/mae": float(np.mean(np.abs(err))),
        f"{prefix}/r2": r2,
    }


def prediction_table(y_true: np.ndarray, y_pred: np.ndarray) -> pd.DataFrame:
    """Predicted vs actual with residuals (actual - predicted): the plot data."""
    import numpy as np
    import pandas as pd

    yt = np.asarray(y_true, dtype="float64")
    yp = np.asarray(y_pred, dtype="float64")
    return pd.DataFrame({"actual": yt, "predicted": yp, "residual": yt - yp})


def feature_importances(pipeline: Any, features: Sequence[str]) -> dict[str, float]:
    """Importances of a fitted Pipeline: tree importances, else |coefficients|.

    Empty when the estimator exposes neither (e.g. histogram gradient boosting).
    """
    import numpy as np

    model = pipeline.named_steps["model"] if hasattr(pipeline, "named_steps") else pipeline
    values = getattr(model, "feature_importances_", None)
    if values is None:
        coef = getattr(model, "coef_", None)
        if coef is None:
            return {}
        values = np.abs(np.ravel(coef))
    if len(values) != len(features):
        return {}
    return {str(f): float(v) for f, v in zip(features, values, strict=True)}
