"""Pipeline orchestration: one DAG, run by the local engine or by ClearML, and scheduled.

``dag`` mirrors ``dvc.yaml`` as steps and holds run results; ``pipeline`` picks the engine
(``housing.repro`` with each stage an offline ClearML session when no server answers, a
ClearML ``PipelineController`` from ``clearml_controller`` when one does); ``scheduling``
turns ``clearml.pipeline.schedule_cron`` into a crontab line or a ClearML
``TaskScheduler``. Nothing is imported here: entry points import the module they need.
"""
