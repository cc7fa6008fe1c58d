"""Batch prediction from the registry: ``housing predict --input F``.

The model is the champion by default (MLflow: the registry alias of
``<clearml.model_name>-best``; ClearML offline: the ``champions.json`` ledger; no
tracking: the model ``select_best`` chose), or a registered version number, or a
candidate's name. Its file is checked against the recorded sha256 before it is
unpickled. The input is read ``predict.chunk_rows`` rows at a time, each chunk checked
against the model's features and the schema of the dataset it was trained with (the
``data`` section its MLflow run recorded, else the composed one) before it is scored;
predictions stream into a temporary file renamed onto the output once every row is
scored, beside a ``.meta.json`` sidecar (model, version, lineage, input hash, rows, time).
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing import io
from housing.errors import ArtifactError, ConfigError, DataError, HousingError, first_line

if TYPE_CHECKING:
    import pandas as pd

    from housing.config import DataSettings, Settings
    from housing.drift import Accumulator, DriftResult

log = logging.getLogger(__name__)

#: The stage name predictions are tracked under.
STAGE = "predict"
#: ``--model`` value naming the champion (besides ``registry.champion_alias``).
CHAMPION = "champion"
#: The newest registered version of ``<model_name>-best``, promoted or not (what the
#: pipeline last trained; ``retrain: on_change``'s baseline). Not a ``--model`` value.
NEWEST = "newest"
#: The predictions file's one column.
PREDICTION_COLUMN = "prediction"


@dataclass(frozen=True)
class ModelChoice:
    """A resolved model: what it is, where it came from, its lineage, the estimator."""

    registry_name: str  # e.g. housing-best, housing-ridge (local: the same names)
    version: str | None  # registry version; None without a registry (tracking=none)
    source: str  # mlflow | clearml-offline | local
    uri: str  # models:/<name>/<version>, a ClearML model id, or the joblib's project path
    sha256: str  # the joblib file's recorded sha256 (lineage ``model_sha256``)
    data_md5: str | None
    git_commit: str | None
    estimator: Any = field(repr=False)
    data: DataSettings | None = None  # the dataset section the model was trained with
    run_id: str | None = None  # the MLflow run that registered it (its artifacts)

    @property
    def label(self) -> str:
        version = f" v{self.version}" if self.version else ""
        return f"{self.registry_name}{version} ({self.source})"

    @property
    def features(self) -> list[str]:
        """The columns the fitted pipeline takes, in order."""
        names = getattr(self.estimator, "feature_names_in_", None)
        if names is None:
            raise ArtifactError(f"model {self.label} records no feature names; retrain it")
        return [str(n) for n in names]


@dataclass(frozen=True)
class PredictResult:
    """What one batch produced."""

    output_path: Path
    meta_path: Path
    rows: int
    seconds: float
    model: ModelChoice
    input_sha256: str
    ignored_columns: tuple[str, ...]
    record: dict[str, Any]  # the sidecar's content
    drift: DriftResult | None = None  # the input against the model's reference profile

    @property
    def metrics(self) -> dict[str, float]:
        """What the trackers get as metrics."""
        drift = self.drift.metrics if self.drift is not None else {}
        return {
            "predict/rows": float(self.rows),
            "predict/seconds": self.seconds,
            **{k: v for k, v in drift.items() if k.startswith("drift/")},
        }


# --------------------------------------------------------------------------- models


def resolve_model(settings: Settings, spec: str = CHAMPION) -> ModelChoice:
    """The model ``spec`` names (``champion``, a version number, :data:`NEWEST` or a
    candidate name), from MLflow when it is a tracking backend, else ClearML's offline
    ledgers, else the local records; verified against its sha256 before it is unpickled."""
    champion = spec in (CHAMPION, settings.registry.champion_alias)
    if not champion and not spec.isdigit() and spec != NEWEST:
        _check_candidate(settings, spec)
    if "mlflow" in settings.tracking:
        return _from_mlflow(settings, spec, champion)
    if "clearml" in settings.tracking:
        return _from_clearml_offline(settings, spec, champion)
    return _from_local(settings, spec, champion or spec == NEWEST)  # select_best's record


def _check_candidate(settings: Settings, name: str) -> None:
    from housing.config import available_choices

    known = available_choices(settings.config_dir, "model")
    if name not in known:
        raise ConfigError(
            f"--model {name}: not a version number, {CHAMPION!r} or a candidate "
            f"({', '.join(known)})"
        )


def _best_name(settings: Settings) -> str:
    return f"{settings.clearml.model_name}-best"


def _registry_name(settings: Settings, spec: str, champion: bool) -> str:
    """Versions and the champion belong to ``<model_name>-best``; a candidate has its own."""
    if champion or spec.isdigit() or spec == NEWEST:
        return _best_name(settings)
    return f"{settings.clearml.model_name}-{spec}"


def _from_mlflow(settings: Settings, spec: str, champion: bool) -> ModelChoice:
    from housing.runs import store_root
    from housing.tracking.mlflow import (
        MLflowTracker,
        load_registered_model,
        local_store_path,
        registered_version,
        run_config,
        unreachable,
    )

    cfg = settings.mlflow
    root = store_root(settings.root)
    store = local_store_path(cfg.tracking_uri, root)
    if store is not None and not store.exists():
        raise ArtifactError(
            f"{io.relpath(store, Path.cwd())}: no MLflow store (mlflow.tracking_uri); "
            "run the pipeline first (housing repro)"
        )
    name = _registry_name(settings, spec, champion)
    which = settings.registry.champion_alias if champion else spec
    which = which if champion or spec.isdigit() else "latest"
    try:
        client = MLflowTracker(
            cfg.tracking_uri, cfg.experiment, cfg.registry_uri, settings.registry.champion_alias,
            root=root,
        )  # fmt: skip
        number, record = registered_version(client, name, which)
        sha = record.get("model_sha256", "")
        estimator = load_registered_model(client, name, number, expected_sha256=sha or None)
        config = run_config(client, record["run_id"]) if record.get("run_id") else {}
    except HousingError:
        raise
    except Exception as exc:  # a store or server error: one line naming the URI
        reason = unreachable(exc) or first_line(exc, 200, typed=True)
        raise ArtifactError(f"MLflow {cfg.tracking_uri}: {reason}") from None
    return ModelChoice(
        registry_name=name,
        version=number,
        source="mlflow",
        uri=f"models:/{name}/{number}",
        sha256=sha,
        data_md5=record.get("data_md5"),
        git_commit=record.get("git_commit"),
        estimator=estimator,
        data=_trained_data(settings, config.get("data")),
        run_id=record.get("run_id") or None,
    )


def _trained_data(settings: Settings, section: Any) -> DataSettings | None:
    """The ``data`` section a model's run recorded, validated; None when absent or no
    longer valid (the composed config's ``data`` applies then)."""
    from housing.config import DataSettings

    if not isinstance(section, dict):
        return None
    try:
        return DataSettings.model_validate(section, context={"root": settings.root})
    except (ValueError, HousingError) as exc:  # pydantic's ValidationError is a ValueError
        log.debug("the model's recorded data section is not usable (%s)", first_line(exc))
        return None


def _from_clearml_offline(settings: Settings, spec: str, champion: bool) -> ModelChoice:
    from housing.tracking.offline import (
        CHAMPIONS_FILE,
        REGISTRY_FILE,
        list_sessions,
        read_json_file,
        read_models,
    )
    from housing.tracking.recorder import _in_store  # the repository's offline folder

    folder = _in_store(settings).offline_dir
    name = _registry_name(settings, spec, champion)
    if champion:
        ledger_path = folder / CHAMPIONS_FILE
        entry = _entry(read_json_file(ledger_path, {}), name)
        if entry.get("version") is None or not entry.get("model_id"):
            raise ArtifactError(f"{ledger_path}: no champion of {name} (run the pipeline first)")
    else:
        ledger_path = folder / REGISTRY_FILE
        versions = _entry(read_json_file(ledger_path, {}), name).get("versions") or []
        wanted = spec if spec.isdigit() else None
        found = [v for v in versions if isinstance(v, dict) and wanted in (None, v.get("version"))]
        if not found:
            what = f"version {spec}" if wanted else "versions"
            raise ArtifactError(f"{ledger_path}: {name} has no {what}")
        entry = found[-1]
    model_id, task_id = str(entry.get("model_id")), str(entry.get("task_id"))
    for session in list_sessions(folder):
        if session.task_id != task_id:
            continue
        for model in read_models(session):
            if model.model_id != model_id:
                continue
            meta = model.metadata.get("metadata") or {}
            sha = str(meta.get("model_sha256") or entry.get("sha256") or "")
            if model.weights_path is None:
                break
            return ModelChoice(
                registry_name=name,
                version=str(entry.get("version")),
                source="clearml-offline",
                uri=model_id,
                sha256=sha,
                data_md5=meta.get("data_md5"),
                git_commit=meta.get("git_commit"),
                estimator=io.load_model(model.weights_path, sha),
            )
    raise ArtifactError(
        f"{ledger_path}: {name} v{entry.get('version')} (model {model_id}) has no weights in "
        f"the offline sessions of {folder} (registered online? use tracking=mlflow)"
    )


def _entry(ledger: Any, name: str) -> dict[str, Any]:
    entry = ledger.get(name) if isinstance(ledger, dict) else None
    return entry if isinstance(entry, dict) else {}


def _from_local(settings: Settings, spec: str, champion: bool) -> ModelChoice:
    """No tracking: the record ``select_best`` (champion) or ``train`` (candidate) wrote."""
    paths = settings.paths
    if spec.isdigit():
        raise ConfigError(
            f"--model {spec}: version numbers need a registry (tracking=mlflow|clearml|both); "
            f"with tracking=none use {CHAMPION!r} or a candidate name"
        )
    if champion:
        meta_path = paths.meta(paths.train_summary)
        meta = io.read_record(meta_path)
        model_path, sha = meta.get("best_model_path"), meta.get("best_model_sha256")
    else:
        meta_path = paths.meta(paths.train_metrics(spec))
        meta = io.read_record(meta_path)
        model_path, sha = meta.get("model_path"), meta.get("model_sha256")
    if not model_path:
        raise ArtifactError(f"{meta_path}: no model path recorded (re-run the stage)")
    return ModelChoice(
        registry_name=_registry_name(settings, spec, champion),
        version=None,
        source="local",
        uri=str(model_path),
        sha256=str(sha or ""),
        data_md5=meta.get("data_md5"),
        git_commit=None,
        estimator=io.load_model(settings.root / str(model_path), sha or None),
    )


# --------------------------------------------------------------------------- input


def header_columns(path: Path, sep: str) -> list[str]:
    """The input's column names as written (duplicates kept), or a one-line DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (--input)")
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh, delimiter=sep), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file ({first_line(exc)})") from None
    if not header:
        raise DataError(f"{path}: empty file, no header row")
    return [c.strip() for c in header]


def check_columns(path: Path, columns: Sequence[str], features: Sequence[str]) -> list[str]:
    """The input's columns the model does not use (to ignore); missing or duplicated
    feature columns raise one DataError line naming the file and the columns."""
    missing = [c for c in features if c not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) the model was trained with: {', '.join(missing)}"
        )
    doubled = sorted({c for c in features if columns.count(c) > 1})
    if doubled:
        raise DataError(f"{path}: duplicated column header(s): {', '.join(doubled)}")
    return [c for c in dict.fromkeys(columns) if c not in features]


def checked_chunks(
    path: Path, data: DataSettings, features: Sequence[str], chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """The input's feature columns, ``chunk_rows`` rows at a time, as float64 frames
    checked against ``data.schema`` (types, ranges, missing and non-finite values)."""
    import pandas as pd

    from housing.data.schema import find_violations

    target = data.target
    rules = {c: r for c, r in data.schema.columns.items() if c in features}
    schema = data.schema.model_copy(update={"columns": rules, "min_rows": 1})
    try:
        reader = pd.read_csv(path, sep=data.sep, usecols=list(features), chunksize=chunk_rows)
        start = 0
        for chunk in reader:
            end = start + len(chunk)
            chunked = start or len(chunk) == chunk_rows
            where = f"{path} (rows {start + 1}-{end})" if chunked else str(path)
            if chunk.empty:
                raise DataError(f"{path}: no rows to predict (only a header)")
            found = [v for v in find_violations(chunk, schema, target) if v.column != target]
            if found:
                more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
                raise DataError(f"{where}: {found[0].describe()}{more}")
            yield chunk[list(features)].astype("float64")
            start = end
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a readable CSV table ({first_line(exc)})") from None


# --------------------------------------------------------------------------- run


def preflight(settings: Settings, input_path: Path, output: Path, model_spec: str) -> list[str]:
    """The cheap checks, before any tracker or model is opened: ``--model`` names
    something, the input has a header, the output is not the input. Returns the header."""
    if model_spec not in (CHAMPION, settings.registry.champion_alias) and not model_spec.isdigit():
        _check_candidate(settings, model_spec)
    columns = header_columns(input_path, settings.data.sep)
    if output.resolve() == input_path.resolve():
        raise ConfigError(f"--output {output}: is the input file; choose another path")
    return columns


def default_output(settings: Settings, input_path: Path) -> Path:
    """``<predict.output_dir>/<input stem>.predictions.csv``."""
    return settings.predict.output_dir / f"{input_path.stem}.predictions.csv"


def predict_file(
    settings: Settings,
    input_path: Path,
    output: Path | None = None,
    model_spec: str = CHAMPION,
    *,
    chunk_rows: int | None = None,
) -> PredictResult:
    """Score ``input_path`` with the model ``model_spec`` names; write the predictions and
    their sidecar atomically (nothing is left behind when anything fails)."""
    started = time.perf_counter()
    input_path = Path(input_path)
    output = Path(output) if output is not None else default_output(settings, input_path)
    columns = preflight(settings, input_path, output, model_spec)
    model = resolve_model(settings, model_spec)
    features = model.features
    ignored = check_columns(input_path, columns, features)
    if ignored:
        log.warning(
            "%s: ignoring column(s) the model does not use: %s", input_path, ", ".join(ignored)
        )
    input_sha = io.file_sha256(input_path)
    meta_path = settings.paths.meta(output)
    rows = 0
    drift, reference = _drift_accumulator(settings, model)
    with io.atomic_path(output) as tmp:
        with tmp.open("w", encoding="utf-8", newline="") as fh:
            fh.write(f"{PREDICTION_COLUMN}\n")
            size = chunk_rows or settings.predict.chunk_rows
            data = model.data or settings.data  # the input's separator is the composed one
            data = data.model_copy(update={"sep": settings.data.sep})
            for frame in checked_chunks(input_path, data, features, size):
                _write_predictions(fh, model.estimator.predict(frame))
                rows += len(frame)
                if drift is not None:
                    drift.add(frame)
        drifted = _drift_result(settings, drift)
        seconds = time.perf_counter() - started
        record = _sidecar(
            settings,
            model,
            input_path=input_path,
            input_sha=input_sha,
            output=output,
            rows=rows,
            seconds=seconds,
            ignored=ignored,
        )
        record["drift"] = (
            {**drifted.summary(), "reference": reference} if drifted is not None else None
        )
        io.write_json(meta_path, record)  # written before the predictions are renamed in
    log.debug("predict: %d rows with %s -> %s (%.2f s)", rows, model.label, output, seconds)
    return PredictResult(
        output_path=output,
        meta_path=meta_path,
        rows=rows,
        seconds=seconds,
        model=model,
        input_sha256=input_sha,
        ignored_columns=tuple(ignored),
        record=record,
        drift=drifted,
    )


def _drift_accumulator(
    settings: Settings, model: ModelChoice
) -> tuple[Accumulator | None, str | None]:
    """An accumulator on the model's reference profile and where that was found; (None,
    None) with one warning when the model has none."""
    from housing.drift import Accumulator, reference_for

    try:
        reference, where = reference_for(settings, model)
    except HousingError as exc:
        log.warning("predict: drift not computed (%s)", first_line(exc))
        return None, None
    return Accumulator(reference, settings.drift.sample_size, reference.seed), where


def _drift_result(settings: Settings, drift: Accumulator | None) -> DriftResult | None:
    from housing.drift import compare

    return None if drift is None else compare(drift.reference, drift.current(), settings.drift)


def _write_predictions(fh: Any, values: Any) -> None:
    """One line per prediction, shortest repr that round-trips (as ``to_csv`` writes)."""
    fh.write("".join(f"{float(v)!r}\n" for v in values))


def _sidecar(
    settings: Settings,
    model: ModelChoice,
    *,
    input_path: Path,
    input_sha: str,
    output: Path,
    rows: int,
    seconds: float,
    ignored: Sequence[str],
) -> dict[str, Any]:
    from housing.tracking.lineage import utc_now

    return {
        "model": model.registry_name,
        "version": model.version,
        "source": model.source,
        "model_uri": model.uri,
        "model_sha256": model.sha256,
        "data_md5": model.data_md5,
        "git_commit": model.git_commit,
        "features": model.features,
        "schema": (model.data or settings.data).name,
        "schema_from": "model run config" if model.data else "composed config",
        "input": io.project_path(input_path, settings.root),
        "input_sha256": input_sha,
        "ignored_columns": list(ignored),
        "output": io.project_path(output, settings.root),
        "rows": rows,
        "seconds": round(seconds, 3),
        "created_at": utc_now(),
    }


def run(
    settings: Settings,
    input_path: Path,
    output: Path | None = None,
    model_spec: str = CHAMPION,
) -> PredictResult:
    """:func:`predict_file` as a tracked stage run named ``predict`` (every active
    tracker gets rows, seconds, the model version and the sidecar)."""
    from housing import runs
    from housing.runner import stop_signals
    from housing.tracking.base import StageRun
    from housing.tracking.recorder import record, tracked

    context = runs.current()
    stage = StageRun(
        stage=STAGE, name=STAGE, pipeline_run_id=context.run_id, tags=(STAGE,), context=context
    )
    target = output if output is not None else default_output(settings, Path(input_path))
    preflight(settings, Path(input_path), target, model_spec)  # a typo opens no tracked run
    started = time.perf_counter()
    with stop_signals(), tracked(settings, stage) as tset:
        result = predict_file(settings, input_path, output, model_spec)
        record(tset, STAGE, settings, result)
    if result.drift is not None:
        from housing.drift import announce

        if result.drift.drifting:
            log.warning("predict: %s: %s", Path(input_path).name, result.drift.line())

        announce(
            settings,
            result.drift,
            origin=STAGE,
            input_path=Path(input_path),
            model=result.model,
            started=started,
        )
    return result


def summary_line(result: PredictResult) -> str:
    """What ``housing predict`` prints."""
    output, sidecar = (io.relpath(p, Path.cwd()) for p in (result.output_path, result.meta_path))
    return (
        f"wrote {output} ({result.rows} rows, {result.model.label}, "
        f"{result.seconds:.2f} s); sidecar {sidecar}"
    )
