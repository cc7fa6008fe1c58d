"""Batch prediction: `python scripts/predict.py --input F [...]` == `housing predict`."""

import sys

from housing.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["predict", *sys.argv[1:]]))
