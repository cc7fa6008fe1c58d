"""A warm process that runs plain ``dvc repro``'s stage commands without their imports.

``dvc repro`` starts one ``python scripts/<stage>.py`` per stage, and each one used to
spend seconds importing scikit-learn, pandas, MLflow and ClearML. The scripts now call
:func:`main`, a client that asks a *stage server* to fork a warm child for the command:
the child gets the client's arguments, environment, working directory and standard
streams (the file descriptors themselves, passed over a Unix socket), runs the stage
exactly as the script would, and the client exits with the child's exit code. Ctrl-C
and SIGTERM reaching the client are forwarded to the child; a client that disappears
takes its child with it.

- **One server per code, config and place:** the socket's name is a hash of the
  interpreter and its installed packages, the ``housing`` package files, ``conf/``, the
  working directory and the ``CLEARML_*``/``MLFLOW_*``/``PYTHONPATH`` environment
  (:func:`server_key`). Edit the code or the config and the next stage starts a new
  server; the old one exits when idle.
- The first stage starts the server (``python -m housing.stage_server``), which imports
  what ``housing repro``'s fork server imports (:data:`housing.repro.PRELOAD_MODULES`,
  the same warm-up) and exits after :data:`IDLE_SECONDS` without a request.
- The child runs under the client's pipeline-run identity (:mod:`housing.runs`), which
  the client works out from its own process tree and passes along.
- ``HOUSING_STAGE_SERVER=0`` (or a platform without descriptor passing) runs the stage
  in the script's own process, as before.

Written here because no kept library forks a warm interpreter for another process's
command with descriptor passing (``multiprocessing``'s fork server serves only the
process that started it, and dies with it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

#: ``HOUSING_STAGE_SERVER=0`` runs stages in the script's own process.
SWITCH_ENV: Final = "HOUSING_STAGE_SERVER"
#: Seconds an idle server waits for the next stage (``HOUSING_STAGE_SERVER_IDLE``).
IDLE_SECONDS: Final = 60.0
#: Seconds a client waits for a new server to import everything and listen.
START_TIMEOUT: Final = 120.0
_KEY_ENV_PREFIXES: Final = ("CLEARML_", "TRAINS_", "MLFLOW_", "HOUSING_CONFIG_DIR", "PYTHONPATH")
_RC: Final = struct.Struct("!i")
_LENGTH: Final = struct.Struct("!I")


def _tree_stats(root: Path) -> Iterator[str]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            stat = Path(folder, name).stat()
            yield f"{folder}/{name}:{stat.st_mtime_ns}:{stat.st_size}"


def server_key(cwd: Path, env: Mapping[str, str]) -> str:
    """What a warm server depends on: interpreter, package code, config, place, env."""
    import sysconfig

    import housing

    digest = hashlib.sha256()
    site = Path(sysconfig.get_paths()["purelib"])  # its mtime moves when packages change
    parts = [sys.executable, sys.version, str(cwd), f"{site}:{site.stat().st_mtime_ns}"]
    parts += [f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(_KEY_ENV_PREFIXES)]
    for package_dir in housing.__path__:
        parts += _tree_stats(Path(package_dir))
    parts += _tree_stats(cwd / "conf")
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:24]


def socket_dir() -> Path:
    """A private directory (0700) of this user for the servers' sockets."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 60:  # a Unix socket path is limited to ~107 bytes
        base = Path("/tmp")
    return base / f"housing-stage-server-{os.getuid()}"


def _private_dir() -> Path | None:
    folder = socket_dir()
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    stat = folder.lstat()
    if not folder.is_dir() or stat.st_uid != os.getuid() or stat.st_mode & 0o077:
        return None  # not ours, or readable by others: do not trust it
    return folder


# ---------------------------------------------------------------------- client


def main(args: Sequence[str]) -> int:
    """Run ``housing <args>`` in a warm stage server; in this process if none can be used
    (no server could be reached before the request was sent)."""
    code = None
    if os.environ.get(SWITCH_ENV, "1").lower() not in ("0", "off", "false", "no"):
        with contextlib.suppress(OSError):
            code = _run_remote(list(args))
    if code is None:
        from housing.cli import main as cli_main

        code = cli_main(list(args))
    return code


