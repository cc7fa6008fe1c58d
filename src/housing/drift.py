"""Data drift: new data against the reference profile of the data a model was trained on.

At train time :func:`profile` summarises the train split's features into a
:class:`ReferenceProfile`, stored beside the model (``models/<name>.profile.json``, its
sha256 in the train record, logged to the trackers as ``reference_profile.json``). Per
feature it keeps ``drift.bins`` quantile bins (inner edges and the share of rows in each;
a feature with no more distinct values than bins gets one bin per value) and a seeded
subsample of at most ``drift.sample_size`` values.

Why a subsample rather than a one-sample KS test against the quantile CDF: the binned CDF
is a step function that hides a shift inside a bin and mishandles ties (``chas``, ``rad``
take a handful of values), while a two-sample KS test on two random subsamples is exact
for ties and small tables; capping both sides at the same size keeps the file small (a few
tens of kB) and keeps the p-value from flagging a negligible shift on a million rows.

:class:`Accumulator` builds the other side from chunks (predict streams its input), so
memory stays flat: counts per reference bin plus a bounded uniform sample (each value gets
a random key; the ``sample_size`` smallest keys are kept). :func:`compare` gives each
feature its PSI (shares floored at :data:`EPSILON`) and the KS p-value; a feature drifts
when the shift is both large (PSI >= ``drift.psi_threshold``) and not noise (p <
``drift.p_value``). :func:`reference_for` finds a model's profile; :func:`announce`
appends the ``drift`` event and notifies on a crossing. The outputs of ``housing drift``
are :mod:`housing.drift_check`'s. Nothing here prints.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing import io
from housing.errors import ArtifactError, HousingError, first_line

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import pandas as pd

    from housing.config import DriftSettings, Settings
    from housing.predict import ModelChoice

log = logging.getLogger(__name__)

#: The event stage name and the ``origin`` of a ``housing drift`` run.
STAGE = "drift"
#: What a model's profile file is called beside it, and as a tracker artifact.
PROFILE_SUFFIX = ".profile.json"
PROFILE_ARTIFACT = "reference_profile.json"
#: Shares below this count as this in the PSI (an empty bin would make it infinite).
EPSILON = 1e-4
_FORMAT = 1


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class FeatureProfile:
    """One feature: inner bin edges (bin ``i`` holds ``edges[i-1] <= x < edges[i]``), the
    share of rows per bin (``len(edges) + 1``), and a seeded subsample of its values."""

    edges: tuple[float, ...]
    shares: tuple[float, ...]
    sample: tuple[float, ...]


@dataclass(frozen=True)
class ReferenceProfile:
    """The compact profile of a model's training features (see the module docstring)."""

    features: dict[str, FeatureProfile]
    n_rows: int
    seed: int
    model_sha256: str = ""  # the model it belongs to (set by train)
    data_md5: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document stored beside the model."""
        return {
            "format": _FORMAT,
            "model_sha256": self.model_sha256,
            "data_md5": self.data_md5,
            "n_rows": self.n_rows,
            "seed": self.seed,
            "features": [  # a list: the model's column order (JSON objects are key-sorted)
                {
                    "name": n,
                    "edges": list(f.edges),
                    "shares": list(f.shares),
                    "sample": list(f.sample),
                }
                for n, f in self.features.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ReferenceProfile:
        """Parse :meth:`to_dict`'s document; anything else is one ArtifactError naming
        ``where``."""
        try:
            if data.get("format") != _FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT}")
            features = {}
            for f in data["features"]:
                name = f["name"]
                edges = tuple(float(v) for v in f["edges"])
                shares = tuple(float(v) for v in f["shares"])
                if len(shares) != len(edges) + 1:
                    raise ValueError(f"feature {name!r}: {len(shares)} shares, {len(edges)} edges")
                features[str(name)] = FeatureProfile(
                    edges, shares, tuple(float(v) for v in f["sample"])
                )
            return cls(
                features=features,
                n_rows=int(data["n_rows"]),
                seed=int(data["seed"]),
                model_sha256=str(data.get("model_sha256") or ""),
                data_md5=data.get("data_md5"),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            reason = first_line(exc, 120, typed=isinstance(exc, KeyError | AttributeError))
            raise ArtifactError(
                f"{where}: not a reference profile ({reason}); retrain the model"
            ) from None


def _as_array(values: Any) -> npt.NDArray[np.float64]:
    """Finite float64 values of a column (missing values are not profiled)."""
    import numpy as np

    array: npt.NDArray[np.float64] = np.asarray(values, dtype="float64")
    finite: npt.NDArray[np.float64] = array[np.isfinite(array)]
    return finite


def _inner_edges(values: npt.NDArray[np.float64], bins: int) -> tuple[float, ...]:
    """One bin per distinct value when there are at most ``bins`` of them (midpoints as
    edges), else the distinct inner quantiles of ``bins`` equal-frequency bins."""
    import numpy as np

    distinct = np.unique(values)
    if len(distinct) <= bins:
        return tuple(float(v) for v in (distinct[:-1] + distinct[1:]) / 2)
    quantiles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return tuple(float(v) for v in np.unique(quantiles))


def _counts(values: npt.NDArray[np.float64], edges: Sequence[float]) -> npt.NDArray[np.int64]:
    import numpy as np

    index = np.searchsorted(np.asarray(edges, dtype="float64"), values, side="right")
    return np.bincount(index, minlength=len(edges) + 1).astype("int64")


def _sample(values: npt.NDArray[np.float64], size: int, seed: int) -> tuple[float, ...]:
    import numpy as np

    if len(values) > size:
        values = np.random.default_rng(seed).choice(values, size, replace=False)
    return tuple(float(v) for v in values)


def profile(
    frame: pd.DataFrame,
    features: Sequence[str],
    *,
    bins: int = 10,
    sample_size: int = 1000,
    seed: int = 0,
    model_sha256: str = "",
    data_md5: str | None = None,
) -> ReferenceProfile:
    """The reference profile of ``frame``'s ``features`` (the training data)."""
    out = {}
    for i, name in enumerate(features):
        values = _as_array(frame[name])
        edges = _inner_edges(values, bins) if len(values) else ()
        counts = _counts(values, edges)
        shares = tuple(float(c) / max(len(values), 1) for c in counts)
        out[name] = FeatureProfile(edges, shares, _sample(values, sample_size, seed + i))
    return ReferenceProfile(out, len(frame), seed, model_sha256, data_md5)


