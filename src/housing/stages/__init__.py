"""Pipeline stages: prepare, train, select_best, evaluate.

Each module has a pure core (frames and settings in, objects and metrics out) and a
``run(settings)`` that reads and writes the pipeline's files and returns a result
dataclass with every metric and path, for entry points and trackers to use.
"""
