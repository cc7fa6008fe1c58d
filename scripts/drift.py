"""Drift check: `python scripts/drift.py --input F [...]` == `housing drift`."""

import sys

from housing.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["drift", *sys.argv[1:]]))
