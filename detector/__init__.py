"""Sparse DETR and its baselines: models, losses, data, evaluation and cost counting."""
