"""Encoders, margin heads and the identity-feature model built from checkpoints."""
