"""House-price regression workflow: DVC + Hydra + MLflow + ClearML, offline first."""

__version__ = "0.1.0"