def _run_remote(args: list[str]) -> int | None:
    if not hasattr(socket, "send_fds"):
        return None
    folder = _private_dir()
    if folder is None:
        return None
    cwd = Path.cwd()
    env = dict(os.environ)
    path = folder / f"{server_key(cwd, env)}.sock"
    conn = _connect(path) or _start_server(path, cwd, env)
    if conn is None:
        return None
    from housing import runs

    env[runs.CONTEXT_ENV] = runs.current().to_json()
    with conn:
        _send_request(conn, {"args": args, "cwd": str(cwd), "env": env})
        try:  # from here on the stage may have run: never fall back to running it again
            with _forwarding_signals(conn):
                reply = _recv_exact(conn, _RC.size)
        except OSError:
            reply = None
    if reply is None:
        sys.stderr.write("error: the stage process ended without an exit code\n")
        return 1
    return int(_RC.unpack(reply)[0])


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _start_server(path: Path, cwd: Path, env: Mapping[str, str]) -> socket.socket | None:
    """Start a server for ``path`` (one starter at a time) and connect once it listens."""
    from housing.io import file_lock

    with file_lock(path.with_suffix(".lock")):
        conn = _connect(path)
        if conn is not None:
            return conn
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead server's socket
        _forget_old_servers(path.parent)
        with path.with_suffix(".log").open("ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "housing.stage_server", str(path)],
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and server.poll() is None:
            conn = _connect(path)
            if conn is not None:
                return conn
            time.sleep(0.05)
    return None


def _forget_old_servers(folder: Path, days: float = 7.0) -> None:
    """Remove the lock and log files of servers gone (no socket) for ``days``."""
    cutoff = time.time() - days * 86400
    for leftover in [*folder.glob("*.lock"), *folder.glob("*.log")]:
        with contextlib.suppress(OSError):
            if not leftover.with_suffix(".sock").exists() and leftover.stat().st_mtime < cutoff:
                leftover.unlink()


def _send_request(conn: socket.socket, request: Mapping[str, object]) -> None:
    payload = json.dumps(request).encode("utf-8", "surrogateescape")
    data = _LENGTH.pack(len(payload)) + payload
    sent = socket.send_fds(conn, [data], [0, 1, 2])
    conn.sendall(data[sent:])


@contextlib.contextmanager
def _forwarding_signals(conn: socket.socket) -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP of this process go to the child as one byte each
    (a signal this process ignores, as under ``nohup`` or ``&``, stays ignored)."""

    from housing.runner import handling_signals

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            conn.send(bytes([signum]))

    with handling_signals((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), forward):
        yield


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# ---------------------------------------------------------------------- server


def serve(path: Path, idle: float) -> None:
    """Warm up, then fork a child per request until ``idle`` seconds pass without one."""
    _warm_up()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    listener.settimeout(min(idle, 5.0))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    children: set[int] = set()
    last = time.monotonic()
    try:
        while children or time.monotonic() - last < idle:
            if children:  # idle time counts from the last stage's end
                children = {pid for pid in children if _alive(pid)}
                last = time.monotonic()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            last = time.monotonic()
            pid = os.fork()
            if pid == 0:
                listener.close()
                _child(conn)  # never returns
            conn.close()
            children.add(pid)
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _warm_up() -> None:
    from housing.config import load_settings
    from housing.entry import configure_logging
    from housing.errors import HousingError
    from housing.repro import preload

    configure_logging(0)
    try:
        settings = load_settings(root=Path.cwd())
    except HousingError:
        settings = None  # the stages will say what is wrong
    preload(settings)


def _child(conn: socket.socket) -> None:
    """Become the client's stage process: its streams, place, environment and args."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        request = _recv_request(conn)
        os.chdir(request["cwd"])
        from housing.entry import adopt_environment

        adopt_environment(request["env"])  # this process's start-up: the client's env
        sys.stdout.reconfigure(line_buffering=os.isatty(1))  # type: ignore[union-attr]
        threading.Thread(target=_watch_client, args=(conn,), daemon=True).start()
        from housing.cli import main as cli_main

        code = cli_main(request["args"])
    except BaseException:  # the client must get an exit code whatever happens
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.sendall(_RC.pack(code))
        os._exit(code)


def _recv_request(conn: socket.socket) -> dict[str, Any]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    (length,) = _LENGTH.unpack(data[: _LENGTH.size])
    payload = data[_LENGTH.size :]
    rest = _recv_exact(conn, length - len(payload)) if len(payload) < length else b""
    request: dict[str, Any] = json.loads((payload + (rest or b"")).decode())
    return request


def _watch_client(conn: socket.socket) -> None:
    """Forwarded signals are raised here; a client gone means SIGTERM."""
    while True:
        try:
            data = conn.recv(1)
        except OSError:
            data = b""
        os.kill(os.getpid(), data[0] if data else signal.SIGTERM)
        if not data:
            return


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(os.environ.get("HOUSING_STAGE_SERVER_IDLE", IDLE_SECONDS)))
