"""`python scripts/tune.py model=NAME [--apply] [hydra overrides]` == `housing tune`."""

import sys

from housing.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tune", *sys.argv[1:]]))
