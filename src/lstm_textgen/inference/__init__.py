"""Inference: evaluation of a split, scoring of a text, generation."""
