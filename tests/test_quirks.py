"""Contract tests of ``housing.quirks``: every private attribute or patch the package relies
on still exists and behaves as relied upon at the locked SDK versions (real libraries).

A failure here after an upgrade names the quirk to revisit, instead of a user's stage
failing (or silently slowing down) later.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from housing.quirks import clearml as clearml_quirks
from housing.quirks import mlflow as mlflow_quirks
from housing.quirks.multiprocessing import StoppablePool, pool_processes
from housing.quirks.sklearn import validate_params

# --------------------------------------------------------------------------- scikit-learn


def test_sklearn_validate_params_checks_before_fit() -> None:
    from sklearn.linear_model import Ridge

    validate_params(Ridge(alpha=1.0))  # a good value passes
    with pytest.raises(ValueError, match="alpha"):
        validate_params(Ridge(alpha=-1.0))
    with pytest.raises((ValueError, TypeError), match="alpha"):
        validate_params(Ridge(alpha="much"))


# ------------------------------------------------------------------------ multiprocessing


def _pid() -> int:
    return os.getpid()


def test_pool_processes_lists_the_live_workers() -> None:
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))
    try:
        worker_pid = pool.submit(_pid).result(timeout=10)
        workers = pool_processes(pool)
        assert [p.pid for p in workers] == [worker_pid]
        assert workers[0].is_alive()
    finally:
        pool.shutdown(wait=True)
    assert pool_processes(pool) == []  # None after shutdown: nothing to stop


def test_run_exit_finalizers_runs_the_atexit_finalizers_now() -> None:
    # in a child: running them here would release this test process's own resources
    code = (
        "from multiprocessing import util\n"
        "from housing.quirks.multiprocessing import run_exit_finalizers\n"
        "util.Finalize(None, print, args=('finalized',), exitpriority=0)\n"
        "run_exit_finalizers()\n"
        "print('after', flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.split() == ["finalized", "after"]  # run once, before exit


def _until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_stoppable_pool_replaces_a_worker_only_until_stopping() -> None:
    """CPython replaces a ``max_tasks_per_child`` worker through the private
    ``_adjust_process_count`` that :class:`StoppablePool` overrides."""
    ctx = multiprocessing.get_context("spawn")
    pool = StoppablePool(max_workers=1, mp_context=ctx, max_tasks_per_child=1)
    try:
        first = pool.submit(os.getpid).result(timeout=30)
        assert _until(lambda: [p.pid for p in pool_processes(pool)] not in ([], [first]))
        (replacement,) = pool_processes(pool)
        pool.stopping = True
        assert pool.submit(os.getpid).result(timeout=30) == replacement.pid
        assert _until(lambda: pool_processes(pool) == [])  # exited, not replaced
        # the pool's manager thread reaps it too; wait for the exit, not a fixed join
        assert _until(lambda: replacement.exitcode is not None, timeout=30)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_helper_pids_and_stop_helpers_at_the_locked_python() -> None:
    # in a child: this test process's own helpers stay as they are
    code = (
        "import os\n"
        "from multiprocessing import forkserver, resource_tracker\n"
        "from housing.quirks.multiprocessing import helper_pid, stop_helpers\n"
        "names = ('forkserver', 'resource_tracker')\n"
        "print(*[helper_pid(n) for n in names])\n"
        "forkserver.ensure_running(); resource_tracker.ensure_running()\n"
        "pids = [helper_pid(n) for n in names]\n"
        "print(*[os.waitpid(p, os.WNOHANG)[0] == 0 for p in pids])\n"  # children, running
        "stop_helpers()\n"
        "print(*[helper_pid(n) for n in names])\n"
        "gone = []\n"
        "for p in pids:\n"
        "    try: os.waitpid(p, os.WNOHANG); gone.append(False)\n"
        "    except ChildProcessError: gone.append(True)\n"  # reaped by stop_helpers
        "print(*gone)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.splitlines() == ["None None", "True True", "None None", "True True"]


def test_index_module_files_maps_the_loaded_modules_at_once() -> None:
    # in a child: a fresh index, as in the fork server
    code = (
        "import inspect, json, os\n"
        "from housing.quirks.inspect import index_module_files\n"
        "before = os.path.realpath(json.__file__) in inspect.modulesbyfile\n"
        "index_module_files()\n"
        "print(before, inspect.modulesbyfile.get(os.path.realpath(json.__file__)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.split() == ["False", "json"]


# --------------------------------------------------------------------------------- MLflow


def test_http_budget_variables_bound_every_rest_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow reads its HTTP budget from these variables at each call: with it, a dead
    server costs about a second instead of minutes of retries with backoff."""
    from mlflow import MlflowClient
    from mlflow import environment_variables as variables

    budget = mlflow_quirks.http_budget(1, 0)
    for name in budget:
        assert getattr(variables, name).name == name
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    client = MlflowClient(f"http://127.0.0.1:{port}")  # the budget is read per call
    for name, value in budget.items():
        monkeypatch.setenv(name, value)
    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        client.search_experiments()
    assert time.monotonic() - t0 < 5


