"""The ``housing`` command: one subcommand per stage plus pipeline utilities.

Each subcommand composes the Hydra config from its overrides (``key=value``
arguments), validates it, and calls one package function. User errors print one
``error: ...`` line and exit non-zero; nothing is configured at import time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from housing.entry import Parser, add_common_options, run_cli
from housing.errors import HousingError

if TYPE_CHECKING:
    pass

log = logging.getLogger("housing")

STAGE_COMMANDS = ("prepare", "train", "select_best", "evaluate")
#: Subcommands whose module parses its own options: command -> (module, help).
DELEGATED = {
    "pipeline": ("housing.orchestration.pipeline", "the ClearML pipeline (offline: local DAG)"),
    "schedule": ("housing.orchestration.scheduling", "schedule the pipeline (cron or ClearML)"),
    "compare": ("housing.reporting.compare", "export experiment/model comparison CSVs"),
    "report": ("housing.reporting.report", "write reports/experiments.html and .md"),
}


from housing.runner import run_stage  # noqa: E402  (re-exported)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="housing",
        description="House-price regression pipeline (DVC + Hydra + MLflow + ClearML).",
        epilog="Overrides are Hydra syntax, e.g.: housing train model=ridge model.params.alpha=2",
    )
    add_common_options(parser, overrides=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "prepare": "load, validate and split the data",
        "train": "train one model (model=NAME)",
        "select_best": "pick the best trained candidate",
        "evaluate": "score the best model on the test split",
        "run": "alias of repro",
        "config": "print the composed, validated config",
        "doctor": "check tracking backends, ClearML server, credentials, queues, agents",
        "status": "show the last pipeline run's stages from metrics/pipeline_events.jsonl",
        "repro": "dvc repro with the train stages in parallel (-j N processes)",
        "clearml": "ClearML utilities: `housing clearml sync` imports offline sessions",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        if name in ("repro", "run"):
            p.add_argument("-j", "--jobs", type=int, default=None, help="default: CPU count")
            continue
        if name == "clearml":
            p.add_argument("action", choices=["sync"], help="sync: import offline sessions")
        p.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
        if name == "select_best":
            sub._name_parser_map["select-best"] = p  # accept the dashed spelling too
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (see housing {name} --help)", add_help=False)
    return parser


def _split_delegated(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(command, argv for its module) when ``argv`` names a delegated subcommand."""
    globals_: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        globals_.append(argv[i])
        if argv[i] == "--config-dir" and i + 1 < len(argv):
            globals_.append(argv[i + 1])
            i += 1
        i += 1
    if i < len(argv) and argv[i] in DELEGATED:
        return argv[i], [*globals_, *argv[i + 1 :]]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``housing`` command; returns the process exit code."""
    import importlib

    arguments = list(sys.argv[1:] if argv is None else argv)
    delegated = _split_delegated(arguments)
    if delegated is not None:
        command, rest = delegated
        module = importlib.import_module(DELEGATED[command][0])
        return int(module.main(rest))
    return run_cli(_parser(), arguments, _dispatch, intermixed=False)


def _dispatch(args: argparse.Namespace) -> int:
    command = "select_best" if args.command == "select-best" else args.command
    overrides = list(getattr(args, "overrides", []))
    if command in STAGE_COMMANDS:
        run_stage(command, overrides, args.config_dir)
        return 0
    if command == "config":
        import yaml

        from housing.config import load_settings

        settings = load_settings(overrides, config_dir=args.config_dir)
        print(yaml.safe_dump(dict(settings.resolved), sort_keys=False), end="")
        return 0
    if command == "doctor":
        return doctor(overrides, args.config_dir)
    if command == "status":
        return status(overrides, args.config_dir)
    if command in ("repro", "run"):
        return repro(args.jobs, args.verbosity)
    if command == "clearml":
        return clearml_sync(overrides, args.config_dir)
    raise HousingError(f"unknown command {command!r}")  # pragma: no cover - argparse guards


def repro(jobs: int | None, verbosity: int = 0) -> int:
    """``housing repro``: run what DVC says is stale; one line per stage, then a summary."""
    from housing.repro import ReproError, reproduce

    def show(stage: str, what: str) -> None:
        if what == "running":
            print(f"running {stage}", flush=True)
        elif what == "skipped":
            print(f"{stage} is up to date", flush=True)
        elif what == "failed":
            print(f"{stage} failed", flush=True)

    result = reproduce(Path.cwd(), jobs=jobs, verbosity=verbosity, on_event=show)
    if not result.ok:
        raise ReproError(result.error or "failed", result.exit_code or 1)
    ran = result.named("ran")
    print(
        f"run {result.run_id}: {len(ran)} stage(s) run, "
        f"{len(result.named('skipped'))} up to date, in {result.seconds:.1f}s"
    )
    return 0


def doctor(overrides: Sequence[str], config_dir: Path | None) -> int:
    """Print what the project will use and what is wrong; exit 1 when a check fails."""
    import os

    from housing.config import load_settings
    from housing.doctor import diagnose, render

    settings = load_settings(overrides, config_dir=config_dir)
    cml = settings.clearml
    checks = diagnose(
        os.environ,
        api_host=cml.api_host,
        web_host=cml.web_host,
        files_host=cml.files_host,
        config_file=os.environ.get("CLEARML_CONFIG_FILE"),
        tracking_backends=settings.tracking,
        clearml_mode=cml.mode,
        mlflow_uri=settings.mlflow.tracking_uri,
        timeout=cml.connect_timeout_sec,
        expected_queues=[] if cml.pipeline.run_locally else [cml.pipeline.execution_queue],
        access_key_env=cml.access_key_env,
        secret_key_env=cml.secret_key_env,
    )
    print(render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def clearml_sync(overrides: Sequence[str], config_dir: Path | None) -> int:
    """Import every offline ClearML session not yet imported into the configured server."""
    from housing.config import load_settings
    from housing.tracking.offline import sync

    cml = load_settings(overrides, config_dir=config_dir).clearml
    report = sync(
        cml.offline_dir,
        api_host=cml.api_host,
        timeout_sec=cml.connect_timeout_sec,
        web_host=cml.web_host,
        files_host=cml.files_host,
        output_uri=cml.output_uri,
        access_key_env=cml.access_key_env,
        secret_key_env=cml.secret_key_env,
    )
    print(report.summary())
    return 0 if report.ok else 1


def status(overrides: Sequence[str], config_dir: Path | None) -> int:
    """Print the last run's stages, durations and outcome from the events log."""
    from housing.config import load_settings
    from housing.monitoring import last_run_status, render_status

    settings = load_settings(overrides, config_dir=config_dir)
    events = settings.paths.metrics_dir / "pipeline_events.jsonl"
    run = last_run_status(events)
    if run is None:
        print(f"no pipeline runs recorded yet in {events}")
        return 0
    print(render_status(run))
    test = settings.paths.test_summary
    if test.is_file():
        from housing.io import read_record, read_scores, relpath

        meta = settings.paths.meta(settings.paths.test_metrics)
        model = read_record(meta).get("model") if meta.is_file() else None
        scores = "  ".join(f"test/{k}={v:.3f}" for k, v in sorted(read_scores(test).items()))
        where = relpath(test, settings.root)
        print(f"selected model: {model}  {scores}  ({where})")
    return 0 if run.outcome != "failed" else 1


def stage_main(stage: str, argv: Sequence[str] | None = None) -> int:
    """Entry point used by ``scripts/<stage>.py``: same as ``housing <stage> ...``."""
    return main([stage, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
