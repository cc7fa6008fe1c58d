"""A real ``mlflow server`` on 127.0.0.1 for the integration tests (session-scoped)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_START_TIMEOUT_SEC = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's whole process group (uvicorn worker included)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # stragglers once the leader is gone
        os.killpg(proc.pid, signal.SIGKILL)


def start_server(base: Path, port: int, *, wait: bool = True) -> subprocess.Popen[bytes]:
    """Start ``mlflow server`` on 127.0.0.1:``port`` (sqlite backend and proxied artifacts
    in ``base``, reused by a restart); return once it is healthy (``wait``, else at once:
    then :func:`wait_healthy`)."""
    executable = Path(sys.executable).parent / "mlflow"
    if not executable.exists():
        pytest.skip(f"mlflow CLI not found next to {sys.executable}")
    base.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # No background job runner (a pool of huey consumer processes, unused here): it
    # slows start and stop a lot on a 2-core machine.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log_path = base / "server.log"
    with log_path.open("ab") as server_log:
        proc = subprocess.Popen(
            [
                str(executable),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                f"sqlite:///{base / 'srv.db'}",
                "--artifacts-destination",
                str(base / "artifacts"),
                "--workers",
                "1",
            ],
            cwd=base,
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    if wait:
        wait_healthy(proc, base, port)
    return proc


def wait_healthy(proc: subprocess.Popen[bytes], base: Path, port: int) -> None:
    """Wait until the server started by :func:`start_server` answers ``/health``."""
    uri = f"http://127.0.0.1:{port}"
    log_path = base / "server.log"
    started = time.monotonic()
    while not _healthy(uri):
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{tail}")
        if time.monotonic() - started > SERVER_START_TIMEOUT_SEC:
            stop(proc)
            tail = log_path.read_text(errors="replace")[-2000:]
            pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_SEC}s:\n{tail}")
        time.sleep(0.25)
    sys.stderr.write(f"\nmlflow server healthy after {time.monotonic() - started:.1f}s\n")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``mlflow server`` (sqlite backend, proxied artifacts); yield its http URI."""
    port = free_port()
    proc = start_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stopping = time.monotonic()
        stop(proc)
        sys.stderr.write(f"\nmlflow server stopped in {time.monotonic() - stopping:.1f}s\n")
