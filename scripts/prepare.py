"""DVC stage entry point: `python scripts/prepare.py [hydra overrides]` == `housing prepare`."""

import sys

from housing.stage_server import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
