"""Lineage metadata every model version carries, secret redaction, the champion gate."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from housing.io import command_output
from housing.tracking.base import ChampionDecision

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|api_key|webhook_url)", re.IGNORECASE)
REDACTED = "***"
# user:password@ (or token@) in a URL such as an MLFLOW_TRACKING_URI taken from the env.
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def utc_now() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def git_commit(root: Path) -> str:
    """HEAD commit of ``root`` (``+dirty`` when tracked files changed), or ``unknown``."""
    head = command_output(["git", "rev-parse", "HEAD"], root, timeout=5)
    if head is None:
        return "unknown"
    status = ["git", "status", "--porcelain", "--untracked-files=no"]
    dirty = command_output(status, root, timeout=5) or ""
    return head.strip() + ("+dirty" if dirty.strip() else "")


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the resolved config (sorted JSON), first 16 hex digits."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret (to scrub from text)."""
    source = os.environ if env is None else env
    return [v for k, v in source.items() if _SECRET_KEY.search(k) and len(v) >= 6]


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """A copy of ``value`` with secret-looking keys, known secret values and the user
    info of URLs (``https://user:token@host``) replaced.

    Keys ending in ``_env`` hold variable *names*, not secrets, and are kept.
    """
    known = secret_values() if secrets is None else secrets
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = str(k)
            if _SECRET_KEY.search(key) and not key.endswith("_env") and v not in (None, ""):
                out[key] = REDACTED
            else:
                out[key] = redact(v, known)
        return out
    if isinstance(value, list | tuple):
        return [redact(v, known) for v in value]
    if isinstance(value, str):
        for secret in known:
            value = value.replace(secret, REDACTED)
        value = _URL_USERINFO.sub(f"{REDACTED}@", value)
    return value


def decide_champion(
    registry_name: str,
    challenger_version: str,
    challenger_value: float,
    champion: tuple[str, float] | None,
    *,
    metric: str,
    greater_is_better: bool,
    min_improvement: float,
) -> ChampionDecision:
    """Promote only a finite challenger that beats the champion by > ``min_improvement``."""
    now = utc_now()

    def decision(promoted: bool, reason: str) -> ChampionDecision:
        return ChampionDecision(
            registry_name=registry_name,
            challenger_version=challenger_version,
            challenger_value=challenger_value,
            champion_version=champion[0] if champion else None,
            champion_value=champion[1] if champion else None,
            metric=metric,
            promoted=promoted,
            reason=reason,
            decided_at=now,
        )

    if not math.isfinite(challenger_value):
        return decision(False, f"challenger {metric} is not finite")
    if champion is None:
        return decision(True, "no champion yet")
    version, value = champion
    gain = (challenger_value - value) if greater_is_better else (value - challenger_value)
    if math.isnan(value):  # a champion with a NaN metric is broken: replace it
        return decision(True, f"champion v{version} has no usable {metric}")
    if gain > min_improvement:
        return decision(
            True, f"{metric} {challenger_value:.4f} beats v{version} {value:.4f} by {gain:.4f}"
        )
    return decision(
        False,
        f"{metric} {challenger_value:.4f} does not beat v{version} {value:.4f} "
        f"by more than {min_improvement:g}",
    )
