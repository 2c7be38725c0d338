"""The validation hook: 10-fold verification accuracy on cross-age pairs of a held-out cache
(e.g. FG-NET), computed on the objective's identity features with mirror concatenation."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from mtmim_cli.data.cache import Cache
from mtmim_cli.eval.features import extract_features
from mtmim_cli.eval.metrics import tenfold_verification
from mtmim_cli.eval.pairs import cross_age_pairs
from mtmim_cli.train import distributed as D


class _IdentityView(nn.Module):
    """Presents `objective.identity_features` as a model with an `input_width`."""

    def __init__(self, objective: nn.Module, input_width: int) -> None:
        super().__init__()
        self.objective = objective
        self.input_width = input_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.objective.identity_features(x)


class PairValidator:
    def __init__(self, cache: str | os.PathLike | Cache, input_width: int, n_pairs: int = 3000,
                 seed: int = 0, min_gap: float = 0.0, flip: str = "concat",
                 batch_size: int | None = None, keep: np.ndarray | None = None) -> None:
        """`keep`: a record mask restricting the pairs (e.g. identities carved out of a
        training cache for validation)."""
        self.cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.input_width = input_width
        self.flip = flip
        self.batch_size = batch_size
        usable = self.cache.usable if keep is None else self.cache.usable & np.asarray(keep, bool)
        self.n_identities = len(np.unique(self.cache.identity[usable]))
        self.i, self.j, self.same = cross_age_pairs(self.cache.identity, self.cache.age, n_pairs,
                                                    seed, min_gap=min_gap, usable=usable)
        self.used, inverse = np.unique(np.r_[self.i, self.j], return_inverse=True)
        self.pos_i, self.pos_j = inverse[: len(self.i)], inverse[len(self.i):]

    @property
    def name(self) -> str:
        return f"{self.cache.path.name} ({len(self.same)} pairs of {self.n_identities} people)"

    def __call__(self, objective: nn.Module, device: torch.device | str = "cpu") -> dict:
        """Under torchrun every rank extracts the features of every world-th image and the
        ranks gather them: each does 1/world of the work, and all get the same result."""
        world, rank = D.world_size(), D.rank()
        mine = np.arange(rank, len(self.used), world)
        feats = extract_features(_IdentityView(objective, self.input_width), self.cache,
                                 self.used[mine], flip=self.flip, batch_size=self.batch_size,
                                 device=device)
        if world > 1:
            rows = D.all_gather_rows(torch.from_numpy(feats).to(device)).cpu().numpy()
            order = np.concatenate([np.arange(r, len(self.used), world) for r in range(world)])
            feats = np.empty_like(rows)
            feats[order] = rows
        scores = np.einsum("nd,nd->n", feats[self.pos_i], feats[self.pos_j])
        return tenfold_verification(scores, self.same, 10)
