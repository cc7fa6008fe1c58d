"""DVC stage entry point: `python scripts/select_best.py [overrides]` == `housing select_best`."""

import sys

from housing.stage_server import main

if __name__ == "__main__":
    raise SystemExit(main(["select_best", *sys.argv[1:]]))
