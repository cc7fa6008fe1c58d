"""Data sources, schema validation failure contracts and split determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from housing.config import ColumnRule, Schema
from housing.data import schema, sources
from housing.data.split import split_frame, split_indices
from housing.errors import DataError
from housing.stages import prepare

from .conftest import SettingsFactory, csv_overrides


def test_boston_loads_from_the_installed_mlxtend_wheel() -> None:
    table = sources.load_boston()
    assert table.frame.shape == (506, 14)
    assert list(table.frame.columns) == list(sources.BOSTON_COLUMNS)
    assert "site-packages" in table.origin and table.origin.endswith("boston_housing.csv")
    assert table.frame["medv"].between(5, 50).all()


def test_boston_table_reproduces_the_original_uci_file_byte_for_byte() -> None:
    """Written back in the UCI fixed-width layout, the bundled table is the original."""
    frame = sources.load_boston().frame
    layout = [(8, 5), (7, 2), (8, 3), (3, 0), (8, 4), (8, 4), (7, 2), (8, 4), (4, 0), (7, 1),
              (7, 2), (7, 2), (7, 2), (7, 2)]  # fmt: skip
    lines = [
        "".join(
            (f"{int(v)}" if digits == 0 else f"{v:.{digits}f}").rjust(width)
            for v, (width, digits) in zip(row, layout, strict=True)
        )
        for row in frame.itertuples(index=False)
    ]
    digest = hashlib.md5(("\n".join(lines) + "\n").encode()).hexdigest()
    assert digest == "d4accdce7a25600298819f8e28e8d593"


def test_california_without_network_names_the_alternatives(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        sources.load_california(tmp_path / "empty-cache")
    assert "data=boston" in str(err.value) and "data=csv" in str(err.value)


def test_synthetic_scale_up_has_requested_rows_and_boston_columns() -> None:
    table = sources.make_synthetic(2_000, noise=0.05, random_state=1)
    assert table.frame.shape == (2_000, 14)
    assert set(table.frame["chas"].unique()) <= {0.0, 1.0}
    again = sources.make_synthetic(2_000, noise=0.05, random_state=1)
    pd.testing.assert_frame_equal(table.frame, again.frame)


def test_split_matches_sklearn_train_test_split() -> None:
    from sklearn.model_selection import train_test_split

    for n, size, seed in [(506, 0.2, 42), (101, 0.33, 7), (10, 0.5, 0)]:
        train_idx, test_idx = split_indices(n, size, seed)
        sk_train, sk_test = train_test_split(np.arange(n), test_size=size, random_state=seed)
        assert train_idx.tolist() == sk_train.tolist()
        assert test_idx.tolist() == sk_test.tolist()


def test_split_refuses_an_empty_side() -> None:
    with pytest.raises(DataError, match="empty"):
        split_indices(1, 0.5, 0)


def test_split_frame_is_a_partition(small_table: pd.DataFrame) -> None:
    train, test = split_frame(small_table, 0.25, 3)
    assert len(train) + len(test) == len(small_table)
    merged = pd.concat([train, test]).sort_values("a").reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, small_table.sort_values("a").reset_index(drop=True))


# --- schema failure contracts: one line naming file, column and row count ---------

RULES = Schema(
    min_rows=5,
    allow_missing=False,
    columns={"a": ColumnRule(min=-10, max=10), "price": ColumnRule(min=0)},
)


def _violation(frame: pd.DataFrame) -> str:
    with pytest.raises(DataError) as err:
        schema.validate(frame, RULES, "price", "houses.csv")
    message = str(err.value)
    assert message.startswith("houses.csv: ")
    assert "\n" not in message
    return message


def test_missing_required_column(small_table: pd.DataFrame) -> None:
    assert "column 'a'" in _violation(small_table.drop(columns=["a"]))


def test_non_numeric_values(small_table: pd.DataFrame) -> None:
    frame = small_table.astype({"b": object})
    frame.loc[[3, 7], "b"] = "n/a-text"
    assert "column 'b': 2 rows not numeric" in _violation(frame)


def test_missing_values(small_table: pd.DataFrame) -> None:
    frame = small_table.copy()
    frame.loc[[1, 2, 3], "c"] = np.nan
    assert "column 'c': 3 rows missing" in _violation(frame)


def test_missing_target_is_never_allowed(small_table: pd.DataFrame) -> None:
    frame = small_table.copy()
    frame.loc[0, "price"] = np.nan
    with pytest.raises(DataError, match="column 'price': 1 row missing"):
        schema.validate(frame, Schema(min_rows=1, allow_missing=True), "price", "f.csv")


def test_out_of_range(small_table: pd.DataFrame) -> None:
    frame = small_table.copy()
    frame.loc[[0, 5], "a"] = 99.0
    assert "column 'a': 2 rows above max 10" in _violation(frame)


def test_allowed_values() -> None:
    frame = pd.DataFrame({"flag": [0, 1, 2, 1, 3], "price": [1.0] * 5})
    rules = Schema(min_rows=1, columns={"flag": ColumnRule(allowed=(0.0, 1.0))})
    with pytest.raises(DataError, match="column 'flag': 2 rows not one of"):
        schema.validate(frame, rules, "price", "f.csv")


def test_too_few_rows(small_table: pd.DataFrame) -> None:
    assert "min_rows" in _violation(small_table.head(3))


def test_several_problems_are_counted_on_one_line(small_table: pd.DataFrame) -> None:
    frame = small_table.copy()
    frame.loc[0, "a"] = 99.0
    frame.loc[1, "price"] = -1.0
    assert "(+1 more: price)" in _violation(frame)


def test_valid_table_comes_back_float_with_target_last(small_table: pd.DataFrame) -> None:
    frame = small_table[["price", "a", "b", "c"]]
    out = schema.validate(frame, RULES, "price", "f.csv")
    assert list(out.columns) == ["a", "b", "c", "price"]
    assert all(dtype == np.float64 for dtype in out.dtypes)


# --- prepare stage with bad inputs writes nothing -------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("a,b,price\n1,2,3\n", "min_rows"),
        ("a,b,cost\n" + "1,2,3\n" * 30, "target column 'price' not found"),
        ("a,b,price\n" + "1,x,3\n" * 30, "column 'b': 30 rows not numeric"),
        ("", "not a readable CSV"),
    ],
)
def test_prepare_rejects_bad_csv_and_writes_nothing(
    tmp_path: Path, make_settings: SettingsFactory, content: str, expected: str
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    settings = make_settings(csv_overrides(bad))
    with pytest.raises(DataError) as err:
        prepare.run(settings)
    assert expected in str(err.value)
    assert str(bad) in str(err.value)
    assert not settings.paths.raw.exists()
    assert not settings.paths.train.exists()
    assert not settings.paths.fingerprint.exists()


def test_prepare_missing_csv_names_the_file(tmp_path: Path, make_settings: SettingsFactory) -> None:
    settings = make_settings(csv_overrides(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match=r"nope\.csv: file not found \(set data.path\)"):
        prepare.run(settings)


def test_prepare_csv_with_separator(tmp_path: Path, make_settings: SettingsFactory,
                                    small_table: pd.DataFrame) -> None:  # fmt: skip
    path = tmp_path / "semi.csv"
    small_table.to_csv(path, sep=";", index=False)
    result = prepare.run(make_settings(csv_overrides(path, "data.sep=';'")))
    assert result.fingerprint["raw"]["rows"] == len(small_table)
    assert result.fingerprint["features"] == ["a", "b", "c"]


def test_drop_columns_removes_b_from_boston(make_settings: SettingsFactory) -> None:
    settings = make_settings(["data.drop_columns=[b]"])
    result = prepare.run(settings)
    assert "b" not in result.fingerprint["features"]
    assert "b" not in pd.read_csv(settings.paths.train).columns


def test_drop_unknown_column_is_a_config_error(make_settings: SettingsFactory) -> None:
    from housing.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.drop_columns: 'zzz'"):
        prepare.run(make_settings(["data.drop_columns=[zzz]"]))


def test_fingerprint_records_the_source_without_absolute_paths(
    tmp_path: Path, make_settings: SettingsFactory, csv_file: Path
) -> None:
    """Inside the project: the path relative to it; outside: the name plus md5 only."""
    from housing import io

    inside = prepare.run(make_settings(csv_overrides(csv_file))).fingerprint
    assert inside["origin"] == "input/houses.csv"
    assert inside["raw"]["path"] == "data/raw/housing.csv"
    elsewhere = tmp_path / "project"
    elsewhere.mkdir()
    outside = prepare.run(make_settings(csv_overrides(csv_file), root=elsewhere)).fingerprint
    assert outside["origin"] == "houses.csv"
    assert outside["origin_md5"] == io.file_md5(csv_file)
    boston = prepare.run(make_settings(root=tmp_path / "boston")).fingerprint
    assert boston["origin"] == "mlxtend:boston_housing.csv"
    for record in (inside, outside, boston):
        assert str(tmp_path) not in json.dumps(record)
        assert "site-packages" not in json.dumps(record)
