"""Bare baseline: the pipeline's sklearn work in one process, no DVC/Hydra/files.

Same data, split, candidates, holdout validation, 5-fold CV, refit and test
evaluation as the pipeline's defaults; imports included in the timing.
"""

from __future__ import annotations

import json
import sys
import time

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor  # noqa: E402
from sklearn.impute import SimpleImputer  # noqa: E402
from sklearn.linear_model import LinearRegression, Ridge  # noqa: E402
from sklearn.model_selection import KFold, train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from housing.data.sources import BOSTON_COLUMNS, boston_csv_path  # noqa: E402


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def main() -> None:
    t_import = time.perf_counter() - T0
    df = pd.read_csv(boston_csv_path(), header=None, names=list(BOSTON_COLUMNS))
    x, y = df.drop(columns=["medv"]), df["medv"]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=42)
    x_fit, x_val, y_fit, y_val = train_test_split(x_tr, y_tr, test_size=0.2, random_state=42)
    features = list(x.columns)

    def pipe(est: object, scale: bool) -> Pipeline:
        steps: list[tuple[str, object]] = [("impute", SimpleImputer(strategy="median"))]
        if scale:
            steps.append(("scale", StandardScaler()))
        pre = ColumnTransformer([("numeric", Pipeline(steps), features)])
        return Pipeline([("preprocess", pre), ("model", est)])

    candidates = {
        "linear_regression": pipe(LinearRegression(), True),
        "ridge": pipe(Ridge(alpha=1.0), True),
        "random_forest": pipe(
            RandomForestRegressor(n_estimators=100, max_depth=10, random_state=42, n_jobs=-1),
            False,
        ),
        "gradient_boosting": pipe(
            GradientBoostingRegressor(
                n_estimators=300, learning_rate=0.05, max_depth=3, subsample=0.8, random_state=42
            ),
            False,
        ),
    }
    cv_scores = {}
    finals = {}
    for name, model in candidates.items():
        holdout = clone(model).fit(x_fit, y_fit)
        rmse(y_val, holdout.predict(x_val))
        scores = []
        for tr, va in KFold(5, shuffle=True, random_state=42).split(x_tr):
            m = clone(model).fit(x_tr.iloc[tr], y_tr.iloc[tr])
            scores.append(rmse(y_tr.iloc[va], m.predict(x_tr.iloc[va])))
        cv_scores[name] = float(np.mean(scores))
        finals[name] = clone(model).fit(x_tr, y_tr)
    best = min(cv_scores, key=lambda n: cv_scores[n])
    test_rmse = rmse(y_te, finals[best].predict(x_te))
    total = time.perf_counter() - T0
    json.dump(
        {"best": best, "test_rmse": test_rmse, "import_sec": t_import, "total_sec": total},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
