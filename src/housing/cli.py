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
from typing import Any

from housing.errors import HousingError

log = logging.getLogger("housing")

STAGE_COMMANDS = ("prepare", "train", "select_best", "evaluate")


def run_stage(stage: str, overrides: Sequence[str] = (), config_dir: Path | None = None) -> Any:
    """Compose the config and run one stage; returns the stage's result dataclass."""
    from housing.config import load_settings

    settings = load_settings(overrides, config_dir=config_dir)
    return _stage_function(stage)(settings)


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
    results: dict[str, Any] = {"prepare": _stage_function("prepare")(settings)}
    train = _stage_function("train")
    for name in settings.selection.candidates:
        model_settings = load_settings([*overrides, f"model={name}"], config_dir=config_dir)
        results[f"train_{name}"] = train(model_settings)
    results["select_best"] = _stage_function("select_best")(settings)
    results["evaluate"] = _stage_function("evaluate")(settings)
    return results


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="housing",
        description="House-price regression pipeline (DVC + Hydra + MLflow + ClearML).",
        epilog="Overrides are Hydra syntax, e.g.: housing train model=ridge model.params.alpha=2",
    )
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity")
    parser.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity")
    parser.add_argument(
        "--config-dir", type=Path, default=None, help="config folder (default: ./conf)"
    )
    parser.set_defaults(verbosity=0)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "prepare": "load, validate and split the data",
        "train": "train one model (model=NAME)",
        "select_best": "pick the best trained candidate",
        "evaluate": "score the best model on the test split",
        "run": "all stages in one process (prepare, train each candidate, select, evaluate)",
        "config": "print the composed, validated config",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
        if name == "select_best":
            sub._name_parser_map["select-best"] = p  # accept the dashed spelling too
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``housing`` command; returns the process exit code."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbosity)
    try:
        return _dispatch(args)
    except HousingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


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
    raise HousingError(f"unknown command {command!r}")  # pragma: no cover - argparse guards


def stage_main(stage: str, argv: Sequence[str] | None = None) -> int:
    """Entry point used by ``scripts/<stage>.py``: same as ``housing <stage> ...``."""
    return main([stage, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