def plot_stem(feature: str) -> str:
    """A feature's name as a file name (``plots/drift/<stem>.svg``)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "_", feature) or "_"


def profile_path(model_path: Path) -> Path:
    """Where a model's profile lives: ``models/<name>.profile.json`` beside ``<name>.joblib``."""
    return model_path.with_name(model_path.stem + PROFILE_SUFFIX)


def write_profile(path: Path, reference: ReferenceProfile) -> str:
    """Atomically write ``reference`` to ``path``; returns the file's sha256."""
    io.write_json(path, reference.to_dict())
    return io.file_sha256(path)


def read_profile(path: Path) -> ReferenceProfile:
    """A profile file, or one ArtifactError naming it."""
    return ReferenceProfile.from_dict(io.read_json(path), str(path))


# --------------------------------------------------------------------------- current data


@dataclass
class _Running:
    counts: npt.NDArray[np.int64]
    keys: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]
    n: int = 0


@dataclass(frozen=True)
class CurrentProfile:
    """New data on the reference's bins: counts per bin and a bounded sample per feature."""

    counts: dict[str, tuple[int, ...]]
    samples: dict[str, tuple[float, ...]]
    n_rows: int


class Accumulator:
    """Feeds chunks of new data onto ``reference``'s bins with bounded memory."""

    def __init__(self, reference: ReferenceProfile, sample_size: int = 1000, seed: int = 0):
        import numpy as np

        self.reference = reference
        self.sample_size = sample_size
        self.rng = np.random.default_rng(seed)
        self.rows = 0
        self._state = {
            name: _Running(
                np.zeros(len(f.edges) + 1, dtype="int64"),
                np.empty(0, dtype="float64"),
                np.empty(0, dtype="float64"),
            )
            for name, f in reference.features.items()
        }

    def add(self, frame: pd.DataFrame) -> None:
        """Count one chunk (it holds every reference feature)."""
        import numpy as np

        self.rows += len(frame)
        for name, state in self._state.items():
            values = _as_array(frame[name])
            state.counts += _counts(values, self.reference.features[name].edges)
            state.n += len(values)
            keys = np.concatenate([state.keys, self.rng.random(len(values))])
            kept = np.concatenate([state.values, values])
            if len(keys) > self.sample_size:
                keep = np.argpartition(keys, self.sample_size)[: self.sample_size]
                keys, kept = keys[keep], kept[keep]
            state.keys, state.values = keys, kept

    def current(self) -> CurrentProfile:
        """What was fed so far."""
        return CurrentProfile(
            counts={n: tuple(int(c) for c in s.counts) for n, s in self._state.items()},
            samples={n: tuple(float(v) for v in s.values) for n, s in self._state.items()},
            n_rows=self.rows,
        )


