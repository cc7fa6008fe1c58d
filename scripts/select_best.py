"""DVC stage entry point: `python scripts/select_best.py [overrides]` == `housing select_best`."""

from housing.cli import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main("select_best"))
