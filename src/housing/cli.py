"""The ``housing`` command: one click tree, the only layer that prints.

Each subcommand composes the Hydra config from its overrides (``key=value``
arguments), validates it, calls one package function and shows what it returned.
:func:`main` runs the tree without click's standalone mode (ClearML hooks
``sys.exit``): a :class:`~housing.errors.HousingError` becomes one ``error: ...``
line and its exit code, a usage error click's usage message and 2, Ctrl-C 130.
Nothing is configured at import time; ``scripts/*.py`` call :func:`main` with
their subcommand.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import click

from housing.entry import (
    bound_mlflow_http,
    configure_logging,
    hold_run_lock,
    report_error,
    settle_clearml,
)
from housing.errors import HousingError, first_line
from housing.runner import execute_stage

if TYPE_CHECKING:
    from rich.console import Console

    from housing.config import Settings
    from housing.doctor import Check
    from housing.monitoring import RunStatus
    from housing.orchestration.scheduling import ScheduleResult
    from housing.reporting.compare import CompareResult
    from housing.tuning import TuneResult

P = ParamSpec("P")
F = TypeVar("F", bound=Callable[..., Any])

PROG = "housing"
#: ``housing compare --stage`` choices (as :data:`housing.reporting.compare.STAGES`).
COMPARE_STAGES = ("prepare", "train", "select_best", "evaluate")
#: ``housing report --last`` default (as :data:`housing.reporting.report.DEFAULT_VERSIONS`).
REPORT_VERSIONS = 10
OVERRIDES_HELP = "Overrides are Hydra syntax (key=value), e.g. model=ridge model.params.alpha=2."


@dataclass
class Globals:
    """Options every command accepts, before or after its name."""

    verbosity: int = 0
    config_dir: Path | None = None
    argv: tuple[str, ...] = ()  # the command line (main's arguments), for the run lock


class _OrderedGroup(click.Group):
    """Lists its commands in the order they were added (the workflow's order)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def _global_option(*decls: str, attr: str, value: Any = None, **kwargs: Any) -> Callable[[F], F]:
    """An option stored in :class:`Globals` (``value``, else the given one) when given."""

    def store(ctx: click.Context, _: click.Parameter, given: Any) -> None:
        if given:
            setattr(ctx.ensure_object(Globals), attr, given if value is None else value)

    return click.option(*decls, expose_value=False, callback=store, **kwargs)


_GLOBAL_OPTIONS = (
    _global_option(
        "-q", "--quiet", attr="verbosity", value=-1, is_flag=True, help="Warnings and errors only."
    ),
    _global_option(
        "-v", "--verbose", attr="verbosity", value=1, is_flag=True, help="Debug messages too."
    ),
    _global_option(
        "--config-dir",
        attr="config_dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Config folder (default: $HOUSING_CONFIG_DIR, else ./conf).",
    ),
)


def _global_options(function: F) -> F:
    for option in reversed(_GLOBAL_OPTIONS):
        function = option(function)
    return function


def _leaf(function: Callable[Concatenate[Globals, P], int]) -> Callable[P, int]:
    """A command body: gets the global options, logging configured; accepts them too."""

    @functools.wraps(function)
    def command(*args: P.args, **kwargs: P.kwargs) -> int:
        options = click.get_current_context().ensure_object(Globals)
        configure_logging(options.verbosity)
        return function(options, *args, **kwargs)

    return _global_options(command)


def _locked(function: Callable[P, int]) -> Callable[P, int]:
    """A command that writes pipeline outputs or tracker stores: it holds the checkout's
    run lock while it runs (refused at once while another holds it; ``--wait`` waits)."""

    @click.option(
        "--wait",
        "wait_for_lock",
        is_flag=True,
        envvar="HOUSING_WAIT",
        help="Wait for a command running in this checkout instead of refusing.",
    )
    @functools.wraps(function)
    def command(*args: Any, wait_for_lock: bool, **kwargs: Any) -> int:
        ctx = click.get_current_context()
        argv = ctx.ensure_object(Globals).argv
        line = " ".join([PROG, *argv]) if argv else ctx.command_path
        say = functools.partial(_echo, err=True)
        with hold_run_lock(Path.cwd(), line, wait=wait_for_lock, say=say):
            return function(*args, **kwargs)

    return command  # type: ignore[return-value]


def _overrides(function: F) -> F:
    return click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(function)


def _configured(function: Callable[..., int]) -> Callable[..., int]:
    """A command body that gets the settings composed from the command's overrides."""

    @_overrides
    @_leaf
    @functools.wraps(function)
    def command(options: Globals, /, overrides: tuple[str, ...], **kwargs: Any) -> int:
        return function(_settings(overrides, options.config_dir), **kwargs)

    return command


def _settings(overrides: Sequence[str], config_dir: Path | None) -> Settings:
    """The composed settings; MLflow's HTTP budget set from them (mlflow.timeout_sec)."""
    from housing.config import load_settings

    settings = load_settings(list(overrides), config_dir=config_dir)
    bound_mlflow_http(settings.mlflow.timeout_sec, settings.mlflow.retries)
    return settings


def _tracked_settings(overrides: Sequence[str], config_dir: Path | None) -> Settings:
    """:func:`_settings` for a command that opens tracker runs: ClearML's variables
    settled too (its start-up, see :func:`housing.entry.settle_clearml`)."""
    settings = _settings(overrides, config_dir)
    settle_clearml(settings)
    return settings


def run_stage(stage: str, overrides: Sequence[str], config_dir: Path | None) -> None:
    """A stage command's body: the settings (with their MLflow budget), then the stage."""
    execute_stage(stage, _tracked_settings(overrides, config_dir))


def _echo(text: str = "", *, err: bool = False) -> None:
    """One line to stdout (stderr with ``err``), through ``sys.stdout`` as it is now.

    Not ``click.echo``: with a ClearML task open (``housing pipeline`` online) its
    lines did not reach the captured stdout, while ClearML's own stream wrapper does.
    """
    stream = sys.stderr if err else sys.stdout
    stream.write(f"{text}\n")
    stream.flush()


def _console() -> Console | None:
    """A rich console when stdout is a terminal; ``None`` means plain, stable text."""
    if not sys.stdout.isatty():
        return None
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False)


