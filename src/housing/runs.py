"""One pipeline run, one identity, whoever starts it.

A *pipeline run* is what one command does to the DAG (``housing repro``, ``dvc repro``,
``dvc exp run``, a scheduled run, a stage run by hand); its stages share one run id and
one MLflow parent run. :func:`current` finds the run of the calling process:

0. ``HOUSING_RUN_CONTEXT``: a whole context (JSON) handed to a stage that runs on behalf
   of another process (:mod:`housing.stage_server`).
1. ``HOUSING_RUN_ID`` (``housing repro``, ``make run``, the scheduler), owned by
   ``HOUSING_RUN_OWNER_PID`` when set (that engine closes the parent itself).
2. Else the nearest DVC ancestor process: its pid and start time name the run. DVC cannot
   tell a stage it is the last, so each stage leaves the parent closed and the next reopens it.
3. Else (a stage run by hand) a new id owned by this process.

The owner's pid and start time are recorded, so a later run can close runs left RUNNING
by a killed process (:func:`is_alive`). :func:`store_root` maps a DVC experiment's
temporary copy (``.dvc/tmp/exps/``) back to the repository whose stores get the records.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

RUN_ID_ENV = "HOUSING_RUN_ID"
OWNER_PID_ENV = "HOUSING_RUN_OWNER_PID"
CONTEXT_ENV = "HOUSING_RUN_CONTEXT"
_EXPS_DIR = (".dvc", "tmp", "exps")


@dataclass(frozen=True)
class RunContext:
    """Who owns the pipeline run that a stage belongs to."""

    run_id: str
    trigger: str  # housing | dvc | manual
    owner_pid: int
    owner_started: float  # the owner's process start time (guards against pid reuse)
    host: str
    closes_parent: bool  # True: each stage leaves the parent closed (no engine owns it)
    experiment: str | None = None  # DVC experiment name
    baseline: str | None = None  # DVC experiment baseline commit

    @property
    def tags(self) -> dict[str, str]:
        """Tags recorded on the runs: owner, trigger and DVC experiment."""
        tags = {
            "housing.trigger": self.trigger,
            "housing.owner_pid": str(self.owner_pid),
            "housing.owner_started": f"{self.owner_started:.3f}",
            "housing.host": self.host,
        }
        if self.experiment:
            tags["housing.dvc_experiment"] = self.experiment
        if self.baseline:
            tags["housing.dvc_baseline"] = self.baseline
        return tags

    def to_json(self) -> str:
        """This context as :data:`CONTEXT_ENV` carries it."""
        return json.dumps(asdict(self))

    def owned_by_engine(self) -> RunContext:
        """The same run, owned and closed by the engine (``housing repro``), not by each stage."""
        trigger = "housing" if self.trigger == "manual" else self.trigger
        return replace(self, trigger=trigger, closes_parent=False)


def process_started(pid: int) -> float | None:
    """The start time of process ``pid`` (seconds since the epoch), None if it is gone."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def is_alive(pid: int, started: float | None, host: str) -> bool:
    """Whether the process that recorded (pid, start time, host) still runs.

    A run recorded on another host is assumed alive (it cannot be checked from here).
    """
    if host != socket.gethostname():
        return True
    now = process_started(pid)
    if now is None:
        return False
    return started is None or abs(now - started) < 1.0


def _dvc_ancestor() -> int | None:
    """The pid of the nearest ancestor process that runs DVC, if any."""
    import psutil

    try:
        process = psutil.Process().parent()
        while process is not None and process.pid > 1:
            cmdline = process.cmdline()
            if cmdline[1:3] == ["-m", "dvc"] or any(Path(a).name == "dvc" for a in cmdline[:2]):
                return int(process.pid)
            process = process.parent()
    except psutil.Error:
        return None
    return None


def current(env: Mapping[str, str] | None = None) -> RunContext:
    """The run the calling process belongs to (see the module docstring)."""
    from housing.monitoring import new_run_id

    source = os.environ if env is None else env
    if source.get(CONTEXT_ENV):
        return RunContext(**json.loads(source[CONTEXT_ENV]))
    run_id = source.get(RUN_ID_ENV, "").strip()
    owner = source.get(OWNER_PID_ENV, "").strip()
    owned = bool(run_id) and owner.isdigit()  # the engine closes the parent itself
    dvc = None if run_id else _dvc_ancestor()
    pid = int(owner) if owned else dvc or os.getpid()
    started = process_started(pid) or 0.0
    trigger = "housing" if run_id else "dvc" if dvc else "manual"
    if not run_id:
        run_id = f"dvc-{started:.0f}-{dvc}" if dvc else new_run_id()
    return RunContext(
        run_id,
        trigger,
        pid,
        started,
        socket.gethostname(),
        closes_parent=not owned,
        experiment=source.get("DVC_EXP_NAME") or None,
        baseline=source.get("DVC_EXP_BASELINE_REV") or None,
    )


def store_root(root: Path) -> Path:
    """The repository whose stores get the records: ``root``, or the repository a DVC
    experiment's temporary copy (``<repo>/.dvc/tmp/exps/...``) was made from."""
    resolved = root.resolve()
    parts = resolved.parts
    for i in range(len(parts) - len(_EXPS_DIR), 0, -1):
        if parts[i : i + len(_EXPS_DIR)] == _EXPS_DIR:
            return Path(*parts[:i])
    return resolved
