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
    """Reproduce the pipeline in ``root``; returns the exit code of the failing phase or 0."""
    exe = dvc or shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    phases = plan(root)
    workers = max(1, jobs or os.cpu_count() or 1)

    def repro(*args: str) -> int:
        return subprocess.call([exe, "--wait-for-lock", "repro", *args], cwd=root)

    if phases.before and (code := repro(*phases.before)) != 0:
        return code
    if phases.parallel:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            codes = list(pool.map(lambda stage: repro("-s", stage), phases.parallel))
        failed = [s for s, c in zip(phases.parallel, codes, strict=True) if c != 0]
        if failed:
            print(f"error: stages failed: {', '.join(failed)}", file=sys.stderr)
            return next(c for c in codes if c != 0)
    return repro()
