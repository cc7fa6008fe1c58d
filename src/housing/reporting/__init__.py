"""Experiment reporting: CSV exports of tracked runs and models, and an HTML/Markdown report.

``housing.reporting.compare`` reads ClearML (server or offline sessions) and MLflow and writes
comparable tables; ``housing.reporting.report`` turns them and the pipeline's metrics files
into ``reports/experiments.html`` and ``reports/experiments.md``. Nothing is imported here.
"""
