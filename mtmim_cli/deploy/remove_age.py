"""`mtmim remove-age`: a model file whose features have the within-identity age subspace
projected out (eval/age_subspace.py), fitted on the dated photos of a labelled cache.

The new file is the old one plus an `age_subspace` entry (the basis, how it was fitted, and
`fitted_on`: the digests of the faces it was fitted on, in data/provenance.py's record
format, so `evaluate` refuses to score it on them as it refuses a model trained on them);
every command that loads a model to compare faces (evaluate, embed, verify, export) applies the
projection after the encoder (and the factorization unit). As a fine-tuning init it counts as
its encoder only: a fine-tuned model is a new feature space and needs its own fit.
A plain encoder state dict is wrapped as `{'net_state_dict': ...}` so that it stays readable.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError


def remove_age(model_path: str | os.PathLike, cache_path: str | os.PathLike,
               out: str | os.PathLike, *, edges: Sequence[int],
               identities: Sequence[str] | None = None, backbone: str | None = None,
               batch_size: int | None = None, progress: bool = False) -> dict:
    """Fit the age subspace of `model_path`'s features on `cache_path` (its usable, dated
    photos; only `identities` when given; image and mirror views alike), write the model with
    it to `out` (atomically), and return what was done, with the cross-validated age probe
    of the fitting photos' features before and after."""
    import torch

    from mtmim_cli.atomic import atomic_write
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.data.identity_lists import listed_labels
    from mtmim_cli.data.provenance import training_record
    from mtmim_cli.eval.age_subspace import fit_age_subspace, remove_subspace
    from mtmim_cli.eval.features import combine_views, extract_views
    from mtmim_cli.eval.leakage import age_probe
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.models.weights_io import load_weights_file

    model_path, cache_path, out = Path(model_path), Path(cache_path), Path(out)
    obj = load_weights_file(model_path, backbone)
    if isinstance(obj, dict) and "age_subspace" in obj:
        raise MtmimError(f"{model_path}: already has an age subspace removed; start from the "
                         "model without it")
    model = load_identity_model(model_path, backbone)
    cache = Cache(cache_path)
    rows = cache.usable & np.isfinite(cache.age)
    if identities is not None:
        rows &= listed_labels(cache.identity_names, identities)[cache.identity]
    rows = np.flatnonzero(rows)
    ident, age = cache.identity[rows], cache.age[rows]
    n_ids = len(np.unique(ident))
    if n_ids < 2:
        raise MtmimError(f"{cache_path}: {len(rows)} dated photos of {n_ids} identities "
                         "selected; the age subspace needs several people photographed at "
                         "several ages")
    a, b = extract_views(model, cache, rows, batch_size=batch_size, progress=progress,
                         description="features")
    basis = fit_age_subspace(np.concatenate([a, b]), np.tile(ident, 2), np.tile(age, 2), edges)
    if basis.shape[1] == 0:
        raise MtmimError(f"{cache_path}: no identity has photos in two age groups "
                         f"(edges {', '.join(map(str, edges))}); nothing to remove")
    before = age_probe(combine_views(a, b, "concat"), age, ident, edges=edges)
    after = age_probe(combine_views(remove_subspace(a, basis), remove_subspace(b, basis),
                                    "concat"), age, ident, edges=edges)
    info = {"dims": int(basis.shape[1]), "edges": [int(e) for e in edges],
            "cache": str(cache_path), "photos": int(len(rows)), "identities": int(n_ids),
            "source": str(model_path)}
    if isinstance(obj, dict) and not ({"net_state_dict", "objective"} & set(obj)):
        obj = {"net_state_dict": obj}
    fitted_on = training_record([cache], [rows], [[]], init=None)
    obj = {**obj, "age_subspace": {**info, "fitted_on": fitted_on,
                                   "basis": torch.from_numpy(basis.astype(np.float32))}}
    with atomic_write(out) as tmp:
        torch.save(obj, tmp)
    return {**info, "out": str(out), "feature_dim": int(basis.shape[0]),
            "r2_before": before["age_r2"], "r2_after": after["age_r2"],
            "group_acc_before": before["age_group_accuracy"],
            "group_acc_after": after["age_group_accuracy"],
            "group_chance": before["age_group_chance"]}
