"""Pipeline monitoring: a JSONL events log, stage tracking, run status and notifications.

The events log (``metrics/pipeline_events.jsonl``) gets a ``started`` and a
``succeeded``/``failed`` line per stage, and a ``stage == "pipeline"`` summary line per
run. Appends are safe across threads, processes and concurrent runs: each line is one
``os.write`` on an ``O_APPEND`` descriptor under an exclusive ``fcntl.flock``.

Notifications go through the :class:`Notifier` protocol; a sink never lets a delivery
problem break the pipeline, and a webhook URL is never logged. Nothing happens at import.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TextIO, runtime_checkable

from housing import http
from housing.errors import ConfigError, first_line
from housing.io import DiskFullError, disk_full, is_disk_full

if TYPE_CHECKING:
    from housing.config import NotificationSettings

logger = logging.getLogger(__name__)

PIPELINE_STAGE: Final = "pipeline"
DEFAULT_WEBHOOK_ENV: Final = "HOUSING_WEBHOOK_URL"
RESERVED_FIELDS: Final = frozenset(
    {"run_id", "stage", "status", "error", "host", "pid"}
    | {"started_at", "finished_at", "duration_sec"}
)


def _triggers(status: str, kind: str) -> set[str]:
    """The notification triggers an event of ``status`` and ``kind`` (stage/pipeline) matches."""
    return {"all", kind, status, f"{status}_{kind}"}


NOTIFY_TRIGGERS: Final = frozenset[str]().union(
    *(_triggers(status, "stage") for status in ("started", "succeeded", "failed", "killed")),
    *(_triggers(status, PIPELINE_STAGE) for status in ("succeeded", "failed", "killed")),
)
_MAX_ERROR_CHARS: Final = 500


# --------------------------------------------------------------------------- helpers


def iso_time(moment: datetime | None = None) -> str:
    """``moment`` (default: now) as ISO 8601 UTC with milliseconds and a ``Z`` suffix."""
    moment = moment or datetime.now(UTC)
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


class Progress:
    """Progress lines (``<what> i/n<detail>``) for a step that runs longer than ``after``
    seconds: at most one per ``every`` seconds, and the last one always."""

    def __init__(
        self, logger: logging.Logger, what: str, total: int, after: float = 2.0, every: float = 0.0
    ) -> None:
        self.logger, self.what, self.total = logger, what, total
        self.after, self.every = after, every
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, detail: str = "") -> None:
        now = time.monotonic()
        if now - self.started <= self.after or (done < self.total and now - self.last < self.every):
            return
        self.last = now
        self.logger.info("%s %d/%d%s", self.what, done, self.total, detail)


def new_run_id() -> str:
    """Return a lexicographically time-sortable id: ``YYYYmmddTHHMMSSffffffZ-<8 hex>``."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(4)}"


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item):  # numpy scalars
        with contextlib.suppress(Exception):
            return _sanitize(item())
    if isinstance(value, datetime):
        return iso_time(value) if value.tzinfo else value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def _sanitize(value: Any) -> Any:
    """Replace non-finite floats (invalid JSON) with ``None``, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_sanitize(v) for v in value]
    return value


def _locked_append(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Append ``data`` with one ``os.write`` on an O_APPEND fd under an exclusive flock.

    Not :func:`housing.io.file_lock` (``filelock``): ~30 us a line against ~550 us. A
    newline is prepended when the file does not end with one (a writer killed mid-line).
    The line is whole or absent: when a write fails (disk full), the file is cut back to
    its previous size, still locked, and :class:`housing.io.DiskFullError` (or the
    ``OSError``) is raised.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise disk_full(path) if is_disk_full(exc) else exc from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            written = os.write(fd, data)
            while written < len(data):  # a short write (signal): finish it locked
                written += os.write(fd, data[written:])
            if fsync:
                os.fsync(fd)
        except BaseException as exc:
            os.ftruncate(fd, size)  # never leave a torn line for the next writer
            if is_disk_full(exc):
                raise disk_full(path) from None
            raise
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _unreserved(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    clash = sorted(RESERVED_FIELDS & set(fields))
    if clash:
        raise ValueError(f"extra event fields may not override reserved fields: {clash}")
    return fields


# --------------------------------------------------------------------------- events log


class EventLog:
    """Append-only JSONL events log that is safe for concurrent writers."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync

    def append(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``event`` as one line (parent dirs created lazily); return the record."""
        record = dict(event)
        text = json.dumps(
            _sanitize(record),
            ensure_ascii=False,
            separators=(",", ":"),
            default=_json_default,
            allow_nan=False,
        )
        _locked_append(self.path, (text + "\n").encode("utf-8"), fsync=self.fsync)
        return record

    def read(self) -> list[dict[str, Any]]:
        """Return all readable events (see :func:`read_events`)."""
        return read_events(self.path)


def make_event(
    run_id: str,
    stage: str,
    status: str,
    *,
    started_at: str | None,
    finished_at: str | None = None,
    duration_sec: float | None = None,
    error: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build an event record with the standard fields (plus ``host``/``pid``) and extras."""
    return {
        "run_id": run_id,
        "stage": stage,
        "status": status,
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_sec": None if duration_sec is None else round(duration_sec, 6),
        "error": error,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **_unreserved(extra or {}),
    }


@dataclass
class StageHandle:
    """Yielded by :func:`track_stage`; attach extra fields to the final event line."""

    run_id: str
    stage: str
    extra: dict[str, Any] = field(default_factory=dict)

    def update(self, fields: Mapping[str, Any]) -> None:
        """Attach fields (e.g. metrics); reserved field names raise ``ValueError``."""
        self.extra.update(_unreserved(fields))


def _safe_notify(notifier: Notifier | None, event: Mapping[str, Any]) -> None:
    if notifier is None:
        return
    try:
        notifier.notify(event)
    except Exception as exc:  # a notifier must never break a stage
        logger.warning("notifier %s failed: %s", type(notifier).__name__, type(exc).__name__)


@contextlib.contextmanager
def track_stage(
    events: EventLog,
    run_id: str,
    stage: str,
    notifier: Notifier | None = None,
) -> Iterator[StageHandle]:
    """Record ``started`` then ``succeeded``/``failed`` (re-raising) for a stage.

    Fields set on the yielded handle go on the final line; durations use a monotonic
    clock; notifier errors are logged, never raised.
    """
    if stage == PIPELINE_STAGE:
        raise ValueError(f"stage name {PIPELINE_STAGE!r} is reserved for the run summary")
    started_at = iso_time()
    t0 = time.monotonic()
    _safe_notify(
        notifier, events.append(make_event(run_id, stage, "started", started_at=started_at))
    )
    handle = StageHandle(run_id=run_id, stage=stage)

    def final(status: str, error: str | None = None) -> dict[str, Any]:
        return make_event(
            run_id,
            stage,
            status,
            started_at=started_at,
            finished_at=iso_time(),
            duration_sec=time.monotonic() - t0,
            error=error,
            extra=handle.extra,
        )

    try:
        yield handle
    except BaseException as exc:
        # Ctrl-C or SIGTERM (housing.errors.Terminated): killed, not failed
        killed = isinstance(exc, KeyboardInterrupt | SystemExit)
        # the whole message (line breaks dropped): the record is read after the fact
        message = first_line(exc, _MAX_ERROR_CHARS, typed=True, whole=True)
        failed = final("killed" if killed else "failed", message)
        try:
            events.append(failed)
        except OSError as log_exc:  # keep the original exception as the one raised
            # A full disk is the stage's own error line already; anything else is news.
            level = logging.DEBUG if isinstance(log_exc, DiskFullError) else logging.WARNING
            logger.log(level, "could not record failure of stage %r: %s", stage, log_exc)
        _safe_notify(notifier, failed)
        raise
    _safe_notify(notifier, events.append(final("succeeded")))


def record_pipeline_summary(
    events: EventLog,
    run_id: str,
    status: Literal["succeeded", "failed", "killed", "skipped"],
    duration_sec: float,
    *,
    notifier: Notifier | None = None,
    best_model: str | None = None,
    test_rmse: float | None = None,
    error: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append the run's summary line (``stage == "pipeline"``), notify, return the record."""
    record = make_event(
        run_id,
        PIPELINE_STAGE,
        status,
        started_at=None,
        finished_at=iso_time(),
        duration_sec=duration_sec,
        error=error,
        extra={"best_model": best_model, "test_rmse": test_rmse, **(extra or {})},
    )
    _safe_notify(notifier, events.append(record))
    return record


# --------------------------------------------------------------------------- reading


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Parse a JSONL events log; a missing file gives ``[]``.

    Unparseable lines (typically a truncated last line left by a killed writer) are
    skipped with a ``logging`` warning.
    """
    file = Path(path)
    try:
        lines = file.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    last_index = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    events: list[dict[str, Any]] = []
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            where = "truncated last line" if index == last_index else f"corrupt line {index + 1}"
            logger.warning("skipping %s of %s", where, file)
            continue
        if not isinstance(obj, dict):
            logger.warning("skipping non-object line %d of %s", index + 1, file)
            continue
        events.append(obj)
    return events


@dataclass(frozen=True)
class StageStatus:
    """Latest known state of one stage within a run."""

    stage: str
    status: str
    finished_at: str | None
    duration_sec: float | None
    error: str | None


@dataclass(frozen=True)
class RunStatus:
    """State of one run: its stages (first-seen order), outcome and summary line."""

    run_id: str
    stages: tuple[StageStatus, ...]
    outcome: str
    summary: dict[str, Any] | None


def last_run_status(path: str | os.PathLike[str]) -> RunStatus | None:
    """Status of the most recently *started* run in the log, or ``None`` if it is empty.

    That is the run whose first line comes last in the file: robust to interleaved
    concurrent runs and to arbitrary run ids.
    """
    events = [e for e in read_events(path) if isinstance(e.get("run_id"), str)]
    if not events:
        return None
    run_id = list(dict.fromkeys(e["run_id"] for e in events))[-1]
    stages: dict[str, StageStatus] = {}
    summary: dict[str, Any] | None = None
    for event in (e for e in events if e["run_id"] == run_id):
        stage = str(event.get("stage"))
        if stage == PIPELINE_STAGE:
            summary = event
            continue
        duration = event.get("duration_sec")
        stages[stage] = StageStatus(
            stage=stage,
            status=str(event.get("status")),
            finished_at=event.get("finished_at"),
            duration_sec=float(duration) if isinstance(duration, int | float) else None,
            error=event.get("error"),
        )
    if summary is not None:
        outcome = str(summary.get("status"))
    elif any(s.status in ("failed", "killed") for s in stages.values()):
        outcome = "failed"
    elif any(s.status == "started" for s in stages.values()):
        outcome = "running"
    else:
        outcome = "succeeded"
    return RunStatus(run_id=run_id, stages=tuple(stages.values()), outcome=outcome, summary=summary)


def _fmt_duration(value: Any) -> str:
    return f"{float(value):.2f}s" if isinstance(value, int | float) else "-"


def status_rows(status: RunStatus) -> list[tuple[str, str, str, str, str]]:
    """(stage, status, duration, finished_at, error) per stage, as ``housing status`` shows
    them (plain or as a table)."""
    return [
        (s.stage, s.status, _fmt_duration(s.duration_sec), s.finished_at or "-", s.error or "")
        for s in status.stages
    ]


def render_status(status: RunStatus) -> str:
    """Human-readable multi-line report for ``housing status``."""
    lines = [f"run {status.run_id}: {status.outcome.upper()}"]
    if status.stages:
        width = max(len("stage"), *(len(s.stage) for s in status.stages))
        lines.append(f"  {'stage':<{width}}  {'status':<9}  {'duration':>9}  finished_at")
        for stage, state, duration, finished_at, error in status_rows(status):
            row = f"  {stage:<{width}}  {state:<9}  {duration:>9}  {finished_at}"
            lines.append(row + (f"  error: {error}" if error else ""))
    else:
        lines.append("  (no stage events)")
    lines.append(render_summary(status))
    return "\n".join(lines)


def render_summary(status: RunStatus) -> str:
    """The ``summary: ...`` line of :func:`render_status` (the run's pipeline summary)."""
    summary = status.summary
    if summary is None:
        return "summary: none (run in progress, interrupted, or stages run separately)"
    rmse = summary.get("test_rmse")
    rmse_text = f"{rmse:.4f}" if isinstance(rmse, int | float) else "-"
    text = (
        f"summary: status={summary.get('status')}"
        f" duration={_fmt_duration(summary.get('duration_sec'))}"
        f" best_model={summary.get('best_model') or '-'} test_rmse={rmse_text}"
    )
    return text + (f" error: {summary['error']}" if summary.get("error") else "")


# --------------------------------------------------------------------------- notifiers


@runtime_checkable
class Notifier(Protocol):
    """A notification sink."""

    def notify(self, event: Mapping[str, Any]) -> None:
        """Deliver one event; implementations should not raise."""


def format_event(event: Mapping[str, Any]) -> str:
    """One-line human-readable description of an event."""
    pipeline = event.get("stage") == PIPELINE_STAGE
    what = "pipeline" if pipeline else f"stage {event.get('stage')}"
    status = str(event.get("status", "?")).upper()
    parts = [f"[housing] {what} {status} run={event.get('run_id')}"]
    if pipeline or event.get("duration_sec") is not None:
        parts.append(f"duration={_fmt_duration(event.get('duration_sec'))}")
    if pipeline and event.get("best_model") is not None:
        parts.append(f"best_model={event['best_model']}")
    rmse = event.get("test_rmse")
    if pipeline and isinstance(rmse, int | float):
        parts.append(f"test_rmse={rmse:.4f}")
    parts += [f"{key}={event[key]}" for key in ("host", "drifting", "error") if event.get(key)]
    return " ".join(" ".join(parts).split())


class ConsoleNotifier:
    """Write one line per event to a stream (``sys.stderr`` at call time by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def notify(self, event: Mapping[str, Any]) -> None:
        """Print the event line; stream errors are logged, not raised."""
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            stream.write(format_event(event) + "\n")
            stream.flush()
        except (OSError, ValueError) as exc:
            logger.warning("console notification failed: %s", type(exc).__name__)


class FileNotifier:
    """Append ``<timestamp> <event line>`` to a text log using a locked append."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def notify(self, event: Mapping[str, Any]) -> None:
        """Append the event line (parent dir created lazily); errors are logged."""
        stamp = event.get("finished_at") or event.get("started_at") or iso_time()
        try:
            _locked_append(self.path, f"{stamp} {format_event(event)}\n".encode())
        except OSError as exc:
            logger.warning("file notification to %s failed: %s", self.path, exc)


def redact_url(url: str) -> str:
    """Return only ``scheme://host[:port]`` of a URL (the path/query may hold a token)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<redacted-url>"
    if not parts.scheme or not host:
        return "<redacted-url>"
    return f"{parts.scheme}://{host}{port}/<redacted>"


def _scrub(text: str, url: str) -> str:
    """Remove the URL and its secret-bearing pieces from ``text``."""
    pieces = [url]
    with contextlib.suppress(ValueError):
        parts = urllib.parse.urlsplit(url)
        pieces += [parts.path, parts.query, parts.netloc if "@" in parts.netloc else ""]
        pieces += [p for p in re.split(r"[/?&=@:]", parts.path + "/" + parts.query) if len(p) > 5]
    for secret in sorted({s for s in pieces if s and s != "/"}, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return text


_URLLIB3_LOGGERS: Final = ("connectionpool", "connection", "poolmanager", "response", "util.retry")


@contextlib.contextmanager
def _urllib3_logs_scrubbed(url: str) -> Iterator[None]:
    """urllib3 logs request paths (retries at WARNING): scrub ``url`` out of its records."""

    def scrub(record: logging.LogRecord) -> bool:
        record.msg, record.args = _scrub(record.getMessage(), url), None
        return True

    loggers = [logging.getLogger(f"urllib3.{name}") for name in _URLLIB3_LOGGERS]
    for each in loggers:
        each.addFilter(scrub)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(scrub)


class WebhookNotifier:
    """POST ``{"text": ...}`` (Slack-compatible) to the URL held by an environment variable.

    urllib3's ``Retry`` retries timeouts, connection errors and HTTP 5xx/408/429 up to
    ``retries`` times with exponential backoff (at most 5 s a pause, ``Retry-After``
    ignored); other 4xx are not retried. Never raises; of the URL only its host is ever
    logged. ``trust_env=False`` ignores the proxy variables and ~/.netrc.
    """

    def __init__(
        self,
        url_env: str = DEFAULT_WEBHOOK_ENV,
        *,
        env: Mapping[str, str] | None = None,
        timeout_sec: float = 3.0,
        retries: int = 2,
        backoff_sec: float = 0.5,
        trust_env: bool = True,
    ) -> None:
        url = (os.environ if env is None else env).get(url_env, "").strip()
        if url and urllib.parse.urlsplit(url).scheme not in {"http", "https"}:
            raise ValueError(f"environment variable {url_env} must hold an http(s) URL")
        self.url_env = url_env
        self._url = url or None
        self.timeout_sec = timeout_sec
        self.retries = retries
        self.backoff_sec = backoff_sec
        self.trust_env = trust_env
        self.last_attempts = 0

    @property
    def enabled(self) -> bool:
        """True when the env variable held a URL."""
        return self._url is not None

    @property
    def target(self) -> str:
        """Redacted destination, safe to log."""
        return redact_url(self._url) if self._url else f"<unset ${self.url_env}>"

    def notify(self, event: Mapping[str, Any]) -> None:
        """Send the event; failures are logged as warnings."""
        try:
            self.send(event)
        except Exception as exc:  # belt and braces: never raise from a notifier
            logger.warning("webhook %s: unexpected %s", self.target, type(exc).__name__)

    def send(self, event: Mapping[str, Any]) -> bool:
        """Deliver the event; return True on a 2xx response (after retries if needed)."""
        import requests

        self.last_attempts = 0
        if self._url is None:
            logger.debug("webhook disabled: $%s is not set", self.url_env)
            return False
        session = http.session(
            trust_env=self.trust_env,
            total=self.retries,
            backoff_factor=self.backoff_sec,
            backoff_max=5.0,
            status_forcelist=(408, 429, *range(500, 600)),
            allowed_methods=None,  # POST too
            raise_on_status=False,
            respect_retry_after_header=False,
        )
        body = {"text": format_event(event)}
        try:
            with (
                _urllib3_logs_scrubbed(self._url),
                session,
                session.post(
                    self._url,
                    json=body,
                    headers={"User-Agent": "housing-monitoring"},
                    timeout=self.timeout_sec,
                    stream=True,
                ) as response,
            ):
                retried = response.raw.retries
                self.last_attempts = len(retried.history) + 1 if retried else 1
                if response.ok:
                    return True
                reason = f"HTTP {response.status_code}"
        except requests.RequestException as exc:  # every such failure was retried
            self.last_attempts = self.retries + 1
            cause = http.root_cause(exc)
            reason = f"connection error: {cause}"
            if isinstance(cause, TimeoutError):
                reason = f"timed out after {self.timeout_sec:g}s"
        logger.warning(
            "webhook notification to %s failed after %d attempt(s): %s",
            self.target,
            self.last_attempts,
            _scrub(reason, self._url),
        )
        return False


class Notifiers:
    """Fan an event out to ``sinks`` when it matches one of ``on`` (see ``NOTIFY_TRIGGERS``)."""

    def __init__(self, sinks: Sequence[Notifier], on: Sequence[str] = ("failed", "pipeline")):
        self.sinks: tuple[Notifier, ...] = tuple(sinks)
        self.on = frozenset(on)

    def notify(self, event: Mapping[str, Any]) -> None:
        """Notify every sink of a matching event; one failing sink does not stop the others."""
        kind = PIPELINE_STAGE if event.get("stage") == PIPELINE_STAGE else "stage"
        if self.on & _triggers(str(event.get("status")), kind):
            for sink in self.sinks:
                _safe_notify(sink, event)


def build_notifiers(
    settings: NotificationSettings, env: Mapping[str, str] | None = None
) -> Notifiers:
    """The notifier ``settings`` (the validated ``notifications:`` section) describe.

    A configured webhook whose env variable is unset is skipped with a warning; one that
    holds no http(s) URL is a :class:`~housing.errors.ConfigError`.
    """
    sinks: list[Notifier] = [ConsoleNotifier()] if settings.console else []
    if settings.file is not None:
        sinks.append(FileNotifier(settings.file))
    hook = settings.webhook
    if hook is not None:
        try:
            webhook = WebhookNotifier(
                hook.url_env,
                env=env,
                timeout_sec=hook.timeout_sec,
                retries=hook.retries,
                backoff_sec=hook.backoff_sec,
            )
        except ValueError as exc:
            raise ConfigError(f"notifications.webhook.url_env: {exc}") from None
        if webhook.enabled:
            sinks.append(webhook)
        else:
            logger.warning("webhook notifications disabled: $%s is not set", hook.url_env)
    return Notifiers(sinks, settings.on)