def current_of(
    reference: ReferenceProfile, frames: Iterable[pd.DataFrame], sample_size: int = 1000
) -> CurrentProfile:
    """:class:`Accumulator` over ``frames`` (a whole table is one frame)."""
    acc = Accumulator(reference, sample_size, reference.seed)
    for frame in frames:
        acc.add(frame)
    return acc.current()


# --------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's drift: PSI, KS statistic and p-value, the flag, the bin shares."""

    psi: float
    ks_statistic: float
    p_value: float
    drifting: bool
    reference: tuple[float, ...]
    current: tuple[float, ...]
    edges: tuple[float, ...]

    def bin_labels(self) -> list[str]:
        """``< e1``, ``[e1, e2)``, ..., ``>= ek`` (one ``all`` bin without edges)."""
        e = [f"{v:.4g}" for v in self.edges]
        if not e:
            return ["all"]
        inner = [f"[{a}, {b})" for a, b in itertools.pairwise(e)]
        return [f"< {e[0]}", *inner, f">= {e[-1]}"]


@dataclass(frozen=True)
class DriftResult:
    """Per-feature drift of new data against a reference, with the thresholds applied."""

    features: dict[str, FeatureDrift]
    n_reference: int
    n_current: int
    psi_threshold: float
    p_value: float

    @property
    def drifting(self) -> list[str]:
        """The drifting features, most shifted first."""
        found = [n for n, f in self.features.items() if f.drifting]
        return sorted(found, key=lambda n: -self.features[n].psi)

    @property
    def max_psi(self) -> float:
        return max((f.psi for f in self.features.values()), default=0.0)

    @property
    def metrics(self) -> dict[str, float]:
        """Numbers only, flat, as ``metrics/drift.json`` and the trackers name them."""
        out = {
            "drift/max_psi": self.max_psi,
            "drift/n_drifting": float(len(self.drifting)),
            "drift/n_features": float(len(self.features)),
            "drift/rows": float(self.n_current),
        }
        for name, f in self.features.items():
            out[f"psi/{name}"] = f.psi
            out[f"ks_pvalue/{name}"] = f.p_value
        return out

    def summary(self) -> dict[str, Any]:
        """What a sidecar records (predict's ``drift`` entry)."""
        return {
            "max_psi": round(self.max_psi, 6),
            "drifting": self.drifting,
            "psi_threshold": self.psi_threshold,
            "p_value": self.p_value,
            "rows": self.n_current,
            "psi": {n: round(f.psi, 6) for n, f in self.features.items()},
            "ks_pvalue": {n: f.p_value for n, f in self.features.items()},
        }

    def line(self) -> str:
        """One human line: what drifts (or not), the max PSI and the thresholds."""
        rule = f"PSI >= {self.psi_threshold:g} and KS p < {self.p_value:g}"
        if not self.drifting:
            return f"no drift ({rule}): max PSI {self.max_psi:.3f}"
        named = ", ".join(f"{n} (PSI {self.features[n].psi:.3f})" for n in self.drifting)
        return f"drift in {len(self.drifting)} feature(s) ({rule}): {named}"


def psi(reference: Sequence[float], current: Sequence[float]) -> float:
    """Population stability index of two share vectors, shares floored at :data:`EPSILON`."""
    total = 0.0
    for ref, cur in zip(reference, current, strict=True):
        r, c = max(ref, EPSILON), max(cur, EPSILON)
        total += (c - r) * math.log(c / r)
    return total


