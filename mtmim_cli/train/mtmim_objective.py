"""MT-MIM fine-tuning (Algorithm 1 of the paper) on the shared training loop.

One code path for the paper's three ablation rows (`mode`):

    baseline  L = L_ID
    age       L = L_ID + lambda_age * L_AGE
    mtmim     L = L_ID + lambda_age * L_AGE + lambda_mim * L_MIM      (L_MIM: CLUB, closed form)

Every mode builds the same modules (encoder, factorize, id_head, age_head, q). A term whose
weight is off in a mode is still computed on *detached* inputs and added with zero value
(`t - t.detach()`): its head keeps training as a probe, so age accuracy and the CLUB estimate
are logged in every mode (the paper's "MI as a metric" curve for the baseline too), while no
gradient of it reaches the encoder or the factorization. It also keeps every parameter in the
graph, which DDP requires.

Per step (the loop calls `forward`, steps the main optimiser, then `after_step`):
1. encoder step on L with q frozen (q is not in the main optimiser; its gradient from this
   backward is discarded);
2. `q_steps` Adam steps of q on its log-likelihood of the same batch's features, detached.

Under torchrun the CLUB terms and q's updates use the global batch: x_id and x_age are
gathered from every rank with `gather_with_grad`, so each rank computes the same estimate and
q stays identical on all ranks without a gradient all-reduce.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtmim_cli.errors import MtmimError
from mtmim_cli.models.club import CLUB, AgeGroupQ, train_group_q, train_q
from mtmim_cli.models.factorize import FactorizationUnit
from mtmim_cli.train import distributed as D
from mtmim_cli.train.finetune_options import (
    MI_TARGETS,
    MODES,
)
from mtmim_cli.train.objectives import Objective, make_id_head
from mtmim_cli.train.transfer import EncoderPlan


def _zero_valued(t: Tensor) -> Tensor:
    """Zero in value, t's gradient in backward: trains a probe head without changing the loss."""
    return t - t.detach()


