"""`python scripts/report.py [--project P] [--last N] [overrides]` == `housing report`.

Writes reports/experiments.html (self-contained) and reports/experiments.md with its
figures in reports/experiments_figures/."""

import sys

from housing.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["report", *sys.argv[1:]]))
