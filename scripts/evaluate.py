"""DVC stage entry point: `python scripts/evaluate.py [hydra overrides]` == `housing evaluate`."""

import sys

from housing.stage_server import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