def _show(lines: Sequence[str], fancy: Callable[[Console], None]) -> None:
    """Plain ``lines``, or on a terminal what ``fancy`` prints to a rich console."""
    console = _console()
    if console is None:
        for line in lines:
            _echo(line)
    else:
        fancy(console)


@click.group(
    cls=_OrderedGroup,
    name=PROG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=f"{OVERRIDES_HELP} `housing COMMAND --help` shows a command's options.",
)
@_global_options
@click.pass_context
def cli(ctx: click.Context) -> None:
    """House-price regression pipeline (DVC + Hydra + MLflow + ClearML)."""
    ctx.ensure_object(Globals)


# --------------------------------------------------------------------------- stages


def _stage_command(stage: str, text: str) -> click.Command:
    @_locked
    @_overrides
    @_leaf
    def command(options: Globals, overrides: tuple[str, ...]) -> int:
        run_stage(stage, list(overrides), options.config_dir)
        return 0

    return cli.command(stage, help=f"{text}\n\n{OVERRIDES_HELP}", short_help=text)(command)


def _alias(command: click.Command, name: str, text: str, *, hidden: bool = False) -> None:
    """``name`` runs ``command``'s very function with the same options."""
    cli.add_command(
        click.Command(
            name,
            callback=command.callback,
            params=list(command.params),
            help=f"{text}\n\n{inspect.cleandoc(command.help or '')}".strip(),
            short_help=text,
            hidden=hidden,
        )
    )


_stage_command("prepare", "Load, validate and split the data.")
_stage_command("train", "Train one model (model=NAME).")
_select_best = _stage_command(
    "select_best", "Pick the best trained candidate (alias: select-best)."
)
_alias(_select_best, "select-best", "Alias of select_best.", hidden=True)
_stage_command("evaluate", "Score the best model on the test split.")


_input_option = click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV file with the model's feature columns (others are ignored).",
)
_model_option = click.option(
    "--model",
    "model_spec",
    default="champion",
    show_default=True,
    help="champion, a registered version number, or a candidate name (e.g. ridge).",
)


