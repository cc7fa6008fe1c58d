"""`python scripts/report.py [--project P] [--last N] [overrides]`.

Writes reports/experiments.html (self-contained) and reports/experiments.md with its figures
in reports/experiments_figures/ (see housing.reporting.report).
"""

from housing.reporting.report import main

if __name__ == "__main__":
    raise SystemExit(main())
