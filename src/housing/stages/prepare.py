"""prepare: load -> validate -> split, writing the raw snapshot and the split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing import drift_check, io
from housing.data import schema, sources, split
from housing.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from housing.config import DataSettings, PrepareSettings, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    """The data fingerprint prepare recorded, and where."""

    fingerprint_path: Path
    fingerprint: dict[str, Any]
    drift: dict[str, float] = field(default_factory=dict)  # a new snapshot vs the champion

    @property
    def metrics(self) -> dict[str, float]:
        fp = self.fingerprint
        return {
            "data/rows": float(fp["raw"]["rows"]),
            "data/train_rows": float(fp["train"]["rows"]),
            "data/test_rows": float(fp["test"]["rows"]),
            "data/features": float(len(fp["features"])),
            **self.drift,
        }


def prepare_frames(
    table: sources.RawTable, data: DataSettings, prep: PrepareSettings
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(raw, train, test): drop configured columns, validate, split. Writes nothing."""
    frame = table.frame
    absent = [c for c in data.drop_columns if c not in frame.columns]
    if absent:
        names = ", ".join(repr(c) for c in absent)
        raise ConfigError(f"data.drop_columns: {names} not a column of {table.origin}")
    frame = frame.drop(columns=list(data.drop_columns))
    rules = data.schema
    if data.drop_columns:  # rules for dropped columns no longer apply
        kept = {c: r for c, r in rules.columns.items() if c not in data.drop_columns}
        rules = rules.model_copy(update={"columns": kept})
    clean = schema.validate(frame, rules, data.target, table.origin)
    train, test = split.split_frame(clean, prep.test_size, prep.random_state)
    return clean, train, test


def run(settings: Settings) -> PrepareResult:
    """Run the prepare stage: every check passes before the first file is written."""
    paths = settings.paths
    table = sources.load(settings.data)
    raw, train, test = prepare_frames(table, settings.data, settings.prepare)
    for path, frame in ((paths.raw, raw), (paths.train, train), (paths.test, test)):
        io.write_csv(path, frame)

    def describe(path: Path, frame: pd.DataFrame) -> dict[str, Any]:
        return {
            "path": io.project_path(path, settings.root),
            "md5": io.file_md5(path),
            "rows": len(frame),
            "columns": frame.shape[1],
        }

    fingerprint: dict[str, Any] = {
        "source": settings.data.name,
        **sources.portable_origin(settings.data, settings.root),
        "target": settings.data.target,
        "features": [c for c in raw.columns if c != settings.data.target],
        "dropped_columns": list(settings.data.drop_columns),
        "split": {
            "test_size": settings.prepare.test_size,
            "random_state": settings.prepare.random_state,
        },
        "raw": describe(paths.raw, raw),
        "train": describe(paths.train, train),
        "test": describe(paths.test, test),
    }
    io.write_json(paths.fingerprint, fingerprint)
    log.info(
        "prepare: %d rows (%s) -> train %d, test %d; raw md5 %s",
        len(raw),
        settings.data.name,
        len(train),
        len(test),
        fingerprint["raw"]["md5"],
    )
    snapshot = settings.data.path
    checked = None
    if snapshot is not None:  # a new snapshot: drift against the champion, if any
        checked = drift_check.check_snapshot(settings, raw, snapshot)
    if checked is not None and snapshot is not None:
        log.log(
            logging.WARNING if checked.result.drifting else logging.INFO,
            "prepare: %s: %s",
            snapshot.name,
            checked.result.line(),
        )
        scores = {k: v for k, v in checked.result.metrics.items() if k.startswith("drift/")}
        return PrepareResult(paths.fingerprint, fingerprint, scores)
    return PrepareResult(paths.fingerprint, fingerprint)
