"""Evaluation: benchmark metrics, loaders and batched generation."""
