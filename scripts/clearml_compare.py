"""`python scripts/clearml_compare.py [--project P] [--tag T] [--stage S] [--last N] [overrides]`.

Writes metrics/{clearml,mlflow}_experiments.csv and metrics/{clearml,mlflow}_models.csv
(see housing.reporting.compare).
"""

from housing.reporting.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
