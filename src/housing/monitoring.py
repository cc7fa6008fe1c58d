"""Pipeline monitoring: a JSONL events log, stage tracking, run status and notifications.

The events log (conventionally ``metrics/pipeline_events.jsonl``) receives one JSON object
per line: a ``started`` line and a ``succeeded``/``failed`` line per stage, plus a summary
line with ``stage == "pipeline"`` per run.  Appends are safe across threads, processes and
concurrent runs: every line is written with a single ``os.write`` on an ``O_APPEND``
descriptor while holding an exclusive ``fcntl.flock`` on the file.

Notifications go through the tiny :class:`Notifier` protocol; sinks never let a delivery
problem break the pipeline.  Nothing happens at import time.
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
from housing.errors import ConfigError

if TYPE_CHECKING:
    from housing.config import NotificationSettings

__all__ = [
    "DEFAULT_NOTIFY_ON",
    "DEFAULT_WEBHOOK_ENV",
    "NOTIFY_TRIGGERS",
    "RESERVED_FIELDS",
    "ConsoleNotifier",
    "EventLog",
    "FileNotifier",
    "FilteredNotifier",
    "MultiNotifier",
    "Notifier",
    "RunStatus",
    "StageHandle",
    "StageStatus",
    "WebhookNotifier",
    "build_notifiers",
    "event_triggers",
    "format_event",
    "last_run_status",
    "make_event",
    "new_run_id",
    "one_line_error",
    "pipeline_summary",
    "read_events",
    "record_pipeline_summary",
    "redact_url",
    "render_status",
    "render_summary",
    "track_stage",
]

logger = logging.getLogger(__name__)

Status = Literal["started", "succeeded", "failed"]
PIPELINE_STAGE: Final = "pipeline"
DEFAULT_WEBHOOK_ENV: Final = "HOUSING_WEBHOOK_URL"
DEFAULT_NOTIFY_ON: Final[tuple[str, ...]] = ("failed", "pipeline")
RESERVED_FIELDS: Final = frozenset(
    {
        "run_id",
        "stage",
        "status",
        "started_at",
        "finished_at",
        "duration_sec",
        "error",
        "host",
        "pid",
    }
)
NOTIFY_TRIGGERS: Final = frozenset(
    {
        "all",
        "stage",
        "pipeline",
        "started",
        "succeeded",
        "failed",
        "started_stage",
        "succeeded_stage",
        "failed_stage",
        "succeeded_pipeline",
        "failed_pipeline",
    }
)
_MAX_ERROR_CHARS: Final = 500


# --------------------------------------------------------------------------- helpers


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    """ISO 8601 in UTC with millisecond precision and a ``Z`` suffix."""
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


def new_run_id() -> str:
    """Return a lexicographically time-sortable id: ``YYYYmmddTHHMMSSffffffZ-<8 hex>``."""
    return f"{_utc_now():%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(4)}"


def one_line_error(exc: BaseException) -> str:
    """Render an exception as ``Type: message`` on one line, truncated to 500 chars."""
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)
    if callable(item):  # numpy scalars
        with contextlib.suppress(Exception):
            return _sanitize(item())
    if isinstance(value, datetime):
        return _iso(value) if value.tzinfo else value.isoformat()
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


def _encode_line(record: Mapping[str, Any]) -> bytes:
    text = json.dumps(
        _sanitize(record),
        ensure_ascii=False,
        separators=(",", ":"),
        default=_json_default,
        allow_nan=False,
    )
    return (text + "\n").encode("utf-8")


def _locked_append(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Append ``data`` under an exclusive flock with one ``os.write`` on an O_APPEND fd.

    Not :func:`housing.io.file_lock`: measured, this costs ~30 us a line against ~550 us
    for ``filelock`` plus an append, and the log is written by every stage event.

    If the file does not end with a newline (a writer died mid-line), a newline is
    prepended so the new record is not glued onto the broken one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            written = os.write(fd, data)
            # Regular files virtually never short-write; if they do (disk full, signal),
            # finish under the same lock so the line still cannot interleave.
            while written < len(data):
                written += os.write(fd, data[written:])
            if fsync:
                os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- events log


class EventLog:
    """Append-only JSONL events log that is safe for concurrent writers."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"EventLog({str(self.path)!r}, fsync={self.fsync})"

    def append(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``event`` as one line (parent dirs created lazily); return the record."""
        record = dict(event)
        _locked_append(self.path, _encode_line(record), fsync=self.fsync)
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
    record: dict[str, Any] = {
        "run_id": run_id,
        "stage": stage,
        "status": status,
        "started_at": started_at,
        "finished_at": finished_at,
        "duration_sec": None if duration_sec is None else round(duration_sec, 6),
        "error": error,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if extra:
        clash = sorted(RESERVED_FIELDS & set(extra))
        if clash:
            raise ValueError(f"extra event fields may not override reserved fields: {clash}")
        record.update(extra)
    return record


@dataclass
class StageHandle:
    """Yielded by :func:`track_stage`; attach extra fields to the final event line."""

    run_id: str
    stage: str
    extra: dict[str, Any] = field(default_factory=dict)

    def set(self, **fields: Any) -> None:
        """Attach fields (e.g. metrics); reserved field names raise ``ValueError``."""
        self.update(fields)

    def update(self, fields: Mapping[str, Any]) -> None:
        """Attach fields from a mapping; reserved field names raise ``ValueError``."""
        clash = sorted(RESERVED_FIELDS & set(fields))
        if clash:
            raise ValueError(f"cannot set reserved event fields: {clash}")
        self.extra.update(fields)


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

    Extra fields set on the yielded handle are added to the final line (both outcomes).
    Durations use a monotonic clock.  Notifier errors are logged, never raised.
    """
    if stage == PIPELINE_STAGE:
        raise ValueError(f"stage name {PIPELINE_STAGE!r} is reserved for the run summary")
    started_at = _iso(_utc_now())
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
            finished_at=_iso(_utc_now()),
            duration_sec=time.monotonic() - t0,
            error=error,
            extra=handle.extra,
        )

    try:
        yield handle
    except BaseException as exc:
        failed = final("failed", one_line_error(exc))
        try:
            events.append(failed)
        except OSError as log_exc:  # keep the original exception as the one raised
            logger.warning("could not record failure of stage %r: %s", stage, log_exc)
        _safe_notify(notifier, failed)
        raise
    _safe_notify(notifier, events.append(final("succeeded")))


