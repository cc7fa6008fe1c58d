"""Deterministic splits, index-compatible with scikit-learn's ``train_test_split``.

Implemented with NumPy so the prepare stage does not import scikit-learn; a test
checks the indices equal ``train_test_split(..., shuffle=True, random_state=...)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from housing.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


def split_indices(
    n_rows: int, test_size: float, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row positions: a seeded permutation, test taken first."""
    import numpy as np

    n_test = math.ceil(test_size * n_rows)
    n_train = n_rows - n_test
    if n_test < 1 or n_train < 1:
        raise DataError(
            f"{n_rows} rows cannot be split with test_size={test_size:g}: one side would be empty"
        )
    perm = np.random.RandomState(random_state).permutation(n_rows)
    return perm[n_test:], perm[:n_test]


def split_frame(
    frame: pd.DataFrame, test_size: float, random_state: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test) frames with fresh indexes."""
    train_idx, test_idx = split_indices(len(frame), test_size, random_state)
    return (
        frame.iloc[train_idx].reset_index(drop=True),
        frame.iloc[test_idx].reset_index(drop=True),
    )
