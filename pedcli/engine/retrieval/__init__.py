"""Retrieval: similarity matrices, two-stage scoring, re-ranking, metrics and the approximate index."""
