"""`housing repro`: ``dvc repro`` with the independent train stages run in parallel.

DVC runs one stage at a time, but releases its repository lock while a stage's
command runs, so independent stages can be reproduced by concurrent ``dvc repro -s``
processes (``--wait-for-lock`` makes them queue for the short locked parts). This
runs, in order: the stages before the ``foreach`` train stages; every ``train@<name>``
stage, ``jobs`` at a time; then a plain ``dvc repro`` that finishes (and checks) the
rest. Results and ``dvc.lock`` are the same as a serial ``dvc repro``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from housing.errors import HousingError


@dataclass(frozen=True)
class ReproPlan:
    """Stage names per phase."""

    before: list[str]
    parallel: list[str]


def plan(root: Path) -> ReproPlan:
    """Read ``dvc.yaml`` (and the ``vars`` it names) to find the parallel train stages."""
    import yaml

    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    stages: dict[str, Any] = dvc_yaml.get("stages", {})
    before: list[str] = []
    parallel: list[str] = []
    for name, body in stages.items():
        if isinstance(body, dict) and "foreach" in body:
            parallel.extend(f"{name}@{item}" for item in _foreach_items(root, body["foreach"]))
            break
        before.append(name)
    return ReproPlan(before, parallel)


def _foreach_items(root: Path, expr: Any) -> list[str]:
    """Items of a ``foreach``: a literal list or ``${key.path}`` from conf/pipeline.yaml."""
    import yaml

    if isinstance(expr, list):
        return [str(x) for x in expr]
    text = str(expr).strip()
    if not (text.startswith("${") and text.endswith("}")):
        raise HousingError(f"dvc.yaml: cannot read foreach {text!r}")
    value: Any = yaml.safe_load((root / "conf" / "pipeline.yaml").read_text())
    for part in text[2:-1].split("."):
        value = value[part]
    return [str(x) for x in value]


def parallel_repro(root: Path, jobs: int | None = None, dvc: str | None = None) -> int:
    """Reproduce the pipeline in ``root``; returns 0 or the failing phase's exit code.

    Every stage shares one ``HOUSING_RUN_ID`` (taken from the environment or made
    here), and a pipeline summary line closes the run in ``metrics/pipeline_events.jsonl``.
    """
    from housing.monitoring import current_run_id

    exe = dvc or shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    phases = plan(root)
    workers = max(1, jobs or os.cpu_count() or 1)
    run_id = current_run_id()
    env = dict(os.environ, HOUSING_RUN_ID=run_id)
    started = time.monotonic()

    def repro(*args: str) -> int:
        return subprocess.call([exe, "--wait-for-lock", "repro", *args], cwd=root, env=env)

    code = repro(*phases.before) if phases.before else 0
    error = f"stages {', '.join(phases.before)} failed" if code else None
    if code == 0 and phases.parallel:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            codes = list(pool.map(lambda stage: repro("-s", stage), phases.parallel))
        failed = [s for s, c in zip(phases.parallel, codes, strict=True) if c != 0]
        if failed:
            error = f"stages failed: {', '.join(failed)}"
            code = next(c for c in codes if c != 0)
    if code == 0:
        code = repro()
        error = "dvc repro failed" if code else None
    _summarise(root, run_id, time.monotonic() - started, error)
    if error:
        print(f"error: {error}", file=sys.stderr)
    return code


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
