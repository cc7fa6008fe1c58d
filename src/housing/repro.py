"""`housing repro`: ``dvc repro`` with the independent train stages run in parallel.

DVC reproduces one stage at a time. This drives DVC's Python API in one process
(paying DVC's start-up once): reproduce the stages before the ``foreach`` train
stages; ask DVC which ``train@<name>`` stages changed and run their commands ``jobs``
at a time; record each finished one with ``dvc commit`` (DVC's documented way to
register a stage whose command ran outside ``dvc repro``); then reproduce the rest,
which also checks everything. Outputs, the DVC cache and ``dvc.lock`` end up as a
serial ``dvc repro`` leaves them.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from housing.errors import HousingError


@dataclass(frozen=True)
class ReproPlan:
    """Stage names per phase."""

    before: list[str]
    parallel: list[str]


def plan(root: Path) -> ReproPlan:
    """The stages before the first ``foreach`` group, and that group (as DVC resolves it)."""
    from dvc.repo import Repo

    return plan_stages([stage.name for stage in Repo(str(root)).index.stages])


def plan_stages(names: list[str]) -> ReproPlan:
    """Split DVC stage names (in ``dvc.yaml`` order) around the first ``name@item`` group."""
    group = next((n.split("@", 1)[0] for n in names if "@" in n), None)
    parallel = [n for n in names if group is not None and n.startswith(f"{group}@")]
    before = names[: names.index(parallel[0])] if parallel else names
    return ReproPlan(before, parallel)


def parallel_repro(
    root: Path, jobs: int | None = None, announce: Callable[[str], None] | None = None
) -> None:
    """Reproduce the pipeline in ``root``; a :class:`HousingError` when a stage failed.

    Every stage shares one ``HOUSING_RUN_ID`` (taken from the environment or made
    here), and a pipeline summary line closes the run in ``metrics/pipeline_events.jsonl``.
    ``announce`` receives a line when a parallel stage command starts.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from housing.monitoring import current_run_id

    workers = max(1, jobs or os.cpu_count() or 1)
    run_id = current_run_id()
    os.environ["HOUSING_RUN_ID"] = run_id  # stage commands inherit it
    started = time.monotonic()
    error: str | None = None
    try:
        repo = Repo(str(root))
        phases = plan_stages([stage.name for stage in repo.index.stages])
        if phases.before:
            repo.reproduce(targets=phases.before)
        changed = [n for n in phases.parallel if n in repo.status(targets=phases.parallel)]
        commands = {n: repo.stage.collect(n)[0].cmd for n in changed}

        def run(stage: str) -> int:
            if announce is not None:
                announce(f"Running stage '{stage}' (parallel):\n> {commands[stage]}")
            return subprocess.call(commands[stage], shell=True, cwd=root)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            codes = dict(zip(changed, pool.map(run, changed), strict=True))
        for stage in changed:
            if codes[stage] == 0:
                repo.commit(stage, force=True)
        failed = [s for s in changed if codes[s] != 0]
        if failed:
            error = f"stages failed: {', '.join(failed)}"
        else:
            repo.reproduce()
    except DvcException as exc:
        error = f"dvc: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    _summarise(root, run_id, time.monotonic() - started, error)
    if error:
        raise HousingError(error)


def _summarise(root: Path, run_id: str, seconds: float, error: str | None) -> None:
    """Append the run's summary line (best model and test rmse when it succeeded)."""
    import json

    from housing.config import load_settings
    from housing.monitoring import EventLog, build_notifiers, record_pipeline_summary

    try:
        settings = load_settings(["tracking=none"], config_dir=root / "conf", root=root)
        notifier = build_notifiers(settings.section("notifications"), base_dir=root)
    except (HousingError, ValueError):
        return  # the stages already reported the config problem
    best = rmse = None
    if error is None and settings.paths.test_metrics.is_file():
        record = json.loads(settings.paths.test_metrics.read_text())
        best, rmse = record.get("model"), record.get("metrics", {}).get("test/rmse")
    record_pipeline_summary(
        EventLog(settings.paths.metrics_dir / "pipeline_events.jsonl"),
        run_id,
        "failed" if error else "succeeded",
        seconds,
        notifier=notifier,
        best_model=best,
        test_rmse=rmse,
        error=error,
    )
