"""DVC stage entry point: `python scripts/evaluate.py [hydra overrides]` == `housing evaluate`."""

from housing.cli import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main("evaluate"))
