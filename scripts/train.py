"""DVC stage entry point: `python scripts/train.py [hydra overrides]` == `housing train`."""

import sys

from housing.stage_server import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
