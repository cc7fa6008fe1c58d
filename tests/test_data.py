"""Data sources, schema validation failure contracts and split determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from housing.config import ColumnRule, Schema, Settings, compose
from housing.data import schema, sources
from housing.data.split import split_frame, split_indices
from housing.errors import DataError
from housing.stages import prepare

from .conftest import CONF, SettingsFactory, csv_overrides


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


# --- a new snapshot of a dataset's table (data=boston data.path=FILE) -----------


@pytest.fixture
def snapshot() -> pd.DataFrame:
    """The Boston rows resampled with a fixed seed: a new snapshot of the same table."""
    boston = sources.load_boston().frame
    rows = np.random.default_rng(7).integers(0, len(boston), len(boston))
    return boston.iloc[rows].reset_index(drop=True)


def _write(path: Path, frame: pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)  # a user's snapshot: a header row of column names
    return path


def test_a_boston_snapshot_is_read_instead_of_the_bundled_table(
    tmp_path: Path, make_settings: SettingsFactory, snapshot: pd.DataFrame
) -> None:
    shuffled = snapshot[[*reversed(snapshot.columns)]]  # any column order
    path = _write(tmp_path / "input" / "boston-2026.csv", shuffled.iloc[:300])
    settings = make_settings(["data=boston", f"data.path={path}"])
    result = prepare.run(settings)
    assert result.fingerprint["source"] == "boston"
    assert result.fingerprint["origin"] == "input/boston-2026.csv"
    assert result.fingerprint["raw"]["rows"] == 300
    raw = pd.read_csv(settings.paths.raw)
    assert list(raw.columns) == list(sources.BOSTON_COLUMNS)  # the schema's order
    pd.testing.assert_frame_equal(raw.astype("float64"), snapshot.iloc[:300].astype("float64"))


def test_the_default_data_path_means_the_datasets_own_source(
    make_settings: SettingsFactory,
) -> None:
    """conf/pipeline.yaml's data.path is conf/data (prepare's DVC dependency): no snapshot."""
    assert compose(["tracking=none"], CONF)["data"]["path"] == "conf/data"
    assert make_settings().data.path is None
    assert make_settings(["data.path=./conf/data/"]).data.path is None


def _refused(settings: Settings, path: Path) -> str:
    """prepare refuses ``path`` with one line naming it; nothing written, nothing changed."""
    before = {p: p.read_bytes() for p in settings.paths.raw.parents[1].rglob("*") if p.is_file()}
    fp = settings.paths.fingerprint
    kept = fp.read_bytes() if fp.is_file() else None
    with pytest.raises(DataError) as err:
        prepare.run(settings)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    after = {p: p.read_bytes() for p in settings.paths.raw.parents[1].rglob("*") if p.is_file()}
    assert after == before
    assert (fp.read_bytes() if fp.is_file() else None) == kept
    return message


@pytest.fixture
def prepared(make_settings: SettingsFactory) -> Settings:
    """A root where prepare already ran on the bundled table (outputs to keep intact)."""
    settings = make_settings()
    prepare.run(settings)
    return settings


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(
            lambda f: f.assign(rm=f["rm"].where(f.index % 100 != 3, np.inf)),
            "column 'rm': 6 rows not finite (inf or -inf)",
            id="inf",
        ),
        pytest.param(
            lambda f: f.assign(nox=f["nox"].where(f.index != 9, -np.inf)),
            "column 'nox': 1 row not finite (inf or -inf)",
            id="minus-inf",
        ),
        pytest.param(
            lambda f: f.assign(crim=f["crim"].where(f.index >= 4)),
            "column 'crim': 4 rows missing (empty or NaN)",
            id="nan-with-allow-missing-false",
        ),
        pytest.param(
            lambda f: f.drop(columns=["rm"]),
            "column 'rm': 506 rows missing: required column not in the table",
            id="missing-column",
        ),
        pytest.param(
            lambda f: f.assign(medv=f["medv"].where(f.index >= 3, 150.0)),
            "column 'medv': 3 rows above max 100",
            id="target-above-range",
        ),
        pytest.param(
            lambda f: f.assign(medv=f["medv"].where(f.index != 0, -1.0)),
            "column 'medv': 1 row below min 0",
            id="target-below-range",
        ),
        pytest.param(
            lambda f: f.assign(chas=f["chas"].where(f.index >= 2, 5)),
            "column 'chas': 2 rows not one of [0, 1]",
            id="chas-5",
        ),
        pytest.param(
            lambda f: f.assign(lot=1.0),
            "column 'lot': not in data=boston's schema (506 rows); remove it or add it to "
            "data.drop_columns",
            id="extra-column",
        ),
    ],
)
def test_a_bad_boston_snapshot_is_refused_in_one_line(
    prepared: Settings,
    make_settings: SettingsFactory,
    snapshot: pd.DataFrame,
    change: Any,
    expected: str,
) -> None:
    path = _write(prepared.root / "snapshot.csv", change(snapshot))
    message = _refused(make_settings([f"data.path={path}"]), path)
    assert expected in message


def test_a_repeated_header_is_refused_not_renamed(
    tmp_path: Path, prepared: Settings, make_settings: SettingsFactory, snapshot: pd.DataFrame
) -> None:
    """pandas would read a second 'rm' as 'rm.1'; the header as written is checked."""
    path = tmp_path / "dup.csv"
    frame = snapshot.copy()
    frame.insert(len(frame.columns), "rm", snapshot["rm"], allow_duplicates=True)
    _write(path, frame)
    message = _refused(make_settings([f"data.path={path}"]), path)
    assert "column 'rm': header names it 2 times (columns 6 and 15; 506 rows)" in message
    csv = _refused(make_settings(csv_overrides(path, "data.target=medv")), path)
    assert "column 'rm': header names it 2 times" in csv  # data=csv too


def test_nan_in_a_snapshot_follows_allow_missing(
    tmp_path: Path, make_settings: SettingsFactory, snapshot: pd.DataFrame
) -> None:
    path = _write(tmp_path / "gaps.csv", snapshot.assign(crim=snapshot["crim"].where(
        snapshot.index >= 4)))  # fmt: skip
    allowed = ["data.schema.allow_missing=true", f"data.path={path}"]
    assert prepare.run(make_settings(allowed)).fingerprint["raw"]["rows"] == 506
    target_gap = _write(tmp_path / "no-price.csv", snapshot.assign(medv=snapshot["medv"].where(
        snapshot.index >= 1)))  # fmt: skip
    with pytest.raises(DataError, match="column 'medv': 1 row missing"):
        prepare.run(make_settings(["data.schema.allow_missing=true", f"data.path={target_gap}"]))


def test_inf_in_a_schemaless_csv_is_refused(
    tmp_path: Path, make_settings: SettingsFactory, small_table: pd.DataFrame
) -> None:
    path = _write(tmp_path / "inf.csv", small_table.assign(b=small_table["b"].where(
        small_table.index != 5, np.inf)))  # fmt: skip
    assert "column 'b': 1 row not finite" in _refused(make_settings(csv_overrides(path)), path)


def test_a_snapshot_without_a_header_row_says_so(
    tmp_path: Path, make_settings: SettingsFactory, snapshot: pd.DataFrame
) -> None:
    path = tmp_path / "bare.csv"
    snapshot.to_csv(path, index=False, header=False)  # the bundled file's layout
    message = _refused(make_settings([f"data.path={path}"]), path)
    assert "no column of data=boston's schema in its first line" in message
    assert "first line names its columns (crim, zn, indus, ...)" in message


def test_a_snapshot_column_can_be_dropped_by_config(
    tmp_path: Path, make_settings: SettingsFactory, snapshot: pd.DataFrame
) -> None:
    path = _write(tmp_path / "ids.csv", snapshot.assign(id=range(len(snapshot))))
    result = prepare.run(make_settings([f"data.path={path}", "data.drop_columns=[id,b]"]))
    assert result.fingerprint["features"] == [c for c in sources.BOSTON_COLUMNS[:-1] if c != "b"]


def test_synthetic_data_takes_no_snapshot(make_settings: SettingsFactory) -> None:
    from housing.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.path: data=synthetic generates its table"):
        make_settings(["data=synthetic", "data.path=x.csv"])


def test_cli_refuses_a_bad_snapshot_with_one_line_and_exit_3(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    snapshot: pd.DataFrame,
) -> None:
    from housing.cli import main

    monkeypatch.chdir(tmp_path)
    chas = snapshot["chas"].where(snapshot.index != 0, 5)
    _write(tmp_path / "new.csv", snapshot.assign(chas=chas))
    args = ["--config-dir", str(CONF), "prepare", "tracking=none", "data=boston",
            "data.path=new.csv"]  # fmt: skip
    assert main(args) == DataError.exit_code
    captured = capsys.readouterr()
    assert captured.err == "error: new.csv: column 'chas': 1 row not one of [0, 1]\n"
    assert not (tmp_path / "data").exists()