def test_expected_mlflow_noise_still_comes_from_those_loggers() -> None:
    import importlib
    import inspect
    import logging

    import mlflow.sklearn
    import mlflow.utils.environment

    modules = (mlflow.sklearn, mlflow.utils.environment)
    noise = dict(zip(modules, mlflow_quirks.EXPECTED_NOISE, strict=True))
    for module, text in noise.items():
        assert text in " ".join(inspect.getsource(module).split()), module.__name__
        assert module.__name__ in mlflow_quirks.NOISY_LOGGERS
    sql = importlib.import_module(mlflow_quirks.SQL_STORE_LOGGER)
    assert sql._logger is logging.getLogger(mlflow_quirks.SQL_STORE_LOGGER)


def test_fluent_tracking_uri_is_set_and_put_back_without_touching_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    with mlflow_quirks.fluent_tracking_uri(uri):
        assert mlflow.get_tracking_uri() == uri
        assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow's set_tracking_uri writes it
    assert tracking_utils._tracking_uri is None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with mlflow_quirks.fluent_tracking_uri(uri):
        assert mlflow.get_tracking_uri() == uri
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"
    assert mlflow.get_tracking_uri() == "http://127.0.0.1:1"


def test_check_prompts_once_asks_once_per_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    # mlflow's file store: a real registry without the ~2-7 s of a new sqlite store's
    # migrations (it asks the same way; the package itself uses sqlite or a server)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=tmp_path.as_uri())
    asked: list[str] = []
    original = client._raise_if_prompt

    def counting(name: str) -> None:
        asked.append(name)
        original(name)

    client._raise_if_prompt = counting  # type: ignore[method-assign]
    mlflow_quirks.check_prompts_once(client)
    client.create_registered_model("m")
    for value in ("a", "b", "c"):
        client.set_registered_model_tag("m", "k", value)  # each asks, unpatched
    client.delete_registered_model_tag("m", "k")
    assert asked == ["m"]
    assert client.get_registered_model("m").tags == {}


def test_no_requirement_scan_replaces_the_check_log_model_calls() -> None:
    from mlflow.models.utils import _validate_serving_input

    pyfunc = importlib.import_module("mlflow.pyfunc")  # what load_model's globals are
    from mlflow.utils import environment

    name = "warn_dependency_requirement_mismatches"
    originals = [getattr(environment, name), getattr(pyfunc, name)]
    # log_model reaches it through each module's globals (pyfunc: loading the model back
    # to validate the input example), so replacing it there works
    assert name in environment._process_pip_requirements.__code__.co_names
    assert name in inspect.unwrap(pyfunc.load_model).__code__.co_names
    assert "load_model" in _validate_serving_input.__code__.co_names
    with mlflow_quirks.no_requirement_scan():
        for module, original in zip((environment, pyfunc), originals, strict=True):
            replaced = getattr(module, name)
            assert replaced is not original
            assert replaced(["scikit-learn==0.0.1"]) is None
    assert [getattr(environment, name), getattr(pyfunc, name)] == originals


def test_cache_schema_revision_answers_without_alembic(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.store.db import utils

    original = utils._get_latest_schema_revision
    monkeypatch.setattr(utils, "_get_latest_schema_revision", original)  # put back after
    assert "_get_latest_schema_revision" in utils._verify_schema.__code__.co_names
    head = mlflow_quirks.cache_schema_revision()
    assert isinstance(head, str)
    assert head
    assert utils._get_latest_schema_revision is not original
    assert utils._get_latest_schema_revision() == head


def test_version_model_id_from_the_source_when_the_store_drops_it() -> None:
    from mlflow.entities.model_registry import ModelVersion

    # what a SQL registry returns: model_id None, the logged model named by the source
    stored = ModelVersion("m", "1", 0, source="models:/m-0123abcd", model_id=None)
    assert stored.model_id is None
    assert mlflow_quirks.version_model_id(stored) == "m-0123abcd"
    given = ModelVersion("m", "2", 0, source="models:/m-0123abcd", model_id="m-ffff")
    assert mlflow_quirks.version_model_id(given) == "m-ffff"
    for source in ("runs:/abc/model", "models:/m/3", "file:///tmp/model"):
        assert mlflow_quirks.version_model_id(ModelVersion("m", "3", 0, source=source)) is None


# -------------------------------------------------------------------------------- ClearML


@pytest.fixture
def sdk_config() -> Iterator[None]:
    """Put the SDK's parsed config back as it was."""
    from clearml.config import ConfigSDKWrapper, ConfigWrapper

    before = (ConfigWrapper._config, ConfigSDKWrapper._config_sdk)
    yield
    ConfigWrapper._config, ConfigSDKWrapper._config_sdk = before


@pytest.mark.usefixtures("sdk_config")
def test_clearml_config_loaded_now_and_forgotten() -> None:
    from clearml.config import ConfigSDKWrapper, ConfigWrapper

    clearml_quirks.forget_config()
    assert (ConfigWrapper._config, ConfigSDKWrapper._config_sdk) == (None, None)
    clearml_quirks.load_config_now()
    loaded = ConfigWrapper._config
    assert loaded is not None
    assert ConfigSDKWrapper._config_sdk is not None
    assert ConfigWrapper.get("sdk") is ConfigSDKWrapper._config_sdk  # what first use reads
    clearml_quirks.load_config_now()  # loaded once only
    assert ConfigWrapper._config is loaded


def test_quiet_console_names_the_sdk_logger() -> None:
    from clearml.debugging.log import get_logger

    assert get_logger("Repository Detection").name == clearml_quirks.REPOSITORY_LOGGER
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        with clearml_quirks.quiet_console():
            print("ClearML Task: created new task id=0")
        with clearml_quirks.quiet_console(verbose=True):
            print("shown")
    assert printed.getvalue() == "shown\n"


def test_the_settled_cache_dir_is_what_the_sdk_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clearml.config import get_cache_dir

    from housing.config import ClearMLSettings
    from housing.tracking.clearml import sdk_env

    settings = ClearMLSettings.model_validate(
        {"mode": "offline", "offline_dir": "c"}, context={"root": tmp_path}
    )
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(sdk_env(settings, {})["CLEARML_CACHE_DIR"]))
    assert Path(get_cache_dir()) == tmp_path / "c"  # the SDK reads it from the environment


