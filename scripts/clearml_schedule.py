"""Schedule the pipeline: `python scripts/clearml_schedule.py [--install] [hydra overrides]`.

Crontab line (or a ClearML TaskScheduler with a server) for clearml.pipeline.schedule_cron
(see housing.orchestration.scheduling).
"""

from housing.orchestration.scheduling import main

if __name__ == "__main__":
    raise SystemExit(main())
