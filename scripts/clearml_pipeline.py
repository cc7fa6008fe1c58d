"""Run the pipeline DAG: `python scripts/clearml_pipeline.py [--no-cache] [hydra overrides]`.

Local parallel executor with step caching, or a ClearML PipelineController when a
ClearML server answers (see housing.orchestration.pipeline).
"""

from housing.orchestration.pipeline import main

if __name__ == "__main__":
    raise SystemExit(main())
