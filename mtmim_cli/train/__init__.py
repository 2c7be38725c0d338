"""The one training loop, its objectives, checkpoints and distributed helpers."""
