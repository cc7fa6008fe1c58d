"""One run at a time per checkout: the run lock of every command that writes outputs.

A command that writes pipeline outputs or tracker stores holds the checkout's run lock
for as long as it runs. ``.housing/run.lock`` (:func:`housing.io.file_lock`) makes taking
it atomic; ``.housing/run.json`` records the holder: its command line, pid, process
start time (a reused pid has another), host and when it took the lock. A second command
is refused at once, naming the holder, or waits for it (``wait``). A record whose holder
is gone (pid ended, or reused by another process) is taken over.

The holder's children run for it: the entry point exports :data:`HOLDER_ENV` (the
holder's identity) at start-up, so a stage that ``housing repro`` or ``dvc repro``
started from it, or a stage server's child serving such a stage, is let through while
that holder holds the lock. Nothing here prints: lines for the user go to ``say``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from housing.errors import HousingError
from housing.io import file_lock, write_json
from housing.runs import is_alive, process_started

LOCK_DIR: Final = ".housing"
LOCK_FILE: Final = "run.lock"
RECORD_FILE: Final = "run.json"
#: The holder's identity (``pid:start time``), inherited by the processes it starts.
HOLDER_ENV: Final = "HOUSING_RUN_LOCK_HOLDER"
#: How often a waiting command tries again, in seconds.
POLL_SECONDS: Final = 0.2
#: How long a refused command waits for the holder's record (written just after the lock).
RECORD_GRACE_SECONDS: Final = 1.0


class RunLockError(HousingError):
    """Another command holds this checkout's run lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) the run lock."""

    command: str
    pid: int
    started: float  # the process's start time (seconds since the epoch)
    host: str
    locked_at: str  # when it took the lock (UTC, ISO 8601)

    @classmethod
    def this_process(cls, command: str) -> Holder:
        """The record for the calling process running ``command``."""
        pid = os.getpid()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(command, pid, process_started(pid) or 0.0, socket.gethostname(), now)

    @property
    def token(self) -> str:
        """The identity children inherit (:data:`HOLDER_ENV`)."""
        return f"{self.pid}:{self.started:.3f}"

    def alive(self) -> bool:
        """Whether the recorded process still runs (one on another host is assumed to)."""
        return is_alive(self.pid, self.started, self.host)

    def describe(self) -> str:
        """``housing repro`` (pid 123, started 2026-12-03 14:50:01 UTC on host)."""
        when = datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"`{self.command}` (pid {self.pid}, started {when} on {self.host})"


def lock_dir(root: Path) -> Path:
    """The folder of ``root``'s run lock and its record."""
    return root / LOCK_DIR


def read_holder(root: Path) -> Holder | None:
    """The recorded holder of ``root``'s run lock; None when there is no readable record."""
    try:
        data = json.loads((lock_dir(root) / RECORD_FILE).read_text(encoding="utf-8"))
        return Holder(
            command=str(data["command"]),
            pid=int(data["pid"]),
            started=float(data["started"]),
            host=str(data["host"]),
            locked_at=str(data["locked_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def run_lock(
    root: Path,
    command: str,
    *,
    wait: bool = False,
    environ: Mapping[str, str] | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> Iterator[Holder | None]:
    """Hold ``root``'s run lock for the block; yields this process's record, or None when
    the process runs for the holder (``environ[HOLDER_ENV]`` names the live holder).

    Held by a live process: :class:`RunLockError` naming it, or with ``wait`` one ``say``
    line and a wait until it is free. A record left by a process that is gone is taken
    over with one ``say`` line. The record is removed when the block ends.
    """
    folder = lock_dir(root)
    inherited = (os.environ if environ is None else environ).get(HOLDER_ENV)
    if inherited:
        holder = read_holder(root)
        if holder is not None and holder.token == inherited and holder.alive():
            yield None
            return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise RunLockError(f"{folder}: cannot write the run lock here; run in a writable checkout")
    me = Holder.this_process(command)
    deadline = time.monotonic() + RECORD_GRACE_SECONDS
    announced = False
    while True:
        with file_lock(folder / LOCK_FILE, blocking=False) as held:
            blocker = read_holder(root)
            if held and (blocker is None or not blocker.alive()):
                if blocker is not None:
                    say(
                        f"run lock: taking over {folder / RECORD_FILE} from "
                        f"{blocker.describe()}, which is no longer running"
                    )
                write_json(folder / RECORD_FILE, asdict(me))
                try:
                    yield me
                finally:
                    (folder / RECORD_FILE).unlink(missing_ok=True)
                return
        if wait:
            if not announced and blocker is not None:
                say(f"waiting for {blocker.describe()} to finish (run lock {folder / LOCK_FILE})")
                announced = True
        elif blocker is not None or time.monotonic() > deadline:
            who = blocker.describe() if blocker is not None else "another command"
            raise RunLockError(
                f"{folder / LOCK_FILE}: {who} is running in this checkout; "
                "wait for it with --wait (or HOUSING_WAIT=1)"
            )
        time.sleep(POLL_SECONDS)
