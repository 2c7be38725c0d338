"""Evaluation: metrics, pair lists, feature extraction, protocols and result tables."""