@cli.command("predict", short_help="Score a CSV file with the champion (or --model).")
@_input_option
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Predictions CSV (default: predict.output_dir/<input stem>.predictions.csv).",
)
@_model_option
@_locked
@_configured
def predict(settings: Settings, input_path: Path, output: Path | None, model_spec: str) -> int:
    """Predict every row of --input with the champion; write the predictions and a
    .meta.json sidecar (model, version, lineage, input sha256) atomically.
    """
    from housing.predict import run, summary_line

    settle_clearml(settings)  # predict is a tracked run
    _echo(summary_line(run(settings, input_path, output, model_spec)))
    return 0


@cli.command("drift", short_help="Compare a CSV file with the champion's training data.")
@_input_option
@_model_option
@click.option("--fail-on-drift", is_flag=True, help="Exit 1 when a feature drifts.")
@_locked
@_configured
def drift(settings: Settings, input_path: Path, model_spec: str, fail_on_drift: bool) -> int:
    """Per-feature drift (PSI, two-sample KS) of --input against the reference profile of
    the data the model was trained on; writes metrics/drift.json, its .meta.json and a
    plot per drifting feature (plots/drift/). A drifting feature is a warning (exit 0)
    unless --fail-on-drift.
    """
    from housing.drift_check import run as check

    report = check(settings, input_path, model_spec)
    drifting = bool(report.result.drifting)
    _echo(f"{'warning: ' if drifting else ''}{report.line()}")
    return 1 if drifting and fail_on_drift else 0


@cli.command("tune", short_help="Search a model's hyperparameters (Optuna; --apply).")
@click.option(
    "--apply",
    "apply_best",
    is_flag=True,
    help="Write the best params to conf/tuned/<model>.yaml (train reads them).",
)
@_locked
@_overrides
@_leaf
def tune(options: Globals, apply_best: bool, overrides: tuple[str, ...]) -> int:
    """Run tune.n_trials Optuna trials of model=NAME's search space (conf/tune/NAME.yaml),
    scored by the train stage's CV RMSE on the train split; a rerun continues the study.
    Without --apply it only reports the best params against the defaults.
    """
    from housing import tuning
    from housing.orchestration import clearml_tune

    _route_optuna_logs()
    settings = _settings([*overrides, tuning.WITHOUT_TUNED], options.config_dir)
    if clearml_tune.wanted(settings):  # a server, steps on agents: trials there too
        if apply_best:
            from housing.errors import ConfigError

            raise ConfigError(
                "tune --apply: trials run on ClearML agents (clearml.pipeline.run_locally=false)"
                "; take the best trial's params from ClearML, or tune here with run_locally=true"
            )
        remote = clearml_tune.run_remote(settings)
        _echo(
            f"tune {remote.model} on ClearML: {len(remote.trials)} trial(s) cloned from "
            f"task {remote.base_task_id}, enqueued on {remote.queue!r}"
        )
        metric = "/".join(clearml_tune.OBJECTIVE)
        for task_id, params in remote.trials.items():
            value = remote.objectives.get(task_id)
            scored = f"{metric} {value:.4f}" if value is not None else f"no {metric}"
            shown = ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items()))
            _echo(f"  {task_id}: {scored}  ({shown})")
        best = remote.best
        _echo(
            f"best: trial {best[0]}  {metric} {best[1]:.4f}"
            if best
            else f"best: none (no trial reported {metric})"
        )
        return 0
    settle_clearml(settings)  # the study is a tracked run
    result = tuning.run(settings, apply_best=apply_best)
    for line in tune_lines(result, settings.root):
        _echo(line)
    return 0


def _route_optuna_logs() -> None:
    """Optuna's records through the command's handlers, one line each (no traceback of a
    trial stopped by Ctrl-C)."""
    import logging

    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(max(logging.INFO, logging.getLogger().getEffectiveLevel()))
    for handler in logging.getLogger().handlers:
        handler.addFilter(_optuna_without_traceback)


def _optuna_without_traceback(record: Any) -> bool:
    if record.name.startswith("optuna"):
        record.exc_info, record.exc_text = None, None
    return True


