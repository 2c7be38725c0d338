"""The layer above `eval/` and `train/`: runs that both train and evaluate (the FG-NET
re-fit rounds) and the `evaluate` entry that dispatches to them. Nothing below imports it."""
