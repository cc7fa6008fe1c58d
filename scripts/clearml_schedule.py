"""`python scripts/clearml_schedule.py [--install] [overrides]` == `housing schedule`.

Crontab line (or a ClearML TaskScheduler with a server) for clearml.pipeline.schedule_cron.
Run by a ClearML agent as the scheduler task, it takes the arguments that task recorded
and runs the scheduler loop."""

import sys

from housing.cli import main
from housing.entry import report_error
from housing.errors import HousingError
from housing.orchestration.scheduling import agent_arguments, run_recorded

if __name__ == "__main__":
    try:
        recorded = agent_arguments()
        if recorded is not None:
            run_recorded(recorded)  # the scheduler loop
    except HousingError as exc:
        raise SystemExit(report_error(exc)) from None
    raise SystemExit(main(["schedule", *sys.argv[1:]]))