class MTMIMObjective(Objective):
    """Identity margin loss on x_id, age-group CE on x_age, CLUB between them (by mode)."""

    metric_names = ("l_id", "l_age", "age_accuracy", "club", "q_loglik", "q_lr")

    def __init__(self, encoder: nn.Module, num_classes: int, num_groups: int, mode: str = "mtmim",
                 embedding_size: int = 512, boundaries: Sequence[float] | None = None,
                 lambda_age: float = 0.1, lambda_mim: float = 1e-4, q_steps: int = 5,
                 q_lr: float = 1e-5, q_hidden: int = 512, logvar_bound: float = 7.0,
                 factorize_gain: float = 0.1, margin: str = "arcface", s: float = 64.0,
                 m: float | None = None, warn_negative_after: int = 50,
                 head_warmup_steps: int = 0, freeze_through: str | None = None,
                 freeze_bn: str = "off", l2sp: float = 0.0, encoder_lr: float | None = None,
                 activations: bool = False, replay_classes_from: int | None = None,
                 partial_fc: float = 0.0, seed: int = 0, mi_target: str = "features") -> None:
        super().__init__()
        if mi_target not in MI_TARGETS:
            raise MtmimError(f"--mi-target {mi_target}: choose from {', '.join(MI_TARGETS)}")
        self.mi_target = mi_target
        if mode not in MODES:
            raise MtmimError(f"--mode {mode}: choose from {', '.join(MODES)}")
        if num_groups < 1:
            raise MtmimError(f"--age-groups {num_groups}: must be >= 1")
        if encoder_lr is not None and encoder_lr <= 0:
            raise MtmimError(f"--encoder-lr {encoder_lr}: must be > 0")
        self.mode = mode
        self.encoder = encoder
        # Not a sub-module: it holds references into the encoder, whose state dict stays as is.
        self.plan = EncoderPlan(encoder, freeze_through=freeze_through, freeze_bn=freeze_bn,
                                warmup_steps=head_warmup_steps, l2sp=l2sp)
        self.encoder_lr = encoder_lr
        self.activations = activations     # inputs are the frozen trunk's cached outputs
        self.replay_classes_from = replay_classes_from
        if l2sp > 0:
            self.metric_names = (*self.metric_names, "l2sp")
        self.factorize = FactorizationUnit(embedding_size, init_gain=factorize_gain)
        self.id_head = make_id_head(margin, embedding_size, num_classes, s=s, m=m,
                                    partial_fc=partial_fc, seed=seed)
        self.age_head = nn.Linear(embedding_size, num_groups)
        # q: the paper's Gaussian q(x_age | x_id), or q(age group | x_id) for the age-group
        # variants of the penalty (models/club.py, AgeGroupQ, says why they exist).
        self.q = (CLUB(embedding_size, embedding_size, hidden=q_hidden, logvar_bound=logvar_bound)
                  if mi_target == "features" else AgeGroupQ(embedding_size, num_groups, q_hidden))
        b = torch.as_tensor(np.asarray(boundaries if boundaries is not None else [], np.float64),
                            dtype=torch.float64)
        if len(b) not in (0, num_groups - 1):
            raise MtmimError(f"{len(b)} age boundaries do not make {num_groups} groups")
        self.register_buffer("age_boundaries", b)
        self.lambda_age = lambda_age if mode in ("age", "mtmim") else 0.0
        self.lambda_mim = lambda_mim if mode == "mtmim" else 0.0
        self.q_steps = q_steps
        self.q_optimizer = torch.optim.Adam(self.q.parameters(), lr=q_lr)
        self.warn_negative_after = warn_negative_after
        self._negative_run = 0
        self._warned = False
        self._q_batch: tuple[Tensor, Tensor] | None = None

    # -- the main step ------------------------------------------------------------------
    def main_parameters(self) -> list[dict]:
        """Factorization and both heads (at the run's lr, plain weight decay), then the
        encoder's trainable parameters (at `encoder_lr` when given; no weight decay toward
        zero under L2-SP, which pulls them toward their initial values instead); q has its
        own optimiser. The encoder's group is there from the start, but during the head
        warm-up its parameters take no gradient, so the optimiser holds no state for them
        until their release. Heads come first so the logged lr is theirs."""
        heads = [p for n, p in self.named_parameters()
                 if not n.startswith(("q.", "encoder.")) and p.requires_grad]
        groups = [{"params": heads}]
        if self.plan.trainable:
            enc: dict[str, Any] = {"params": self.plan.trainable}
            if self.encoder_lr is not None:
                enc["lr"] = self.encoder_lr
            if self.plan.l2sp > 0:
                enc["weight_decay"] = 0.0
            groups.append(enc)
        return groups

    def begin_step(self, step: int) -> bool:
        self._q_batch = None      # q fits this step's (micro-)batches only, even after a skip
        changed = self.plan.begin_step(step)
        if changed:
            self.train(self.training)
        return changed

    def train(self, mode: bool = True) -> MTMIMObjective:
        super().train(mode)
        if mode:
            self.plan.set_modes()
        return self

    def encode(self, inputs: Tensor) -> Tensor:
        """x for a batch of images, or of the frozen trunk's activations when so built."""
        return self.plan.forward(inputs, self.activations)

    def groups_of(self, ages: Tensor) -> Tensor:
        """Age group per image, -1 where the age is unknown (NaN)."""
        a = ages.to(torch.float64)
        g = torch.bucketize(a, self.age_boundaries.to(a.device), right=True)
        return torch.where(torch.isfinite(a), g, torch.full_like(g, -1))

    def forward(self, images: Tensor, labels: Tensor, ages: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x_id, x_age = self.factorize(self.encode(images))
        l_id, accuracy = self.id_head.loss_and_accuracy(x_id, labels)

        groups = self.groups_of(ages)
        known = groups >= 0
        age_in = x_age if self.lambda_age > 0 else x_age.detach()
        age_logits = self.age_head(age_in).float()
        # The mean over the rows of known age in the global batch. DDP averages the ranks'
        # gradients, and ranks may hold different numbers of such rows (unknown ages, replay
        # rows), so each rank's sum is divided by the global count over the world size.
        n_known = D.all_reduce_sum(known.sum().to(age_logits.dtype).reshape(1))[0] / D.world_size()
        if bool(known.any()):
            l_age = F.cross_entropy(age_logits[known], groups[known], reduction="sum") / n_known
        else:  # no known age here: keep the head in the graph, contribute nothing
            l_age = age_logits.sum() * 0.0

        # CLUB over the global batch (gather_with_grad: the identity on a single process).
        # Replay rows stay out of it (and out of q's fit): the penalty is meant for the
        # cross-age data whose age the model is taught; replay rows, of unknown age, are
        # there to keep the identity features general.
        mi_on = self.lambda_mim > 0
        mi_id, mi_age = x_id, x_age
        if self.replay_classes_from is not None:
            target = labels < self.replay_classes_from
            mi_id, mi_age = x_id[target], x_age[target]
        g_id = D.gather_with_grad(mi_id if mi_on else mi_id.detach())
        if self.mi_target == "features":
            g_age = D.gather_with_grad(mi_age if mi_on else mi_age.detach())
            club = self.q.mi_upper(g_id, g_age)
        else:   # against the age group, on the rows of known age
            g_grp = D.all_gather_rows(groups if self.replay_classes_from is None
                                      else groups[labels < self.replay_classes_from])
            keep = g_grp >= 0
            g_id, g_age = g_id[keep], g_grp[keep]
            if len(g_age) == 0:
                club = g_id.sum() * 0.0
            elif self.mi_target == "age-group":
                club = self.q.mi_upper(g_id, g_age)
            else:
                club = self.q.lautum(g_id, g_age)
        q_batch = (g_id.detach().float(), g_age.detach() if self.mi_target != "features"
                   else g_age.detach().float())
        if self._q_batch is not None:   # --accumulate: q fits all of the step's micro-batches
            q_batch = (torch.cat([self._q_batch[0], q_batch[0]]),
                       torch.cat([self._q_batch[1], q_batch[1]]))
        self._q_batch = q_batch

        loss = l_id
        loss = loss + (self.lambda_age * l_age if self.lambda_age > 0 else _zero_valued(l_age))
        # In mtmim mode q's parameters receive a gradient here too; it is never applied (q's
        # optimiser zeroes it before its own steps). Other modes add CLUB with zero value.
        loss = loss + (self.lambda_mim * club if mi_on else _zero_valued(club))
        penalty = self.plan.penalty()
        if penalty is not None:
            loss = loss + penalty
        with torch.no_grad():
            if float(n_known) > 0:   # the loop averages ranks: scaled like l_age
                age_acc = (age_logits[known].argmax(1) == groups[known]).float().sum() / n_known
            else:
                age_acc = torch.tensor(float("nan"), device=l_id.device)
        self._track_sign(float(club.detach()))
        metrics = {"accuracy": accuracy, "l_id": l_id.detach(), "l_age": l_age.detach(),
                   "age_accuracy": age_acc, "club": club.detach()}
        if penalty is not None:
            metrics["l2sp"] = penalty.detach()
        return loss, metrics

    def _track_sign(self, club: float) -> None:
        """Warn once when the estimate stays negative: q is under-trained (a well-fitted q
        gives a non-negative CLUB in expectation)."""
        self._negative_run = self._negative_run + 1 if club < 0 else 0
        if (self.warn_negative_after and self._negative_run >= self.warn_negative_after
                and not self._warned and D.is_main()):
            self._warned = True
            warnings.warn(f"CLUB estimate negative for {self._negative_run} steps in a row: q is "
                          f"under-trained (raise --q-lr or --q-steps)", RuntimeWarning, stacklevel=2)

    # -- Algorithm 1's inner loop ----------------------------------------------------------
    def after_step(self) -> dict[str, float]:
        if self._q_batch is None:
            return {}
        if self.mi_target == "features":
            ll = train_q(self.q, self.q_optimizer, *self._q_batch, steps=self.q_steps)
        elif len(self._q_batch[1]):
            ll = train_group_q(self.q, self.q_optimizer, *self._q_batch, steps=self.q_steps)
        else:
            ll = float("nan")
        self._q_batch = None
        return {"q_loglik": ll, "q_lr": self.q_optimizer.param_groups[0]["lr"]}

    def on_lr_drop(self, factor: float) -> None:
        """The plateau rule divides q's lr too (the paper: both divided by 10)."""
        for g in self.q_optimizer.param_groups:
            g["lr"] *= factor

    def extra_state_dict(self) -> dict:
        return {"q_optimizer": self.q_optimizer.state_dict(), "negative_run": self._negative_run,
                "warned": self._warned}

    def load_extra_state_dict(self, d: dict) -> None:
        if "q_optimizer" in d:
            self.q_optimizer.load_state_dict(d["q_optimizer"])
        self._negative_run = int(d.get("negative_run", 0))
        self._warned = bool(d.get("warned", False))

    def identity_features(self, images: Tensor) -> Tensor:
        return self.factorize(self.encoder(images))[0]


# ---------------------------------------------------------------------------------------
