"""DVC stage entry point: `python scripts/train.py [hydra overrides]` == `housing train`."""

from housing.cli import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main("train"))
