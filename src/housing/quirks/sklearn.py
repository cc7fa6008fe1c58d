"""scikit-learn quirks (locked: scikit-learn 1.9.1)."""

from __future__ import annotations

from typing import Any


def validate_params(estimator: Any) -> None:
    """Check an unfitted estimator's constructor parameters now, raising scikit-learn's
    own ``ValueError``/``TypeError`` (``InvalidParameterError``) for a bad one.

    scikit-learn 1.9.1 checks parameters only inside ``fit``; the check itself is the
    private ``BaseEstimator._validate_params`` (since 1.2). A bad config value should
    fail before any data is read, so it is called here. Without it, nothing is checked
    here and ``fit`` reports the same error later.
    """
    validate = getattr(estimator, "_validate_params", None)
    if callable(validate):
        validate()
