"""Tracking: the MLflow store and runs, the model registry, fine-tuning sources, run comparison."""