def compare(
    reference: ReferenceProfile, current: CurrentProfile, thresholds: DriftSettings
) -> DriftResult:
    """Each reference feature's PSI and two-sample KS test; drifting when PSI >=
    ``psi_threshold`` and p < ``p_value``."""
    from scipy.stats import ks_2samp

    out = {}
    for name, ref in reference.features.items():
        counts = current.counts[name]
        n = sum(counts)
        shares = tuple(c / n for c in counts) if n else tuple(0.0 for _ in counts)
        sample = current.samples[name]
        if n and ref.sample and sample:
            test = ks_2samp(ref.sample, sample, method="asymp")  # exact fails on ties
            stat, p = float(test.statistic), float(test.pvalue)
        else:
            stat, p = 0.0, 1.0
        value = psi(ref.shares, shares) if n else 0.0
        drifting = value >= thresholds.psi_threshold and p < thresholds.p_value
        out[name] = FeatureDrift(value, stat, p, drifting, ref.shares, shares, ref.edges)
    return DriftResult(
        out, reference.n_rows, current.n_rows, thresholds.psi_threshold, thresholds.p_value
    )


# --------------------------------------------------------------------------- references


def reference_for(settings: Settings, model: ModelChoice) -> tuple[ReferenceProfile, str]:
    """The reference profile of ``model`` and where it was found: its MLflow run's
    ``reference_profile.json`` artifact, else a ``models/*.profile.json`` recording the
    model's sha256. None found is one ArtifactError naming the model."""
    if model.run_id:
        from housing.runs import store_root
        from housing.tracking.mlflow import run_artifact_text

        uri, root = settings.mlflow.tracking_uri, store_root(settings.root)
        try:
            text = run_artifact_text(uri, model.run_id, PROFILE_ARTIFACT, root)
        except Exception as exc:  # a server gone since the model was resolved
            log.warning("drift: MLflow %s: %s", uri, first_line(exc, 200, typed=True))
            text = None
        if text is not None:
            import json

            where = f"run {model.run_id}/{PROFILE_ARTIFACT}"
            try:
                reference = ReferenceProfile.from_dict(json.loads(text), where)
            except ValueError:
                raise ArtifactError(f"{where}: not valid JSON; retrain the model") from None
            if reference.model_sha256 == model.sha256:
                return reference, f"mlflow:{where}"
    unreadable: list[str] = []
    for path in sorted(settings.paths.models_dir.glob(f"*{PROFILE_SUFFIX}")):
        try:
            reference = read_profile(path)
        except HousingError as exc:
            unreadable.append(first_line(exc))
            continue
        if model.sha256 and reference.model_sha256 == model.sha256:
            return reference, io.project_path(path, settings.root)
    why = unreadable[0] if unreadable else "trained before drift profiles existed, or gone"
    raise ArtifactError(
        f"{model.label}: no reference profile of its training data ({why}); "
        "retrain it (housing repro)"
    )


# --------------------------------------------------------------------------- events


def announce(
    settings: Settings,
    result: DriftResult,
    *,
    origin: str,
    input_path: Path | None,
    model: ModelChoice | None,
    started: float,
    started_at: str | None = None,
) -> dict[str, Any]:
    """Append the ``drift`` event to ``metrics/pipeline_events.jsonl`` (status ``drifted``
    on a crossing, else ``succeeded``) and, on a crossing with ``drift.notify``, send it to
    every ``notifications:`` sink; returns the event."""
    from housing import runs
    from housing.monitoring import EventLog, Notifiers, build_notifiers, make_event
    from housing.monitoring import iso_time as utc_now  # the events log's own time format

    drifting = result.drifting
    event = make_event(
        runs.current().run_id,
        STAGE,
        "drifted" if drifting else "succeeded",
        started_at=started_at or utc_now(),
        finished_at=utc_now(),
        duration_sec=time.perf_counter() - started,
        extra={
            "origin": origin,
            "input": io.project_path(input_path, settings.root) if input_path else None,
            "model": model.label if model else None,
            "drifting": ",".join(drifting),
            "metrics": result.metrics,
        },
    )
    EventLog(settings.paths.metrics_dir / "pipeline_events.jsonl").append(event)
    if drifting and settings.drift.notify:
        sinks = build_notifiers(settings.notifications).sinks
        Notifiers(sinks, on=("all",)).notify(event)
    return event
