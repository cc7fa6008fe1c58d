"""`make bench`: pipeline vs bare sklearn, no-op repro, synthetic scale-up.

Prints measured figures and each target's verdict; exits 0 either way (a benchmark
reports, it does not gate). Environment knobs:
  BENCH_ROWS   comma-separated synthetic row counts (default 100000,1000000; "" skips)
  BENCH_KEEP   keep the scratch repositories (prints where)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from housing.scratch import make_scratch_repo, project_root

BIN = Path(sys.executable).parent
RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[1:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)
#: Settings for the synthetic scale-up: printed with the results, never silent.
SCALE_OVERRIDES = {
    "conf/pipeline.yaml": [
        ("candidates: [linear_regression, ridge, random_forest, gradient_boosting]",
         "candidates: [linear_regression, ridge, random_forest, hist_gradient_boosting]"),
        # same CV folds at every size, so the time ratio compares like with like
        ("large_table_rows: 200000", "large_table_rows: 50000"),
    ],
    "dvc.yaml": [
        ("models/gradient_boosting.joblib", "models/hist_gradient_boosting.joblib"),
        ("metrics/train_gradient_boosting.json", "metrics/train_hist_gradient_boosting.json"),
    ],
    "conf/model/random_forest.yaml": [
        ("n_estimators: 100", "n_estimators: 20"),
        ("max_samples: null", "max_samples: 0.05"),
    ],
    "conf/model/hist_gradient_boosting.yaml": [("max_iter: 500", "max_iter: 100")],
}  # fmt: skip


@dataclass
class Timed:
    seconds: float
    max_rss_mb: float
    stdout: str
    stderr: str


def run(cmd: list[str], cwd: Path) -> Timed:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOUSING_CONFIG_DIR"] = str(cwd / "conf")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RSS_WRAPPER, *cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed in {cwd}:\n{proc.stderr[-2000:]}")
    rss_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS_KB")]
    rss = int(rss_lines[-1].split()[1]) / 1024 if rss_lines else float("nan")
    return Timed(seconds, rss, proc.stdout, proc.stderr)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def stage_count(stdout: str) -> int:
    return sum(1 for line in stdout.splitlines() if line.startswith("Running stage"))


def bench_pipeline(workdir: Path) -> None:
    print("== pipeline (tracking=none) vs bare sklearn in one process")
    serial_repo = make_scratch_repo(workdir / "serial", defaults={"tracking": "none"})
    parallel_repo = make_scratch_repo(workdir / "parallel", defaults={"tracking": "none"})
    serial = run([str(BIN / "dvc"), "repro"], serial_repo)
    noop = run([str(BIN / "dvc"), "repro"], serial_repo)
    parallel = run([str(BIN / "housing"), "repro"], parallel_repo)
    bare = run([sys.executable, str(project_root() / "benchmarks" / "bare.py")], serial_repo)
    bare_info = json.loads(bare.stdout)
    test = json.loads((serial_repo / "metrics/test_metrics.json").read_text())["metrics"]
    target = 1.5 * bare.seconds + 5.0
    print(
        f"dvc repro     {serial.seconds:7.2f} s  ({stage_count(serial.stdout)} stages, one at a "
        f"time; peak RSS {serial.max_rss_mb:.0f} MB; test/rmse {test['test/rmse']:.3f})"
    )
    print(f"housing repro {parallel.seconds:7.2f} s  (make run: train stages in parallel)")
    print(
        f"bare          {bare.seconds:7.2f} s  (imports {bare_info['import_sec']:.2f} s, "
        f"test/rmse {bare_info['test_rmse']:.3f})"
    )
    print(
        f"ratio         {serial.seconds / bare.seconds:7.2f} x (dvc repro), "
        f"{parallel.seconds / bare.seconds:.2f} x (housing repro)"
    )
    print(
        f"no-op         {noop.seconds:7.2f} s  "
        f"(second dvc repro, {stage_count(noop.stdout)} stages ran)"
    )
    print(
        f"target pipeline <= 1.5 x bare + 5 s = {target:.2f} s: "
        f"dvc repro {verdict(serial.seconds <= target)}, "
        f"housing repro {verdict(parallel.seconds <= target)}"
    )


def bench_tracking(workdir: Path) -> None:
    print("\n== tracking overhead (MLflow sqlite + ClearML offline) vs tracking=none")
    none_repo = make_scratch_repo(workdir / "trk-none", defaults={"tracking": "none"})
    both_repo = make_scratch_repo(workdir / "trk-both", defaults={"tracking": "both"})
    off = run([str(BIN / "dvc"), "repro"], none_repo)
    on = run([str(BIN / "dvc"), "repro"], both_repo)
    stages = stage_count(on.stdout)
    imports = run([sys.executable, "-c", "import mlflow, mlflow.sklearn, clearml"], none_repo)
    print(f"dvc repro  none {off.seconds:6.2f} s  both {on.seconds:6.2f} s  "
          f"-> {(on.seconds - off.seconds) / stages:.2f} s per stage ({stages} stages; "
          f"each stage pays the tracking imports: {imports.seconds:.2f} s)")  # fmt: skip
    one_process = "from housing.runner import run_all; run_all(['tracking={}'])"
    one_off = run([str(BIN / "python"), "-c", one_process.format("none")], none_repo)
    one_on = run([str(BIN / "python"), "-c", one_process.format("both")], both_repo)
    beyond = (one_on.seconds - one_off.seconds - imports.seconds) / stages
    print(f"run_all (one process, imports paid once)  none {one_off.seconds:6.2f} s  "
          f"both {one_on.seconds:6.2f} s")  # fmt: skip
    print(f"tracking cost beyond imports {beyond:.2f} s per stage "
          f"(target < 1 s): {verdict(beyond < 1.0)}")  # fmt: skip


def tweak_for_scale(repo: Path) -> None:
    for rel, edits in SCALE_OVERRIDES.items():
        path = repo / rel
        text = path.read_text()
        for old, new in edits:
            if old not in text:
                sys.exit(f"bench: {rel} no longer contains {old!r}; update SCALE_OVERRIDES")
            text = text.replace(old, new)
        path.write_text(text)


def bench_scale(workdir: Path, rows: list[int]) -> None:
    print("\n== synthetic scale-up (data=synthetic), full dvc repro, tracking=none")
    print("settings: " + "; ".join(f"{rel}: {new}" for rel, e in SCALE_OVERRIDES.items()
                                   for _, new in e if rel != "dvc.yaml"))  # fmt: skip
    print("          tables over train.large_table_rows use train.cv_folds_large CV folds "
          "(logged by the train stage)")  # fmt: skip
    results: dict[int, Timed] = {}
    for n in rows:
        repo = make_scratch_repo(
            workdir / f"scale-{n}", defaults={"tracking": "none", "data": "synthetic"}
        )
        data_cfg = repo / "conf/data/synthetic.yaml"
        data_cfg.write_text(data_cfg.read_text().replace("n_rows: 100000", f"n_rows: {n}"))
        tweak_for_scale(repo)
        results[n] = timed = run([str(BIN / "dvc"), "repro"], repo)
        test = json.loads((repo / "metrics/test_metrics.json").read_text())["metrics"]
        folds = {
            json.loads(p.read_text())["cv_folds"] for p in (repo / "metrics").glob("train_*.json")
            if p.name != "train_metrics.json"
        }  # fmt: skip
        print(f"{n:>9,} rows  {timed.seconds:8.1f} s  peak RSS {timed.max_rss_mb:7.0f} MB  "
              f"test/rmse {test['test/rmse']:.3f}  cv folds {sorted(folds)}")  # fmt: skip
    if 100_000 in results and 1_000_000 in results:
        ratio = results[1_000_000].seconds / results[100_000].seconds
        print(f"1M / 100k time ratio {ratio:.1f} x  (target <= 12 x): {verdict(ratio <= 12)}")
    if 1_000_000 in results:
        big = results[1_000_000]
        print(f"1M end to end {big.seconds:.1f} s (target < 300 s): {verdict(big.seconds < 300)}; "
              f"peak RSS {big.max_rss_mb:.0f} MB (target < 4096 MB): "
              f"{verdict(big.max_rss_mb < 4096)}")  # fmt: skip


def main() -> None:
    rows_env = os.environ.get("BENCH_ROWS", "100000,1000000")
    rows = [int(r) for r in rows_env.split(",") if r.strip()]
    keep = bool(os.environ.get("BENCH_KEEP"))
    tmp = Path(tempfile.mkdtemp(prefix="housing-bench-"))
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; scratch {tmp}")
    try:
        bench_pipeline(tmp)
        bench_tracking(tmp)
        if rows:
            bench_scale(tmp, rows)
    finally:
        if not keep:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    main()
