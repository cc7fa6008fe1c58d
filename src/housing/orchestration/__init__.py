"""Pipeline orchestration: one DAG, run locally in parallel or by ClearML, and scheduled.

``pipeline`` defines the DAG and the local parallel executor (with step caching),
``clearml_controller`` runs the same DAG with a ClearML ``PipelineController`` when a
server answers, and ``scheduling`` turns ``clearml.pipeline.schedule_cron`` into a
crontab line or a ClearML ``TaskScheduler``. Nothing is imported here: entry points
import the module they need.
"""
