"""The ``housing`` command: one subcommand per stage plus pipeline utilities.

Each subcommand composes the Hydra config from its overrides (``key=value``
arguments), validates it, and calls one package function. User errors print one
``error: ...`` line and exit non-zero; nothing is configured at import time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from housing.entry import Parser, add_common_options, run_cli
from housing.errors import ConfigError, HousingError

if TYPE_CHECKING:
    from housing.config import Settings

log = logging.getLogger("housing")

STAGE_COMMANDS = ("prepare", "train", "select_best", "evaluate")
#: Subcommands whose module parses its own options: command -> (module, help).
DELEGATED = {
    "pipeline": ("housing.orchestration.pipeline", "the ClearML pipeline (offline: local DAG)"),
    "schedule": ("housing.orchestration.scheduling", "schedule the pipeline (cron or ClearML)"),
    "compare": ("housing.reporting.compare", "export experiment/model comparison CSVs"),
    "report": ("housing.reporting.report", "write reports/experiments.html and .md"),
}


def run_stage(stage: str, overrides: Sequence[str] = (), config_dir: Path | None = None) -> Any:
    """Compose the config and run one stage; returns the stage's result dataclass."""
    from housing.config import load_settings

    return execute_stage(stage, load_settings(overrides, config_dir=config_dir))


def pipeline_run_id() -> str:
    """``$HOUSING_RUN_ID`` (shared by the stages of one run), else a new id."""
    from housing.monitoring import current_run_id

    return current_run_id()


def execute_stage(stage: str, settings: Settings, run_id: str | None = None) -> Any:
    """Run one stage with its events, notifications and trackers around it."""
    from housing.monitoring import EventLog, build_notifiers, track_stage
    from housing.tracking.base import StageRun
    from housing.tracking.recorder import record, tracked

    name = f"train_{settings.model.name}" if stage == "train" else stage
    run_id = run_id or pipeline_run_id()
    events = EventLog(settings.paths.metrics_dir / "pipeline_events.jsonl")
    try:
        notifier = build_notifiers(settings.section("notifications"), base_dir=settings.root)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    run = StageRun(stage=stage, name=name, pipeline_run_id=run_id, tags=(stage,))
    with track_stage(events, run_id, name, notifier) as handle, tracked(settings, run) as tset:
        result = _stage_function(stage)(settings)
        record(tset, stage, settings, result)
        metrics = getattr(result, "metrics", None)
        if isinstance(metrics, dict):
            handle.update({"metrics": metrics})
    return result


def _stage_function(stage: str) -> Callable[[Any], Any]:
    if stage == "prepare":
        from housing.stages.prepare import run as prepare

        return prepare
    if stage == "train":
        from housing.stages.train import run as train

        return train
    if stage == "select_best":
        from housing.stages.select_best import run as select_best

        return select_best
    if stage == "evaluate":
        from housing.stages.evaluate import run as evaluate

        return evaluate
    raise ValueError(f"unknown stage {stage!r}")


def run_all(overrides: Sequence[str] = (), config_dir: Path | None = None) -> dict[str, Any]:
    """prepare -> train every candidate -> select_best -> evaluate, in this process."""
    from housing.config import load_settings

    settings = load_settings(overrides, config_dir=config_dir)
    run_id = pipeline_run_id()
    results: dict[str, Any] = {"prepare": execute_stage("prepare", settings, run_id)}
    for name in settings.selection.candidates:
        model_settings = load_settings([*overrides, f"model={name}"], config_dir=config_dir)
        results[f"train_{name}"] = execute_stage("train", model_settings, run_id)
    results["select_best"] = execute_stage("select_best", settings, run_id)
    results["evaluate"] = execute_stage("evaluate", settings, run_id)
    return results


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
        "run": "all stages in one process (prepare, train each candidate, select, evaluate)",
        "config": "print the composed, validated config",
        "doctor": "check tracking backends, ClearML server, credentials, queues, agents",
        "status": "show the last pipeline run's stages from metrics/pipeline_events.jsonl",
        "repro": "dvc repro with the train stages in parallel (-j N processes)",
        "clearml": "ClearML utilities: `housing clearml sync` imports offline sessions",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        if name == "repro":
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
    if command == "run":
        run_all(overrides, args.config_dir)
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
    if command == "repro":
        from housing.repro import parallel_repro

        return parallel_repro(Path.cwd(), args.jobs)
    if command == "clearml":
        return clearml_sync(overrides, args.config_dir)
    raise HousingError(f"unknown command {command!r}")  # pragma: no cover - argparse guards


def doctor(overrides: Sequence[str], config_dir: Path | None) -> int:
    """Print what the project will use and what is wrong; exit 1 when a check fails."""
    import os

    from housing.config import load_settings
    from housing.doctor import diagnose, render

    settings = load_settings(overrides, config_dir=config_dir)
    clearml = settings.section("clearml")
    server = clearml.get("server") or {}
    auth = clearml.get("auth") or {}
    pipeline = clearml.get("pipeline") or {}
    queues = [] if pipeline.get("run_locally", True) else [str(pipeline["execution_queue"])]
    checks = diagnose(
        os.environ,
        api_host=server.get("api_host"),
        web_host=server.get("web_host"),
        files_host=server.get("files_host"),
        config_file=os.environ.get("CLEARML_CONFIG_FILE"),
        tracking_backends=settings.tracking,
        clearml_mode=str(clearml.get("mode", "auto")),
        mlflow_uri=str(settings.section("mlflow").get("tracking_uri", "")),
        timeout=float(clearml.get("connect_timeout_sec", 2.0)),
        expected_queues=queues,
        access_key_env=str(auth.get("access_key_env", "CLEARML_API_ACCESS_KEY")),
        secret_key_env=str(auth.get("secret_key_env", "CLEARML_API_SECRET_KEY")),
    )
    print(render(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def clearml_sync(overrides: Sequence[str], config_dir: Path | None) -> int:
    """Import every offline ClearML session not yet imported into the configured server."""
    from housing.config import load_settings
    from housing.tracking.clearml import clearml_settings
    from housing.tracking.offline import sync

    settings = load_settings(overrides, config_dir=config_dir)
    cml = clearml_settings(settings.section("clearml"), settings.root)
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