def tune_lines(result: TuneResult, root: Path) -> list[str]:
    """What ``housing tune`` shows for ``result``."""
    from housing.io import relpath

    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(result.counts.items()))
    best = result.best
    params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(best.params.items()))
    defaults = ", ".join(f"{k}={_short(v)}" for k, v in sorted(result.default_params.items()))
    if len(result.default_params) < len(best.params):
        defaults = f"{defaults}, others: estimator defaults".lstrip(", ")
    lines = [
        f"study {result.study_name} ({relpath(result.storage, root)}): "
        f"{result.new_trials} new trial(s) in {result.seconds:.1f}s; {len(result.trials)} in "
        f"all ({counts})",
        f"best: trial {best.number}  cv/rmse_mean {best.value:.4f}  ({params})",
        f"default: cv/rmse_mean {result.default_value:.4f}  ({defaults}); "
        f"improvement {result.improvement:+.4f}",
    ]
    if result.importances:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(result.importances.items())[:5])
        lines.append(f"importances: {top}")
    if result.applied is not None:
        lines.append(
            f"applied: {relpath(result.applied, root)} (dvc repro retrains {result.model})"
        )
    else:
        lines.append(f"dry run: add --apply to write conf/tuned/{result.model}.yaml")
    return lines


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- pipelines


@cli.command("repro", short_help="Run what DVC says is stale, stages in warm parallel workers.")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Stages at a time (default: CPU count).",
)
@click.option("-f", "--force", is_flag=True, help="Rerun every stage (dvc repro --force).")
@_locked
@_overrides
@_leaf
def repro(options: Globals, jobs: int | None, force: bool, overrides: tuple[str, ...]) -> int:
    """dvc repro, faster: dvc.yaml's stages that DVC finds stale, run as function calls
    in pre-warmed worker processes (independent stages in parallel), each recorded in
    dvc.lock as dvc repro records it. Overrides: tracking only (tracking=, mlflow.*,
    clearml.*, notifications.*).
    """
    from housing.repro import ReproError, reproduce

    lines = {"running": "running {}", "failed": "{} failed"}

    def show(stage: str, what: str) -> None:
        if what in lines:
            _echo(lines[what].format(stage))

    result = reproduce(
        Path.cwd(),
        jobs=jobs,
        force=force,
        overrides=overrides,
        verbosity=options.verbosity,
        on_event=show,
    )
    if not result.ok:
        raise ReproError(result.error or "failed", result.exit_code or 1)
    ran, fresh = result.named("ran"), result.named("skipped")
    _echo(
        f"run {result.run_id}: {len(ran)} stage(s) run, {len(fresh)} up to date, "
        f"{result.seconds:.1f}s"
    )
    if ran:
        _echo(
            "next: housing status | housing report (reports/experiments.html) | "
            "mlflow ui --backend-store-uri sqlite:///mlflow.db"
        )
    return 0


_alias(repro, "run", "Alias of repro.")


@cli.command("pipeline", short_help="Run the pipeline DAG (housing repro, or ClearML).")
@click.option("--no-cache", is_flag=True, help="Rerun every step (dvc repro --force).")
@click.option("--max-workers", type=click.IntRange(min=1), default=None, help="Parallel steps.")
@_locked
@_overrides
@_leaf
def pipeline(
    options: Globals, no_cache: bool, max_workers: int | None, overrides: tuple[str, ...]
) -> int:
    """Run the pipeline DAG: ClearML's PipelineController with a server, else the
    local engine (housing repro, each stage a ClearML offline session).

    Without a server only tracking overrides apply (tracking=, clearml.*, ...). With
    clearml.pipeline.retrain=on_change, a run whose data is what it last trained on (the
    newest registered version, promoted or not) and does not drift trains nothing
    ("skipped: no change").
    """
    from housing.orchestration.pipeline import run_pipeline

    result = run_pipeline(
        list(overrides),
        options.config_dir,
        max_workers=max_workers,
        use_cache=False if no_cache else None,
    )
    _echo(result.summary_line())
    return 0


@cli.command("schedule", short_help="Schedule the pipeline (crontab, or a ClearML scheduler).")
@click.option("--install", is_flag=True, help="Install the schedule.")
@click.option(
    "--crontab-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A crontab file instead of `crontab`.",
)
@_overrides
@_leaf
def schedule(
    options: Globals, overrides: tuple[str, ...], install: bool, crontab_file: Path | None
) -> int:
    """Schedule the pipeline on clearml.pipeline.schedule_cron (cron or ClearML).

    Crontab line without a ClearML server, a ClearML TaskScheduler with one.
    """
    from housing.orchestration.scheduling import schedule as make_schedule
    from housing.schedule import FileCrontab

    result = make_schedule(
        _settings(overrides, options.config_dir),
        install=install,
        crontab=FileCrontab(crontab_file) if crontab_file is not None else None,
        before_exit=_show_schedule,  # registering a ClearML scheduler ends the process
        agent_args=("--install", *overrides),  # what the services agent re-runs it with
    )
    _show_schedule(result)
    return 0


