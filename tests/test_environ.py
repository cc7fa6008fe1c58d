"""No ``os.environ`` writes in package code outside the entry point (issue 15).

setenv/getenv from several threads is unsafe in glibc (a pipeline worker once died in
``getenv``): settings reach the SDKs explicitly, and only :mod:`housing.entry` (a
process's start-up) writes the environment. The scan reads every module's syntax tree.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import housing
from housing.config import ClearMLSettings
from housing.orchestration.clearml_controller import controller_env

PACKAGE = Path(housing.__file__).parent

#: The one module allowed to write ``os.environ``: a process's start-up.
ALLOWED = {"entry.py"}

_MUTATORS = {"update", "pop", "setdefault", "clear", "popitem", "__setitem__", "__delitem__"}


def _is_environ(node: ast.expr) -> bool:
    """``os.environ`` or a bare ``environ`` (``from os import environ``)."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ" and isinstance(node.value, ast.Name)
    return isinstance(node, ast.Name) and node.id == "environ"


def environ_writes(source: str, filename: str = "<string>") -> list[int]:
    """The line of each ``os.environ`` write in ``source``: item assignment or ``del``,
    a mutating method, ``os.putenv`` / ``os.unsetenv``."""
    lines: list[int] = []
    for node in ast.walk(ast.parse(source, filename)):
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        if any(isinstance(t, ast.Subscript) and _is_environ(t.value) for t in targets):
            lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            mutates = func.attr in _MUTATORS and _is_environ(func.value)
            calls_os = func.attr in ("putenv", "unsetenv") and isinstance(func.value, ast.Name)
            if mutates or calls_os:
                lines.append(node.lineno)
        imported = node.names if isinstance(node, ast.ImportFrom) and node.module == "os" else []
        if any(alias.name in ("putenv", "unsetenv") for alias in imported):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_scan_finds_every_kind_of_write() -> None:
    source = """
import os
from os import environ, putenv
os.environ["A"] = "1"
os.environ["A"] += "2"
del os.environ["A"]
environ["B"] = "1"
os.environ.update({"A": "1"})
os.environ.pop("A", None)
os.environ.setdefault("A", "1")
os.environ.clear()
os.environ.popitem()
os.environ.__setitem__("A", "1")
os.putenv("A", "1")
os.unsetenv("A")
x = os.environ.get("A")
y = dict(os.environ)
env = {**os.environ}
env["A"] = "1"
"""
    assert environ_writes(source) == [3, *range(4, 16)]


def test_no_package_module_writes_os_environ() -> None:
    found: dict[str, list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name in ALLOWED:
            continue
        lines = environ_writes(path.read_text(encoding="utf-8"), str(path))
        if lines:
            found[name] = lines
    assert not found, (
        f"os.environ written outside housing/entry.py (file: lines): {found}; "
        "pass settings explicitly (client arguments, a child's env=)"
    )


def _clearml(root: Path) -> ClearMLSettings:
    return ClearMLSettings.model_validate(
        {
            "offline_dir": "offline",
            "server": {"api_host": "http://api:8008", "web_host": "http://web:8080"},
            "auth": {"access_key_env": "MY_ACCESS", "secret_key_env": "MY_SECRET"},
        },
        context={"root": root},
    )


def test_the_controller_environment_is_computed_not_written(tmp_path: Path) -> None:
    settings = _clearml(tmp_path)
    environ = {"MY_ACCESS": "a", "MY_SECRET": "s", "CLEARML_API_SECRET_KEY": "own"}
    before = dict(os.environ)
    env = controller_env(settings, "run-1", environ)
    assert dict(os.environ) == before  # settled later, once, by the entry layer
    conf = Path(str(env.pop("CLEARML_CONFIG_FILE")))
    assert conf.parent == settings.offline_dir and "http://api:8008" in conf.read_text()
    assert env == {
        "HOUSING_RUN_ID": "run-1",
        "CLEARML_API_HOST": "http://api:8008",
        "CLEARML_WEB_HOST": "http://web:8080",
        "CLEARML_FILES_HOST": settings.server.files_host,
        "CLEARML_API_ACCESS_KEY": "a",  # from clearml.auth's variable
        "CLEARML_OFFLINE_MODE": None,  # the SDK's own secret key is kept
    }
    mine = controller_env(settings, None, {**environ, "CLEARML_CONFIG_FILE": "/mine.conf"})
    assert "CLEARML_CONFIG_FILE" not in mine and "HOUSING_RUN_ID" not in mine
    assert controller_env(settings, "r", {"CLEARML_TASK_ID": "t"}) == {"HOUSING_RUN_ID": "r"}