@pytest.fixture
def offline_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A real ClearML task in offline mode, its session under ``tmp_path``."""
    from clearml import Task

    from housing.config import ClearMLSettings
    from housing.tracking.clearml import sdk_env

    for key in [k for k in os.environ if k.startswith(("CLEARML_", "TRAINS_"))]:
        monkeypatch.delenv(key)
    settings = ClearMLSettings.model_validate(
        {"mode": "offline", "offline_dir": ".clearml"}, context={"root": tmp_path}
    )
    for key, value in sdk_env(settings, {}).items():
        if value is not None:
            monkeypatch.setenv(key, value)
    clearml_quirks.forget_config()  # read this config, not one parsed earlier
    Task.set_offline(True)
    task = Task.init(
        project_name="housing-quirks",
        task_name="contract",
        reuse_last_task_id=False,
        auto_connect_arg_parser=False,
        auto_connect_frameworks=False,
        auto_resource_monitoring=False,
    )
    try:
        yield task
    finally:
        task.close()
        for key in [k for k in os.environ if k.startswith(("CLEARML_", "TRAINS_"))]:
            # the SDK sets some itself (CLEARML_PROC_MASTER_ID): drop them for good, not
            # with monkeypatch, which would put them back at teardown
            os.environ.pop(key)
        clearml_quirks.forget_config()


@pytest.mark.integration
@pytest.mark.usefixtures("sdk_config")
def test_offline_model_registration_needs_both_clearml_quirks(
    offline_task: object, tmp_path: Path
) -> None:
    from clearml import OutputModel, Task

    task: Task = offline_task  # type: ignore[assignment]
    weights = tmp_path / "model.joblib"
    weights.write_bytes(b"weights")
    out = OutputModel(task=task, name="housing-ridge", framework="ScikitLearn", tags=["a"])
    base = out._get_base_model()
    # the SDK bug is still there (when this fails, drop unlock_offline_model)
    assert not hasattr(base, "locked")
    clearml_quirks.unlock_offline_model(out)
    out.update_weights(weights_filename=str(weights), auto_delete_file=False)

    records = clearml_quirks.offline_output_models(task)
    assert [r["init"]["name"] for r in records] == ["housing-ridge"]
    assert records[0]["id"] == out.id
    records[0]["init"]["tags"].append("champion")  # reaches task.json at close
    folder = Path(str(task.get_offline_mode_folder()))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        task.close()
    assert "Offline session stored in" in printed.getvalue()  # why quiet_console
    written = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    assert written["offline_output_models"][0]["init"]["tags"] == ["a", "champion"]


def test_service_modules_are_the_api_version_the_sdk_speaks() -> None:
    import importlib

    from clearml.backend_api.session import Session

    assert Session.api_version == "2.9"
    for name in clearml_quirks.SERVICE_MODULES:
        module = importlib.import_module(name)
        assert module.__name__.startswith("clearml.backend_api.services.v2_9.")


def test_default_session_and_model_created_hold_at_the_locked_sdk() -> None:
    """compare's server export: the SDK's default session is swapped and put back, and a
    model's creation time is still on its private data object."""
    from clearml import Model
    from clearml.backend_interface.base import InterfaceBase

    before = InterfaceBase._default_session
    marker = object()
    with clearml_quirks.default_session(marker):
        assert InterfaceBase._get_default_session() is marker
    assert InterfaceBase._default_session is before
    assert callable(Model._get_model_data)
    data = type("Data", (), {"created": "2026-12-03T07:00:00"})()
    model = type("M", (), {"_get_model_data": lambda self: data})()
    assert clearml_quirks.model_created(model) == "2026-12-03T07:00:00"