def _show_schedule(result: ScheduleResult) -> None:
    for line in schedule_lines(result):
        _echo(line)


def schedule_lines(result: ScheduleResult) -> list[str]:
    """What ``housing schedule`` shows for ``result``."""
    if result.mode == "crontab":
        lines = [result.crontab_line or result.command]
    else:
        lines = [result.command]
        lines += [
            f"  add_task({', '.join(f'{k}={v!r}' for k, v in entry.items())})"
            for entry in result.entries
        ]
    lines.append(f"next runs ({result.expr}):")
    lines += [f"  {run.isoformat()}" for run in result.next_runs]
    lines.append(f"written: {result.schedule_file}")
    if result.mode == "crontab" and result.installed:
        lines.append("crontab: installed" if result.changed else "crontab: already installed")
    elif result.mode == "crontab":
        lines.append("crontab: not installed (add --install)")
    elif result.installed and result.changed:
        lines.append(
            f"ClearML scheduler {result.scheduler_task_id} -> queue {result.controller_queue}; "
            f"template {result.template_task_id}; this process ends now"
        )
    elif result.installed:
        lines.append(
            f"ClearML scheduler {result.scheduler_task_id} already runs this schedule; unchanged"
        )
    else:
        lines.append("ClearML scheduler: not registered (add --install)")
    return lines


# --------------------------------------------------------------------------- reporting

_project_option = click.option(
    "--project", default=None, help="ClearML project / MLflow experiment (default: config)."
)


@cli.command("compare", short_help="Export experiment/model comparison CSVs to metrics/.")
@_project_option
@click.option("--tag", "tags", multiple=True, help="Keep tasks with this tag (repeatable).")
@click.option("--stage", type=click.Choice(COMPARE_STAGES), default=None, help="Keep this stage.")
@click.option(
    "--last", "last_n", type=click.IntRange(min=1), default=None, help="The N newest runs."
)
@_configured
def compare(
    settings: Settings,
    project: str | None,
    tags: tuple[str, ...],
    stage: str | None,
    last_n: int | None,
) -> int:
    """Export ClearML and MLflow experiments and models to metrics/*.csv.

    Overrides are Hydra syntax, e.g.: mlflow.tracking_uri=sqlite:///other.db
    """
    from housing.reporting.compare import compare as export

    result = export(settings, project=project, tags=list(tags), stage=stage, last_n=last_n)
    _show(result.summary_lines(), lambda console: console.print(_compare_table(result)))
    for name, got in result.backends.items():
        if got.error is not None:
            _echo(f"error: {name}: {got.error}", err=True)
    return 0 if result.ok else 1


def _compare_table(result: CompareResult) -> Any:
    from rich.table import Table

    table = Table("backend", "source", "location", "tasks", "models", "result")
    for column in table.columns[3:5]:
        column.justify = "right"
    for name, got in result.backends.items():
        if got.error is not None:
            outcome = f"[red]not exported: {got.error}[/red]"
        elif got.empty:
            outcome = f"{got.nothing_found}; headers only"
        else:
            outcome = result.files(name)
            if got.skipped:
                outcome += f" ({len(got.skipped)} unreadable session(s) skipped)"
        table.add_row(
            name,
            got.source,
            got.location,
            str(len(got.experiments)),
            str(len(got.models)),
            outcome,
        )
    return table


@cli.command("report")
@_project_option
@click.option(
    "--last",
    "last_versions",
    type=click.IntRange(min=1),
    default=REPORT_VERSIONS,
    show_default=True,
    help="Versions per model to chart.",
)
@_configured
def report(settings: Settings, project: str | None, last_versions: int) -> int:
    """Write reports/experiments.html and reports/experiments.md.

    Overrides are Hydra syntax, e.g.: mlflow.tracking_uri=sqlite:///other.db
    """
    from housing.reporting.report import build_report

    result = build_report(settings, project=project, last_versions=last_versions)
    for note in result.notes:
        _echo(f"note: {note}", err=True)
    champion = (
        f"champion {result.champion}, test RMSE {result.champion_test_rmse_text}"
        if result.champion
        else "no champion evaluated yet"
    )
    _echo(
        f"wrote {result.html_path} and {result.markdown_path} "
        f"({len(result.figure_paths)} figures; {champion})"
    )
    return 0


