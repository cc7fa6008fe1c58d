"""`python scripts/mlflow_sync.py [overrides]` == `housing mlflow sync`."""

import sys

from housing.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["mlflow", "sync", *sys.argv[1:]]))
