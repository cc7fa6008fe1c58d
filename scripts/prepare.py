"""DVC stage entry point: `python scripts/prepare.py [hydra overrides]` == `housing prepare`."""

from housing.cli import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main("prepare"))
