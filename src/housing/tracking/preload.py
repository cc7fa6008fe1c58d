"""Imported only by the ``housing repro`` fork server (the last of
:data:`housing.repro.PRELOAD_MODULES`): importing it runs
:func:`housing.tracking.warmup.warm`, so every stage forked from the server starts with
ClearML's config read and matplotlib warm. Nothing else may import it."""

from housing.tracking.warmup import warm

warm()
