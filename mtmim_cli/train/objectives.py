"""What the training loop optimises. An Objective owns the encoder and its heads, returns the
loss and its metrics for a batch, and exposes hooks for inner updates (CLUB's q steps).

The loop (train/loop.py) owns everything else: DDP, sampling, AMP, the main optimiser and its
schedule, checkpoints, logging and validation.
"""

from __future__ import annotations

from torch import Tensor, nn

from mtmim_cli.errors import MtmimError
from mtmim_cli.models.margin import CombinedMarginHead


class Objective(nn.Module):
    """Base class. Sub-modules are named `encoder`, `id_head` (and for fine-tuning
    `factorize`, `age_head`, `q`): checkpoints store this module's state dict under those names.

    `forward(images, labels, ages) -> (loss, metrics)`: `loss` is what the main optimiser
    minimises; `metrics` holds detached scalar tensors, `"accuracy"` (identity accuracy of the
    batch, the metrics.csv `accuracy` column) and one entry per name in `metric_names`. The
    loop averages the metrics over ranks. Under DDP, every rank must compute its forward the
    same way (same sub-modules used), and `after_step` must leave all ranks' extra modules
    identical (e.g. train q on features gathered with `gather_with_grad` and detached).
    """

    metric_names: tuple[str, ...] = ()
    encoder: nn.Module

    def main_parameters(self) -> list[dict]:
        """Parameter groups of the main optimiser (a group may carry its own "lr")."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def begin_step(self, step: int) -> bool:
        """Called before each step's forward with the 0-based step. Returns True when the set
        of parameters that take a gradient changed (e.g. an encoder released after a head
        warm-up): the loop then re-wraps the model for DDP."""
        return False

    def after_step(self) -> dict[str, float]:
        """Inner updates after each main optimiser step; returns metrics to log (by name)."""
        return {}

    def extra_state_dict(self) -> dict:
        """State the loop cannot see (an inner optimiser's), saved in every checkpoint."""
        return {}

    def load_extra_state_dict(self, d: dict) -> None:
        return None

    def identity_features(self, images: Tensor) -> Tensor:
        """Features compared at test time (x for pretraining; fine-tuning returns x_id)."""
        return self.encoder(images)


def make_id_head(margin: str, embedding_size: int, num_classes: int, s: float = 64.0,
                 m: float | None = None, partial_fc: float = 0.0, seed: int = 0) -> nn.Module:
    """The identity head: the combined-margin head, or with `partial_fc` in (0, 1] its
    Partial FC form (class centres split over the ranks, that share of negatives sampled).
    Both have `loss_and_accuracy(embeddings, labels)`."""
    if not 0.0 <= partial_fc <= 1.0:
        raise MtmimError(f"--partial-fc {partial_fc}: a share of the classes in (0, 1] (0 = off)")
    if partial_fc:
        from mtmim_cli.train.partial_fc import PartialFCHead
        return PartialFCHead.preset(margin, embedding_size, num_classes, rate=partial_fc, s=s,
                                    margin=m, seed=seed)
    return CombinedMarginHead.preset(margin, embedding_size, num_classes, s=s, margin=m)


class PretrainObjective(Objective):
    """Margin softmax on the encoder's embedding: the general-face pretraining stage."""

    def __init__(self, encoder: nn.Module, num_classes: int, embedding_size: int,
                 margin: str = "arcface", s: float = 64.0, m: float | None = None,
                 partial_fc: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.id_head = make_id_head(margin, embedding_size, num_classes, s=s, m=m,
                                    partial_fc=partial_fc, seed=seed)

    def forward(self, images: Tensor, labels: Tensor, ages: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss, accuracy = self.id_head.loss_and_accuracy(self.encoder(images), labels)
        return loss, {"accuracy": accuracy}
