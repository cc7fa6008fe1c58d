"""Tracking cost per stage beyond one-time imports, as ``housing repro`` workers see it.

Imports what the engine's fork server preloads (with the environment the engine
gives it, so its warm-up runs as it does there), then runs each stage in a process
forked from this warm one (as the engine does), with tracking off and on (MLflow on a
sqlite store + ClearML offline); prints seconds per stage as JSON. Run in a scratch
copy of the project (benchmarks/bench.py makes one). The stages share one pipeline run
owned by the engine, as in ``housing repro``. ``stage_cost.py [passes]`` (default 2;
each figure is the best of the passes).
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from pathlib import Path

from housing import runs
from housing.config import load_settings
from housing.repro import preload
from housing.runs import RunContext

ONE = "selection.candidates=[ridge]"
STAGES = (
    ("prepare", ()),
    ("train", ("model=ridge",)),
    ("select_best", (ONE,)),
    ("evaluate", (ONE,)),
)


def _timed(
    stage: str, overrides: tuple[str, ...], tracking: str, context: RunContext, queue: object
) -> None:
    from housing.config import load_settings
    from housing.runner import execute_stage

    settings = load_settings([f"tracking={tracking}", *overrides], root=Path.cwd())
    t0, c0 = time.perf_counter(), time.process_time()
    execute_stage(stage, settings, context=context)
    queue.put((time.perf_counter() - t0, time.process_time() - c0))  # type: ignore[attr-defined]


def main(passes: int = 2) -> None:
    # as the engine starts its fork server: with the environment its warm-up needs
    settings = load_settings(["tracking=both"], root=Path.cwd())
    preload(settings)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    # one pipeline run owned by the engine, as housing repro hands it to its workers
    context = runs.current().owned_by_engine()
    # each stage needs the previous one's outputs: passes run the stages in order
    figures: dict[str, list[tuple[float, float]]] = {}
    for tracking in ("none", "both") * passes:
        for stage, overrides in STAGES:
            proc = ctx.Process(target=_timed, args=(stage, overrides, tracking, context, queue))
            proc.start()
            seconds = queue.get(timeout=600)
            proc.join()
            figures.setdefault(f"{stage}:{tracking}", []).append(seconds)

    def best(key: str, which: int) -> float:
        return min(f[which] for f in figures[key])

    # wall seconds (min over the passes) and, less sensitive to a loaded machine, the
    # CPU seconds of the stage's own process
    stages = {stage: (best(f"{stage}:none", 0), best(f"{stage}:both", 0)) for stage, _ in STAGES}
    cpu = {stage: (best(f"{stage}:none", 1), best(f"{stage}:both", 1)) for stage, _ in STAGES}
    mean = sum(on - off for off, on in stages.values()) / len(stages)
    mean_cpu = sum(on - off for off, on in cpu.values()) / len(cpu)
    print(json.dumps({"stages": stages, "mean_cost": mean, "mean_cost_cpu": mean_cpu}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
