"""`python scripts/clearml_compare.py [--project P] [--tag T] [--stage S] [--last N]`.

Same as `housing compare`.
Writes metrics/{clearml,mlflow}_experiments.csv and metrics/{clearml,mlflow}_models.csv."""

import sys

from housing.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["compare", *sys.argv[1:]]))
