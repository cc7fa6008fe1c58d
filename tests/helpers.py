"""Test helpers: the whole pipeline in this process, with Hydra overrides.

``housing repro`` runs ``dvc.yaml`` as it is; tests that need a pipeline run with
other candidates, data or stores call :func:`run_all` instead: the same stage
functions and trackers, one pipeline run, no DVC.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from housing import runs
from housing.config import ClearMLSettings, Settings, load_settings
from housing.entry import settle_clearml as settle_stage_env
from housing.entry import settle_environment
from housing.runner import execute_stage
from housing.schedule import CrontabIO, install_line, install_schedule
from housing.tracking.clearml import ClearMLTracker, sdk_env
from housing.tracking.offline import OfflineSession, read_events


@contextlib.contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port in a thread; yields its ``http://`` URL.
    A handler blocked in a request does not hold up the shutdown (daemon threads)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def settle_clearml(settings: ClearMLSettings, mp: Any = None) -> dict[str, str | None]:
    """Settle the ``CLEARML_*`` variables for trackers with ``settings`` in this test's
    process, as a stage process does at its start-up (conftest puts them back after the
    test; ``mp``, a pytest MonkeyPatch or its context, undoes them sooner)."""
    env = sdk_env(settings, os.environ)
    if mp is None:
        settle_environment(env)
        return env
    for key, value in env.items():
        if value is None:
            mp.delenv(key, raising=False)
        else:
            mp.setenv(key, value)
    return env


def run_all(overrides: Sequence[str] = (), config_dir: Path | None = None) -> dict[str, Any]:
    """prepare -> train every candidate -> select_best -> evaluate, in this process (its
    ClearML variables settled first, as a stage process's start-up settles them)."""
    settings = load_settings(overrides, config_dir=config_dir)
    context = runs.current()
    with clearml_settled(settings):
        results = {"prepare": execute_stage("prepare", settings, context=context)}
        for name in settings.selection.candidates:
            model_settings = load_settings([*overrides, f"model={name}"], config_dir=config_dir)
            results[f"train_{name}"] = execute_stage("train", model_settings, context=context)
        results["select_best"] = execute_stage("select_best", settings, context=context)
        results["evaluate"] = execute_stage("evaluate", settings, context=context)
    return results


@contextlib.contextmanager
def clearml_settled(settings: Settings) -> Iterator[None]:
    """ClearML's variables settled for ``settings`` (as a stage process's start-up), put
    back after: a module-scoped fixture runs outside conftest's per-test restore."""
    before = {k: v for k, v in os.environ.items() if k.startswith(("CLEARML_", "TRAINS_"))}
    settle_stage_env(settings)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith(("CLEARML_", "TRAINS_"))]:
            os.environ.pop(key)
        os.environ.update(before)


def run_tool(
    tool: str,
    repo: Path,
    *args: str,
    unset: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run a venv tool (``dvc``, ``housing``) in ``repo`` with the venv on PATH."""
    full = dict(os.environ)
    full["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full['PATH']}"
    full["HOUSING_CONFIG_DIR"] = str(repo / "conf")
    full.update(env or {})
    for name in (*unset, "HOUSING_RUN_ID", "HOUSING_RUN_OWNER_PID"):
        if name not in (env or {}):
            full.pop(name, None)
    return subprocess.run(
        [str(Path(sys.executable).parent / tool), *args],
        cwd=repo,
        env=full,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def ran_stages(dvc_output: str) -> list[str]:
    """The stages ``dvc repro`` says it ran, in order."""
    return [
        line.split("'")[1] for line in dvc_output.splitlines() if line.startswith("Running stage")
    ]


class WarningLines(logging.Handler):
    """Collects the messages of WARNING and worse records (attach to a logger)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def find_line(crontab_text: str, marker: str) -> str | None:
    """The first crontab line tagged ``# housing:<marker>``, if any."""
    for line in crontab_text.splitlines():
        if line.strip() and install_line(line + "\n", None, marker) == "":
            return line
    return None


def uninstall_schedule(io: CrontabIO, marker: str) -> bool:
    """Remove the marker's line(s); write only if changed. Returns ``changed``."""
    return install_schedule(io, None, marker)


def read_log(session: OfflineSession) -> list[str]:
    """The console/text messages of an offline session (``report_text``, captured output)."""
    events = read_events(session, "log.jsonl")
    return [str(e.get("msg", "")) for e in events if e.get("type") == "log"]


def offline_folder(tracker: ClearMLTracker) -> Path | None:
    """The session folder of a tracker's open offline task (``None`` otherwise)."""
    if tracker.task is None or not tracker.offline:
        return None
    return Path(str(tracker.task.get_offline_mode_folder()))


#: Prefixes of the variables a test project runs without (the caller's trackers).
TRACKER_VARS = ("CLEARML_", "TRAINS_", "MLFLOW_")


@contextlib.contextmanager
def in_project(root: Path, mp: Any, prefixes: Sequence[str] = TRACKER_VARS) -> Iterator[Path]:
    """Run in ``root`` without the variables named by ``prefixes`` (``mp``: a pytest
    MonkeyPatch, which undoes both); the root logger, which a CLI call reconfigures, is
    put back after."""
    mp.chdir(root)
    for key in [k for k in os.environ if k.startswith(tuple(prefixes))]:
        mp.delenv(key)
    logger = logging.getLogger()
    handlers, level = list(logger.handlers), logger.level
    try:
        yield root
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
