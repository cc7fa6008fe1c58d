"""`python scripts/clearml_schedule.py [--install] [overrides]` == `housing schedule`.

Crontab line (or a ClearML TaskScheduler with a server) for clearml.pipeline.schedule_cron."""

import sys

from housing.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["schedule", *sys.argv[1:]]))
