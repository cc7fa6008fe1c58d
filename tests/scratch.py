"""Scratch copies of the project (git + DVC) for end-to-end tests and benchmarks."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

#: What a pipeline run needs from the project (code is hashed by DVC as a dep).
PROJECT_FILES = ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "conf", "scripts",
                 "src")  # fmt: skip


def project_root() -> Path:
    """The checkout this file belongs to (``tests/`` sits at its root)."""
    return Path(__file__).resolve().parents[1]


def make_scratch_repo(
    dest: Path, *, defaults: Mapping[str, str] | None = None, source: Path | None = None
) -> Path:
    """Copy the pipeline files into ``dest``, set config-group defaults, git-commit it.

    ``defaults`` rewrites entries of ``conf/pipeline.yaml``'s defaults list, e.g.
    ``{"tracking": "none", "data": "synthetic"}``.
    """
    src_root = source or project_root()
    dest.mkdir(parents=True, exist_ok=True)
    for item in PROJECT_FILES:
        src, dst = src_root / item, dest / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst)
    pipeline = dest / "conf" / "pipeline.yaml"
    text = pipeline.read_text()
    for group, choice in (defaults or {}).items():
        text, n = re.subn(rf"(?m)^(\s*- {group}: )\S+$", rf"\g<1>{choice}", text)
        if n != 1:
            raise ValueError(f"conf/pipeline.yaml has no '- {group}:' default to replace")
    pipeline.write_text(text)
    git = ["git", "-c", "user.name=housing", "-c", "user.email=housing@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "scratch copy"], cwd=dest, check=True)
    return dest
