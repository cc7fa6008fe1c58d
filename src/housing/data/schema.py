"""Schema validation: required columns, numeric types, finite values, ranges, missing
values, rows.

A violation raises one :class:`DataError` line naming the file, the column and how
many rows fail, before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from housing.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from housing.config import Schema


@dataclass(frozen=True)
class Violation:
    column: str
    rows: int
    problem: str

    def describe(self) -> str:
        noun = "row" if self.rows == 1 else "rows"
        return f"column {self.column!r}: {self.rows} {noun} {self.problem}"


def find_violations(frame: pd.DataFrame, schema: Schema, target: str) -> list[Violation]:
    """Every schema violation of ``frame`` (an empty list when it is valid)."""
    import numpy as np
    import pandas as pd

    found: list[Violation] = []
    missing_cols = [c for c in (*schema.columns, target) if c not in frame.columns]
    for col in dict.fromkeys(missing_cols):
        found.append(Violation(col, len(frame), "missing: required column not in the table"))
    if len(frame) < schema.min_rows:
        found.append(
            Violation("*", len(frame), f"in the table; data.schema.min_rows is {schema.min_rows}")
        )
    for col in frame.columns:
        raw = frame[col]
        values = pd.to_numeric(raw, errors="coerce")
        bad_type = int((values.isna() & raw.notna()).sum())
        if bad_type:
            example = raw[values.isna() & raw.notna()].iloc[0]
            found.append(Violation(str(col), bad_type, f"not numeric (e.g. {example!r})"))
        infinite = np.isinf(values)
        if n_inf := int(infinite.sum()):
            found.append(Violation(str(col), n_inf, "not finite (inf or -inf)"))
            values = values.mask(infinite)  # counted once, not again as out of range
        rule = schema.columns.get(str(col))
        nullable = schema.allow_missing if rule is None or rule.nullable is None else rule.nullable
        if col == target:
            nullable = False
        n_missing = int(raw.isna().sum())
        if n_missing and not nullable:
            found.append(Violation(str(col), n_missing, "missing (empty or NaN)"))
        if rule is None:
            continue
        if rule.min is not None and (n := int((values < rule.min).sum())):
            found.append(Violation(str(col), n, f"below min {rule.min:g}"))
        if rule.max is not None and (n := int((values > rule.max).sum())):
            found.append(Violation(str(col), n, f"above max {rule.max:g}"))
        if rule.allowed is not None:
            outside = values.notna() & ~values.isin(rule.allowed)
            if n := int(outside.sum()):
                allowed = ", ".join(f"{v:g}" for v in rule.allowed)
                found.append(Violation(str(col), n, f"not one of [{allowed}]"))
    return found


def validate(frame: pd.DataFrame, schema: Schema, target: str, origin: str) -> pd.DataFrame:
    """Return ``frame`` as float64 columns with the target last, or raise DataError.

    The message is one line: ``<origin>: column 'x': N rows <problem>`` plus a count
    of further problems.
    """
    import pandas as pd

    _refuse(find_violations(frame, schema, target), origin)
    features = [c for c in frame.columns if c != target]
    out: pd.DataFrame = frame[[*features, target]].apply(pd.to_numeric).astype("float64")
    out.columns = [str(c) for c in out.columns]
    return out


def check_split(
    frame: pd.DataFrame, features: Sequence[str], target: str, origin: str, fix: str
) -> None:
    """Refuse a processed split a later stage cannot use, in one DataError line ending in
    ``fix``: a needed column (``features``, the target) absent, a value not numeric or not
    finite, a missing target. Missing feature values pass (the model imputes them)."""
    from housing.config import ColumnRule, Schema

    rules = Schema(allow_missing=True, columns={str(f): ColumnRule() for f in features})
    _refuse(find_violations(frame, rules, target), origin, f"; {fix}")


def _refuse(violations: list[Violation], origin: str, fix: str = "") -> None:
    if violations:
        first, rest = violations[0], violations[1:]
        more = f" (+{len(rest)} more: {', '.join(v.column for v in rest[:5])})" if rest else ""
        raise DataError(f"{origin}: {first.describe()}{more}{fix}")
