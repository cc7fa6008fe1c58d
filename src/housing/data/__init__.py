"""Data: sources (load), schema validation, deterministic splits."""
