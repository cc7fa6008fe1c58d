"""The ``housing`` command tree: help, usage errors, error lines, script shims, doctor, status."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from housing import cli
from housing.cli import main
from housing.errors import ArtifactError, ConfigError, DataError, HousingError, first_line
from housing.monitoring import EventLog, track_stage

from .conftest import CONF, PROJECT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_doctor_with_an_unreachable_server_answers_fast_and_hides_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "AKEY1234567890")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "SENTINEL-SECRET-DOCTOR")
    host = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    code = main(["--config-dir", str(CONF), "doctor", f"clearml.server.api_host={host}"])
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert elapsed < 5
    assert code == 1  # keys set: a server is meant to be used, and it is down
    assert "unreachable" in out
    assert "Retrying" not in err  # urllib3's retry warnings stay out of the console
    assert "SENTINEL-SECRET-DOCTOR" not in out
    assert "AKEY1234567890" not in out


def test_status_reads_the_last_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--config-dir", str(CONF), "status"]) == 0
    assert "no pipeline runs" in capsys.readouterr().out
    events = EventLog(tmp_path / "metrics" / "pipeline_events.jsonl")
    with track_stage(events, "run-1", "prepare"):
        pass
    with pytest.raises(RuntimeError), track_stage(events, "run-1", "train_ridge"):
        raise RuntimeError("boom")
    assert main(["--config-dir", str(CONF), "status"]) == 1
    out = capsys.readouterr().out
    assert "run-1" in out and "train_ridge" in out and "failed" in out


# --------------------------------------------------------------------------- the command tree

COMMANDS = [
    "prepare",
    "train",
    "select_best",
    "evaluate",
    "predict",
    "drift",
    "tune",
    "repro",
    "run",
    "pipeline",
    "schedule",
    "compare",
    "report",
    "status",
    "doctor",
    "config",
    "clearml",
    "mlflow",
    "sync",
    "gc",
]
#: Every invocable command path (aliases and the clearml sub-group included).
COMMAND_PATHS = [*([c] for c in COMMANDS), ["select-best"], ["clearml", "sync"], ["mlflow", "sync"]]
#: scripts/<name>.py -> the subcommand it stands for.
SHIMS = {
    "prepare": ["prepare"],
    "train": ["train"],
    "select_best": ["select_best"],
    "evaluate": ["evaluate"],
    "clearml_pipeline": ["pipeline"],
    "clearml_schedule": ["schedule"],
    "clearml_compare": ["compare"],
    "clearml_sync": ["clearml", "sync"],
    "mlflow_sync": ["mlflow", "sync"],
    "report": ["report"],
    "predict": ["predict"],
    "drift": ["drift"],
    "tune": ["tune"],
}


def test_help_lists_every_command_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: housing [OPTIONS] COMMAND [ARGS]...")
    listed = out.split("Commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    names = [line.split()[0] for line in listed]
    assert names == COMMANDS
    for line in listed:  # one line each, never cut short
        assert len(line.split(maxsplit=1)) == 2 and not line.endswith("...")
    assert "-q, --quiet" in out and "-v, --verbose" in out and "--config-dir" in out


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=" ".join)
def test_every_subcommand_has_help(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: housing {' '.join(path)} ")


def test_subcommand_help_shows_its_real_options(capsys: pytest.CaptureFixture[str]) -> None:
    expected = {
        "repro": ["-j, --jobs"],
        "pipeline": ["--no-cache", "--max-workers", "[KEY=VALUE]..."],
        "schedule": ["--install", "--crontab-file", "[KEY=VALUE]..."],
        "compare": ["--project", "--tag", "--stage", "--last", "[KEY=VALUE]..."],
        "report": ["--project", "--last", "[KEY=VALUE]..."],
        "train": ["--config-dir", "[KEY=VALUE]..."],
    }
    for command, options in expected.items():
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        for option in options:
            assert option in out, (command, option)


@pytest.mark.parametrize(
    "argv",
    [["--bogus"], ["train", "--bogus"], ["pipeline", "--max-workers", "0"], ["nope"]],
    ids=" ".join,
)
def test_usage_errors_exit_2_with_a_usage_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("Usage: housing")
    assert "Error: " in captured.err


@pytest.mark.parametrize("error", [DataError, ConfigError, ArtifactError, HousingError])
def test_a_housing_error_is_one_line_and_its_exit_code(
    error: type[HousingError],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: list[tuple[str, list[str], Path | None]] = []

    def fail(stage: str, overrides: list[str], config_dir: Path | None) -> None:
        seen.append((stage, overrides, config_dir))
        raise error("data/raw/x.csv: column 'rooms': 3 rows not numeric")

    monkeypatch.setattr(cli, "run_stage", fail)
    assert main(["-q", "train", "--config-dir", "elsewhere", "model=ridge"]) == error.exit_code
    assert seen == [("train", ["model=ridge"], Path("elsewhere"))]
    captured = capsys.readouterr()
    assert captured.err == "error: data/raw/x.csv: column 'rooms': 3 rows not numeric\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        (ValueError("\n  bad value  \n  detail\n"), None, "bad value"),
        (KeyError(), None, "KeyError"),
        ("x" * 301, 300, "x" * 297 + "..."),
        ("x" * 300, 300, "x" * 300),
    ],
)
def test_first_line_of_an_error(value: object, limit: int | None, expected: str) -> None:
    assert first_line(value, limit) == expected


def test_first_line_typed_or_whole_is_the_one_error_summary() -> None:
    error = ValueError("missing\n   column 'price'")
    assert first_line(error, typed=True) == "ValueError: missing"
    assert first_line(error, typed=True, whole=True) == "ValueError: missing column 'price'"
    assert first_line(KeyError(), typed=True, whole=True) == "KeyError"
    assert first_line(OSError("x" * 600), 500, typed=True) == "OSError: " + "x" * 488 + "..."


def test_ctrl_c_is_error_interrupted_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_stage", interrupt)
    assert main(["prepare"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"


def test_aliases_call_the_same_function() -> None:
    assert cli.cli.commands["run"].callback is cli.cli.commands["repro"].callback
    assert cli.cli.commands["select-best"].hidden
    assert cli.cli.commands["run"].params == cli.cli.commands["repro"].params
    select = cli.cli.commands["select-best"].callback
    assert select is cli.cli.commands["select_best"].callback


def test_option_choices_match_the_library() -> None:
    from housing.reporting.compare import STAGES
    from housing.reporting.report import DEFAULT_VERSIONS

    assert cli.COMPARE_STAGES == STAGES
    assert cli.REPORT_VERSIONS == DEFAULT_VERSIONS


def test_only_the_command_layer_prints() -> None:
    package = Path(cli.__file__).resolve().parent
    printing = [
        f"{path.relative_to(package)}:{number}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "cli.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"(?<![\w.])print\(", line)
    ]
    assert printing == []


def test_orchestration_never_imports_the_command_layer() -> None:
    package = Path(cli.__file__).resolve().parent
    for path in (package / "orchestration").rglob("*.py"):
        assert "housing.cli" not in path.read_text(), path


def _package_imports(path: Path, modules: set[str]) -> set[str]:
    """The ``housing`` modules ``path`` imports anywhere (function bodies included),
    except under ``if TYPE_CHECKING:`` (type-only imports are no run-time cycle)."""
    import ast

    tree = ast.parse(path.read_text())
    hidden = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for node in ast.walk(branch)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def test_no_import_cycles() -> None:
    import networkx as nx

    package = Path(cli.__file__).resolve().parent
    files = {
        ".".join(("housing", *p.relative_to(package).with_suffix("").parts)).removesuffix(
            ".__init__"
        ): p
        for p in package.rglob("*.py")
    }
    graph = nx.DiGraph()
    for module, path in files.items():
        graph.add_edges_from(
            (module, dep) for dep in _package_imports(path, set(files)) if dep != module
        )
    assert list(nx.simple_cycles(graph)) == []


@pytest.mark.parametrize("script", sorted(SHIMS))
def test_each_script_is_its_subcommand(script: str) -> None:
    done = _script(script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: housing {' '.join(SHIMS[script])} ")


def test_script_and_subcommand_do_the_same_thing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--config-dir", str(CONF), "prepare.test_size=1.5"]
    done = _script("prepare", *args, cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main(["prepare", *args])
    assert (done.returncode, done.stderr) == (code, capsys.readouterr().err)
    assert code == ConfigError.exit_code
    assert done.stderr == "error: prepare.test_size: must be < 1, got 1.5\n"
    assert not (tmp_path / "data").exists()


def test_status_is_a_table_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rich.console import Console

    monkeypatch.chdir(tmp_path)
    events = EventLog(tmp_path / "metrics" / "pipeline_events.jsonl")
    with track_stage(events, "run-7", "prepare"):
        pass
    monkeypatch.setattr(cli, "_console", lambda: Console(file=sys.stdout, width=120))
    assert main(["status", "--config-dir", str(CONF)]) == 0
    out = capsys.readouterr().out
    assert "run run-7: SUCCEEDED" in out and "prepare" in out and "succeeded" in out
    assert "┃" in out or "│" in out  # a rich table, not the plain report
    assert "summary: none" in out


def _script(name: str, *args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOUSING_")}
    return subprocess.run(
        [sys.executable, str(PROJECT / "scripts" / f"{name}.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize("terminal", [False, True])
def test_doctor_renders_checks_and_fails_on_a_failed_check(
    terminal: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rich.console import Console

    from housing import doctor

    checks = [
        doctor.Check("mlflow", "ok", "local store"),
        doctor.Check("agents", "fail", "none", "start one"),
    ]
    monkeypatch.setattr(doctor, "diagnose", lambda *_, **__: checks)
    if terminal:
        monkeypatch.setattr(cli, "_console", lambda: Console(file=sys.stdout, width=100))
    assert main(["doctor", "--config-dir", str(CONF)]) == 1
    out = capsys.readouterr().out
    assert "1 ok, 0 warning(s), 1 failure(s)" in out
    assert "next: start one" in out
    assert ("│" in out) is terminal
    if not terminal:
        assert out.startswith("[ ok ] mlflow  local store\n[FAIL] agents  none\n")