# --------------------------------------------------------------------------- utilities


@cli.command("status", short_help="Show the last pipeline run: stages, durations, outcome.")
@_configured
def status(settings: Settings) -> int:
    """Show the last pipeline run's stages from metrics/pipeline_events.jsonl."""
    from housing.monitoring import last_run_status, render_status
    from housing.tracking.recorder import pending_sync

    events = settings.paths.metrics_dir / "pipeline_events.jsonl"
    run = last_run_status(events)
    pending = pending_sync(settings).summary()
    if run is None:
        _echo(f"no pipeline runs recorded yet in {events}")
        if pending:
            _echo(pending)
        return 0
    _show([render_status(run)], lambda console: _print_status(console, run))
    test = settings.paths.test_summary
    if test.is_file():
        from housing.io import read_record, read_scores, relpath

        meta = settings.paths.meta(settings.paths.test_metrics)
        model = read_record(meta).get("model") if meta.is_file() else None
        scores = "  ".join(f"test/{k}={v:.3f}" for k, v in sorted(read_scores(test).items()))
        where = relpath(test, settings.root)
        _echo(f"selected model: {model}  {scores}  ({where})")
    if pending:
        _echo(pending)
    return 0 if run.outcome != "failed" else 1


_STYLES = {"succeeded": "green", "ok": "green", "failed": "red", "fail": "red", "warn": "yellow"}


def _print_status(console: Console, run: RunStatus) -> None:
    from rich.table import Table

    from housing.monitoring import render_summary, status_rows

    style = _STYLES.get(run.outcome, "")
    title = f"run {run.run_id}: [{style or 'bold'}]{run.outcome.upper()}[/]"
    table = Table(
        "stage", "status", "duration", "finished_at", "error", title=title, title_justify="left"
    )
    table.columns[2].justify = "right"
    for stage, state, *cells in status_rows(run):
        styled = f"[{_STYLES[state]}]{state}[/]" if state in _STYLES else state
        table.add_row(stage, styled, *cells)
    console.print(table)
    console.print(render_summary(run), markup=False)


