"""MLflow's empty sqlite store, made at once from a template.

A new local store (``sqlite:///`` tracking store, the spool's) is made from
``mlflow_store.sql`` (next to this module), MLflow's empty schema dumped from the locked
MLflow version: MLflow itself runs its ~100 schema migrations (4-6 s) on first use. The
template is used only when its recorded MLflow version is the installed one (else MLflow
creates the store); after an MLflow upgrade, rewrite it with :func:`write_store_template`
(a test fails until then). Imports nothing of MLflow until a template is written.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from housing.io import atomic_path, file_lock, write_text

#: MLflow's empty store as SQL; its first line is ``-- mlflow <version>``.
STORE_TEMPLATE = Path(__file__).with_name("mlflow_store.sql")


def template_sql() -> str | None:
    """The template's SQL when it was made by the installed MLflow, else None."""
    from importlib.metadata import version

    try:
        text = STORE_TEMPLATE.read_text(encoding="utf-8")
    except OSError:
        return None
    return text if text.startswith(f"-- mlflow {version('mlflow')}\n") else None


def create_store(db: Path) -> None:
    """Make the empty sqlite store ``db`` from the template (atomically, once: under a
    lock, an existing store is never replaced); without a usable template, nothing
    (MLflow creates it on first use)."""
    sql = template_sql()
    if sql is None or db.exists():
        return
    with file_lock(db.with_name(f"{db.name}.create.lock")):
        if db.exists():
            return
        with atomic_path(db) as tmp:
            con = sqlite3.connect(tmp)
            try:
                con.executescript(sql)
            finally:
                con.close()


def write_store_template(path: Path = STORE_TEMPLATE) -> Path:
    """Write the template of :func:`create_store`: a store made by the installed MLflow
    (its migrations), dumped as SQL without its default experiment (MLflow adds that
    with the store's own artifact location)."""
    from importlib.metadata import version

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="housing-template-") as tmp:
        db = Path(tmp) / "mlflow.db"
        MlflowClient(f"sqlite:///{db}").search_experiments()
        con = sqlite3.connect(db)
        try:
            lines = [ln for ln in con.iterdump() if not ln.startswith('INSERT INTO "experiments"')]
        finally:
            con.close()
    return write_text(path, "\n".join([f"-- mlflow {version('mlflow')}", *lines]) + "\n")
