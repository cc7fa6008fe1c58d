"""`python scripts/clearml_pipeline.py [--no-cache] [overrides]` == `housing pipeline`.

Local parallel executor with step caching, or a ClearML PipelineController when a
ClearML server answers (the ClearML template and the crontab line run this script)."""

import sys

from housing.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pipeline", *sys.argv[1:]]))