@cli.command("doctor", short_help="Check tracking backends, ClearML server, queues, agents.")
@_configured
def doctor(settings: Settings) -> int:
    """Check tracking backends, ClearML server, credentials, queues, agents.

    Exits 1 when a check fails.
    """
    import os

    from housing.doctor import diagnose, render
    from housing.tracking.recorder import pending_sync

    checks = diagnose(
        os.environ,
        settings.clearml,
        tracking_backends=settings.tracking,
        mlflow_uri=settings.mlflow.tracking_uri,
        config_file=os.environ.get("CLEARML_CONFIG_FILE"),
        root=settings.root,
        pending=pending_sync(settings).summary(),
        sources=settings.sources,
    )
    _show([render(checks)], lambda console: _print_checks(console, checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def _print_checks(console: Console, checks: Sequence[Check]) -> None:
    from rich.table import Table
    from rich.text import Text

    from housing.doctor import tally

    table = Table("", "check", "detail")
    for check in checks:
        detail = Text(check.detail)
        if check.next_step:
            detail.append(f"\nnext: {check.next_step}", style="dim")
        label = Text(check.status.upper(), style=_STYLES.get(check.status, ""))
        table.add_row(label, Text(check.name), detail)
    console.print(table)
    console.print(tally(checks), markup=False)


@cli.command("config", short_help="Print the validated config and where values came from.")
@_configured
def config(settings: Settings) -> int:
    """Print the composed, validated config, then (as YAML comments) the keys whose value
    came from the command line or an environment variable; the rest came from conf/.

    Precedence: a command-line override, then the trackers' standard variables
    (CLEARML_API_HOST, CLEARML_WEB_HOST, CLEARML_FILES_HOST, the api section of
    CLEARML_CONFIG_FILE, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, MLFLOW_REGISTRY_URI),
    then conf/.
    """
    import yaml

    from housing.tracking.lineage import redact

    sys.stdout.write(yaml.safe_dump(redact(dict(settings.resolved)), sort_keys=False))
    if settings.sources:
        sys.stdout.write("# from the command line or the environment (the rest from conf/):\n")
        for key, source in sorted(settings.sources.items()):
            sys.stdout.write(f"#   {key}: {source}\n")
    return 0


@cli.group(
    "clearml", cls=_OrderedGroup, short_help="ClearML utilities (sync: import offline sessions)."
)
def clearml() -> None:
    """ClearML utilities: `housing clearml sync` imports offline sessions."""


@clearml.command("sync", short_help="Import offline ClearML sessions into the server.")
@_locked
@_configured
def clearml_sync(settings: Settings) -> int:
    """Import every offline ClearML session not yet imported into the configured server."""
    from housing.tracking.offline import sync

    result = sync(settings.clearml)
    _echo(result.summary())
    return 0 if result.ok else 1


@cli.group("mlflow", cls=_OrderedGroup, short_help="MLflow utilities (sync: replay the spool).")
def mlflow_group() -> None:
    """MLflow utilities: `housing mlflow sync` replays runs spooled while the server was
    unreachable."""


@mlflow_group.command("sync", short_help="Replay spooled MLflow runs to the server.")
@_locked
@_configured
def mlflow_sync(settings: Settings) -> int:
    """Replay every run spooled while mlflow.tracking_uri was unreachable, once each."""
    from housing.tracking.mlflow_spool import sync

    result = sync(settings)
    _echo(result.summary(), err=not result.ok)
    return 0 if result.ok else 1


@cli.command("sync", short_help="Sync both trackers: ClearML sessions, MLflow spool.")
@_locked
@_configured
def sync_all(settings: Settings) -> int:
    """`housing clearml sync` then `housing mlflow sync`: one line each; non-zero if
    either failed."""
    from housing.tracking.mlflow_spool import sync as mlflow_sync_
    from housing.tracking.offline import sync as clearml_sync_

    failed = False
    try:
        report = clearml_sync_(settings.clearml)
        _echo(report.summary(), err=not report.ok)
        failed = not report.ok
    except HousingError as exc:
        _echo(f"clearml sync: {first_line(exc)}", err=True)
        failed = True
    result = mlflow_sync_(settings)
    _echo(result.summary(), err=not result.ok)
    return 1 if failed or not result.ok else 0


@cli.command("gc", short_help="Prune old MLflow runs, synced ClearML sessions, the DVC cache.")
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=None,
    help="Pipeline runs and versions per model to keep (gc.keep).",
)
@click.option(
    "--older-than",
    default=None,
    help="Only what is older than this age: 30d, 12h, 1d6h (gc.older_than).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be freed; delete nothing.")
@_locked
@_overrides
@_leaf
def gc(
    options: Globals,
    keep: int | None,
    older_than: str | None,
    dry_run: bool,
    overrides: tuple[str, ...],
) -> int:
    """Prune MLflow runs and their artifacts, ClearML offline sessions already synced, and
    the DVC cache (dvc gc --workspace); one line per store: what it freed (files, MB).

    Kept: the newest pipeline runs, the champion and the last versions of each registered
    model with the runs they come from, and anything not yet synced.
    """
    from housing.gc import collect

    given = [f"gc.keep={keep}"] if keep is not None else []
    given += [f"gc.older_than={older_than}"] if older_than is not None else []
    result = collect(_settings([*overrides, *given], options.config_dir), dry_run=dry_run)
    for line in result.lines():
        _echo(line)
    return 0


@clearml.command("import-sessions", hidden=True)
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("results", type=click.Path(dir_okay=False, path_type=Path))
@_leaf
def clearml_import_sessions(options: Globals, manifest: Path, results: Path) -> int:
    """Internal: the child process of `housing clearml sync` (imports with the SDK)."""
    from housing.tracking.offline import import_sessions

    return import_sessions(manifest, results)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``housing`` and ``scripts/*.py``; returns the process exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(
            arguments, prog_name=PROG, standalone_mode=False, obj=Globals(argv=tuple(arguments))
        )
    except click.exceptions.Abort as exc:  # click's form of Ctrl-C (or SIGTERM)
        cause = exc.__cause__
        return report_error(cause if isinstance(cause, KeyboardInterrupt) else KeyboardInterrupt())
    except click.ClickException as exc:  # usage errors: click's message, exit 2
        exc.show()
        return exc.exit_code
    except (HousingError, KeyboardInterrupt, OSError) as exc:  # OSError: a full disk
        return report_error(exc)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