def pipeline_summary(
    run_id: str,
    status: Literal["succeeded", "failed"],
    duration_sec: float,
    *,
    best_model: str | None = None,
    test_rmse: float | None = None,
    started_at: str | None = None,
    finished_at: str | None = None,
    error: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the per-run summary record (``stage == "pipeline"``)."""
    fields: dict[str, Any] = {"best_model": best_model, "test_rmse": test_rmse}
    if extra:
        fields.update(extra)
    return make_event(
        run_id,
        PIPELINE_STAGE,
        status,
        started_at=started_at,
        finished_at=finished_at or _iso(_utc_now()),
        duration_sec=duration_sec,
        error=error,
        extra=fields,
    )


def record_pipeline_summary(
    events: EventLog,
    run_id: str,
    status: Literal["succeeded", "failed"],
    duration_sec: float,
    *,
    notifier: Notifier | None = None,
    best_model: str | None = None,
    test_rmse: float | None = None,
    started_at: str | None = None,
    error: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append the run summary line, notify, and return the record."""
    record = pipeline_summary(
        run_id,
        status,
        duration_sec,
        best_model=best_model,
        test_rmse=test_rmse,
        started_at=started_at,
        error=error,
        extra=extra,
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
        raw = file.read_bytes()
    except FileNotFoundError:
        return []
    lines = raw.split(b"\n")
    last_index = max(i for i, line in enumerate(lines) if line.strip()) if raw.strip() else -1
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
    started_at: str | None
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

    @property
    def duration_sec(self) -> float | None:
        """Total duration from the summary, else the sum of finished stage durations."""
        if self.summary is not None and self.summary.get("duration_sec") is not None:
            return float(self.summary["duration_sec"])
        durations = [s.duration_sec for s in self.stages if s.duration_sec is not None]
        return sum(durations) if durations else None


def _run_status(run_id: str, events: Sequence[Mapping[str, Any]]) -> RunStatus:
    stages: dict[str, StageStatus] = {}
    summary: dict[str, Any] | None = None
    for event in events:
        stage = str(event.get("stage"))
        if stage == PIPELINE_STAGE:
            summary = dict(event)
            continue
        duration = event.get("duration_sec")
        stages[stage] = StageStatus(
            stage=stage,
            status=str(event.get("status")),
            started_at=event.get("started_at"),
            finished_at=event.get("finished_at"),
            duration_sec=float(duration) if isinstance(duration, int | float) else None,
            error=event.get("error"),
        )
    if summary is not None:
        outcome = str(summary.get("status"))
    elif any(s.status == "failed" for s in stages.values()):
        outcome = "failed"
    elif any(s.status == "started" for s in stages.values()):
        outcome = "running"
    else:
        outcome = "succeeded"
    return RunStatus(run_id=run_id, stages=tuple(stages.values()), outcome=outcome, summary=summary)


def last_run_status(path: str | os.PathLike[str]) -> RunStatus | None:
    """Status of the most recently *started* run in the log, or ``None`` if it is empty.

    "Most recently started" is the run id whose first line appears last in the file,
    which is robust to interleaved concurrent runs and to arbitrary run ids.
    """
    events = read_events(path)
    by_run: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        run_id = event.get("run_id")
        if isinstance(run_id, str):
            by_run.setdefault(run_id, []).append(event)
    if not by_run:
        return None
    last = next(reversed(by_run))  # dicts keep first-insertion order
    return _run_status(last, by_run[last])


def _fmt_duration(value: Any) -> str:
    return f"{float(value):.2f}s" if isinstance(value, int | float) else "-"


def render_status(status: RunStatus) -> str:
    """Human-readable multi-line report for ``housing status``."""
    lines = [f"run {status.run_id}: {status.outcome.upper()}"]
    if status.stages:
        width = max(len("stage"), *(len(s.stage) for s in status.stages))
        lines.append(f"  {'stage':<{width}}  {'status':<9}  {'duration':>9}  finished_at")
        for s in status.stages:
            row = (
                f"  {s.stage:<{width}}  {s.status:<9}  {_fmt_duration(s.duration_sec):>9}"
                f"  {s.finished_at or '-'}"
            )
            if s.error:
                row += f"  error: {s.error}"
            lines.append(row)
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
    if summary.get("error"):
        text += f" error: {summary['error']}"
    return text


# --------------------------------------------------------------------------- notifiers


@runtime_checkable
class Notifier(Protocol):
    """A notification sink."""

    def notify(self, event: Mapping[str, Any]) -> None:
        """Deliver one event; implementations should not raise."""


def format_event(event: Mapping[str, Any]) -> str:
    """One-line human-readable description of an event."""
    stage = event.get("stage")
    status = str(event.get("status", "?")).upper()
    if stage == PIPELINE_STAGE:
        parts = [f"[housing] pipeline {status}", f"run={event.get('run_id')}"]
        parts.append(f"duration={_fmt_duration(event.get('duration_sec'))}")
        if event.get("best_model") is not None:
            parts.append(f"best_model={event['best_model']}")
        rmse = event.get("test_rmse")
        if isinstance(rmse, int | float):
            parts.append(f"test_rmse={rmse:.4f}")
    else:
        parts = [f"[housing] stage {stage} {status}", f"run={event.get('run_id')}"]
        if event.get("duration_sec") is not None:
            parts.append(f"duration={_fmt_duration(event.get('duration_sec'))}")
    if event.get("host"):
        parts.append(f"host={event['host']}")
    if event.get("error"):
        parts.append(f"error={event['error']}")
    return " ".join(" ".join(parts).split())


def event_triggers(event: Mapping[str, Any]) -> frozenset[str]:
    """Trigger names an event matches, e.g. ``{"all", "failed", "stage", "failed_stage"}``."""
    status = str(event.get("status"))
    kind = "pipeline" if event.get("stage") == PIPELINE_STAGE else "stage"
    return frozenset({"all", kind, status, f"{status}_{kind}"})


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
        stamp = event.get("finished_at") or event.get("started_at") or _iso(_utc_now())
        line = f"{stamp} {format_event(event)}\n".encode()
        try:
            _locked_append(self.path, line)
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
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        parts = None
    secrets_ = [url]
    if parts is not None:
        secrets_ += [parts.path, parts.query, parts.netloc if "@" in parts.netloc else ""]
        secrets_ += [p for p in re.split(r"[/?&=@:]", parts.path + "/" + parts.query) if len(p) > 5]
    for secret in sorted({s for s in secrets_ if s and s != "/"}, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return text


class WebhookNotifier:
    """POST ``{"text": ...}`` (Slack-compatible) to a URL taken from an env variable.

    Sent with requests; an urllib3 ``Retry`` retries timeouts, connection errors and HTTP
    5xx/408/429 up to ``retries`` times with exponential backoff (at most 5 s per pause,
    ``Retry-After`` ignored so the wait stays bounded); other 4xx are not retried.
    Never raises; the URL is never logged (only its host). ``trust_env=False`` ignores
    the proxy variables and ~/.netrc.
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
        if timeout_sec <= 0:
            raise ValueError(f"webhook timeout_sec must be > 0, got {timeout_sec}")
        if retries < 0:
            raise ValueError(f"webhook retries must be >= 0, got {retries}")
        if backoff_sec < 0:
            raise ValueError(f"webhook backoff_sec must be >= 0, got {backoff_sec}")
        source = os.environ if env is None else env
        url = source.get(url_env, "").strip()
        if url and urllib.parse.urlsplit(url).scheme not in {"http", "https"}:
            raise ValueError(f"environment variable {url_env} must hold an http(s) URL")
        self.url_env = url_env
        self._url = url or None
        self.timeout_sec = float(timeout_sec)
        self.retries = int(retries)
        self.backoff_sec = float(backoff_sec)
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

    def __repr__(self) -> str:
        return f"WebhookNotifier(url_env={self.url_env!r}, target={self.target!r})"

    def notify(self, event: Mapping[str, Any]) -> None:
        """Send the event; failures are logged as warnings."""
        try:
            self.send(event)
        except Exception as exc:  # belt and braces: never raise from a notifier
            logger.warning("webhook %s: unexpected %s", self.target, type(exc).__name__)

    def send(self, event: Mapping[str, Any]) -> bool:
        """Deliver the event; return True on a 2xx response (after retries if needed)."""
        self.last_attempts = 0
        if self._url is None:
            logger.debug("webhook disabled: $%s is not set", self.url_env)
            return False
        with _urllib3_logs_scrubbed(self._url):
            reason = self._post(self._url, {"text": format_event(event)})
        if not reason:
            return True
        logger.warning(
            "webhook notification to %s failed after %d attempt(s): %s",
            self.target,
            self.last_attempts,
            _scrub(reason, self._url),
        )
        return False

    def _post(self, url: str, body: Mapping[str, str]) -> str:
        """POST with retries; ``""`` on a 2xx answer, else why not."""
        import requests

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
        headers = {"User-Agent": "housing-monitoring"}
        try:
            with (
                session,
                session.post(
                    url, json=body, headers=headers, timeout=self.timeout_sec, stream=True
                ) as response,
            ):
                retried = response.raw.retries
                self.last_attempts = len(retried.history) + 1 if retried else 1
                return "" if response.ok else f"HTTP {response.status_code}"
        except requests.RequestException as exc:  # every such failure was retried
            self.last_attempts = self.retries + 1
            cause = http.root_cause(exc)
            if isinstance(cause, TimeoutError):
                return f"timed out after {self.timeout_sec:g}s"
            return f"connection error: {cause}"


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


class MultiNotifier:
    """Fan out to several notifiers; one failing sink does not affect the others."""

    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self.notifiers: tuple[Notifier, ...] = tuple(notifiers)

    def notify(self, event: Mapping[str, Any]) -> None:
        """Notify every sink, logging (not raising) individual failures."""
        for notifier in self.notifiers:
            _safe_notify(notifier, event)


class FilteredNotifier:
    """Forward only events matching one of the configured triggers (see ``NOTIFY_TRIGGERS``)."""

    def __init__(self, inner: Notifier, on: Sequence[str] = DEFAULT_NOTIFY_ON) -> None:
        unknown = [t for t in on if t not in NOTIFY_TRIGGERS]
        if unknown:
            raise ValueError(
                f"unknown notification trigger {unknown[0]!r}; "
                f"expected one of {sorted(NOTIFY_TRIGGERS)}"
            )
        self.inner = inner
        self.on = frozenset(on)

    def wants(self, event: Mapping[str, Any]) -> bool:
        """True if the event matches a configured trigger."""
        return bool(self.on & event_triggers(event))

    def notify(self, event: Mapping[str, Any]) -> None:
        """Forward matching events."""
        if self.wants(event):
            _safe_notify(self.inner, event)


def build_notifiers(
    settings: NotificationSettings, env: Mapping[str, str] | None = None
) -> FilteredNotifier:
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
    return FilteredNotifier(MultiNotifier(sinks), settings.on)
