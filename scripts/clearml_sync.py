"""`python scripts/clearml_sync.py [overrides]` == `housing clearml sync`."""

import sys

from housing.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["clearml", "sync", *sys.argv[1:]]))
