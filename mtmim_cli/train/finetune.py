"""`mtmim finetune`: the encoder a run starts from and the run itself, on the settings
train/finetune_options.py resolves and checks (defaults, recipe, options), with the shared
training loop and MT-MIM's objective (train/mtmim_objective.py: the paper's three modes,
CLUB and q's alternating updates); WiSE interpolation, class-mean centres, and the heads
fitted on fixed features that the re-fits use."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mtmim_cli.data.groups import assign_groups, equal_frequency_groups
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.factorize import FactorizationUnit
from mtmim_cli.train import distributed as D
from mtmim_cli.train.config import TrainConfig
from mtmim_cli.train.finetune_options import AUTO_RECIPE, resolve_settings
from mtmim_cli.train.mtmim_objective import MTMIMObjective


def _load_encoder(init: str | os.PathLike | None, backbone: str | None,
                  embedding_size: int | None) -> tuple[nn.Module, str, int, int]:
    """Encoder from --init (our checkpoint, an insightface backbone.pth, the shared
    MobileFaceNet) or freshly built; returns (encoder, backbone, input_width, embedding_size)."""
    from mtmim_cli.models.backbones import build_backbone, default_embedding_size, input_width

    if init:
        from mtmim_cli.models.identity import load_identity_model

        model = load_identity_model(init, backbone)
        if embedding_size and embedding_size != model.embedding_size:
            raise MtmimError(f"{init}: a {model.embedding_size}-d encoder, not {embedding_size}-d")
        enc = model.encoder.train()
        return enc, model.meta["backbone"], model.input_width, model.embedding_size
    if not backbone:
        raise MtmimError("finetune: give --init (pretrained weights) or --backbone")
    dim = embedding_size or default_embedding_size(backbone)
    return build_backbone(backbone, dim), backbone, input_width(backbone), dim


def finetune(caches: Sequence[str | os.PathLike], init: str | os.PathLike | None,
             config: TrainConfig | dict[str, Any] | None = None, **options: Any) -> Path:
    """Fine-tune an encoder with MT-MIM (or the baseline/age ablations) on the caches; returns
    the run folder (model.pt holds the final weights with meta kind "finetune").

    `config` is a TrainConfig or a flat dict of TrainConfig fields and fine-tuning options
    (DEFAULTS); `options` override both, and a `recipe` (RECIPES) sits between the defaults
    and them. `exclude` lists record indices of the (single) training cache to leave out,
    e.g. a held-out test image."""
    from mtmim_cli.data.augment import Augment
    from mtmim_cli.data.dataset import CacheDataset
    from mtmim_cli.data.identity_lists import read_identity_list
    from mtmim_cli.train.lineage import run_record, saves_checkpoints
    from mtmim_cli.train.loop import train
    from mtmim_cli.train.transfer import TrainingSet, identity_mask, validation_identities

    cfg, o = resolve_settings(config, options)   # every check that needs no file, first
    if o["recipe"] == AUTO_RECIPE and o["auto"] is None:
        raise MtmimError("--recipe auto: a search over fine-tunes; run it through `mtmim "
                         "finetune` or mtmim_cli.orchestration.auto_recipe.auto_finetune")
    if o["auto_guard"] and o["recipe"] != AUTO_RECIPE:
        raise MtmimError("--auto-guard: applies to --recipe auto")
    device = D.init_from_env()   # before the heads: Partial FC splits its centres over the ranks
    torch.manual_seed(cfg.seed)  # a freshly built encoder: identical on every rank
    encoder, backbone, width, dim = _load_encoder(init, o["backbone"], o["embedding_size"])
    stage = _stage(encoder, o["freeze_through"])
    use_acts = bool(stage) and o["activation_cache"] != "off"
    augment = Augment.parse(o["augment"])
    if augment and use_acts:
        raise MtmimError("--augment: works on images, not on cached trunk activations; "
                         "add --activation-cache off to train a frozen trunk on images")
    replay = [str(p) for p in (o["replay"] or [])]
    base = CacheDataset([*caches, *replay], train=True, crop_width=width, seed=cfg.seed,
                        identities=o["identities"],
                        augment=augment)
    in_replay = base.cache_of >= len(caches)
    drop = np.zeros(len(base), bool)
    if o["exclude"] is not None and len(o["exclude"]):
        if len(caches) != 1:
            raise MtmimError("finetune: `exclude` (record indices) needs exactly one training cache")
        drop |= (base.cache_of == 0) & np.isin(base.record, np.asarray(o["exclude"], dtype=np.int64))
    if o["train_identities"]:
        drop |= ~in_replay & ~identity_mask(base, range(len(caches)),
                                            read_identity_list(o["train_identities"]),
                                            "--train-identities")
    if o["replay_identities"]:
        if not replay:
            raise MtmimError("--replay-identities: give --replay too")
        drop |= in_replay & ~identity_mask(base, range(len(caches), len(base.caches)),
                                           read_identity_list(o["replay_identities"]),
                                           "--replay-identities")
    val_labels = None
    if o["val_identities"]:
        val_labels = validation_identities(base, float(o["val_identities"]), cfg.seed, allowed=~drop)
        drop |= np.isin(base.labels, val_labels)
    dataset = TrainingSet(base, np.flatnonzero(~drop), replay=in_replay,
                          replay_ratio=float(o["replay_ratio"]) if replay else 0.0)
    ages = np.asarray(dataset.ages[: dataset.n_target], dtype=np.float64)
    try:
        boundaries = equal_frequency_groups(ages, int(o["age_groups"]))
    except ValueError as exc:
        raise MtmimError(f"{caches[0]}: age groups: {exc}") from None
    torch.manual_seed(cfg.seed)  # heads and q: identical on every rank
    objective = MTMIMObjective(
        encoder, dataset.num_classes, int(o["age_groups"]), mode=o["mode"], embedding_size=dim,
        boundaries=boundaries, lambda_age=o["lambda_age"], lambda_mim=o["lambda_mim"],
        q_steps=o["q_steps"], q_lr=o["q_lr"], q_hidden=o["q_hidden"],
        logvar_bound=o["logvar_bound"], factorize_gain=o["factorize_gain"], margin=o["margin"],
        s=o["s"], m=o["m"], warn_negative_after=o["warn_negative_after"], mi_target=o["mi_target"],
        head_warmup_steps=int(o["head_warmup_steps"]), freeze_through=stage,
        freeze_bn=o["freeze_bn"], l2sp=float(o["l2sp"]), encoder_lr=o["encoder_lr"],
        activations=use_acts, replay_classes_from=dataset.replay_classes_from if replay else None,
        partial_fc=float(o["partial_fc"] or 0.0), seed=cfg.seed)
    if use_acts:
        from mtmim_cli.train.transfer import trunk_activations
        folder = o["activation_cache"] or Path(cfg.out) / "activations"
        acts, _ = trunk_activations(objective.plan, base, folder, o["activation_dtype"],
                                    device=device, progress=cfg.progress)
        dataset.use_activations(acts)
    resuming = cfg.resume and (Path(cfg.out) / "checkpoints" / "last.pt").exists()
    if o["init_centres"] != "random" and not resuming:   # a resumed run loads its centres
        _init_centres(objective, dataset, mirror=o["init_centres"] == "mean-mirror",
                      device=device, progress=cfg.progress)
    cfg.extra = {"caches": [str(Path(c)) for c in caches], "init": str(init) if init else None,
                 **{k: v for k, v in o.items() if k != "exclude"},
                 "freeze_through": stage, "augment": augment.describe(),
                 "exclude_n": 0 if o["exclude"] is None else len(o["exclude"]),
                 "exclude_sha": _digest(o["exclude"])}
    if cfg.early_stop and not cfg.val_every:   # early stopping needs a score every epoch
        cfg.val_every = max(1, _epoch_steps(dataset, cfg))
    validator = _validator(o, base, val_labels, width, cfg.seed)
    counts = np.bincount(assign_groups(ages, boundaries)[np.isfinite(ages)],
                         minlength=int(o["age_groups"]))
    meta = {"kind": "finetune", "backbone": backbone, "input_width": width, "embedding_size": dim,
            "factorize_dim": dim, "age_groups": [float(b) for b in boundaries],
            "age_group_counts": [int(c) for c in counts], "mode": o["mode"],
            "num_classes": int(dataset.num_classes), "margin": o["margin"], "s": float(o["s"]),
            "m": objective.id_head.extra_repr(), "init": str(init) if init else "",
            # the encoder through this stage is its init's, bit for bit (eval/trunk_memo.py)
            "frozen_through": stage}
    if saves_checkpoints():
        meta["trained_on"] = run_record(dataset, init, o["exclude"])
    if o["auto"] is not None:   # the search that chose this run's settings, in its one write
        meta["auto"] = o["auto"]
    wise = float(o["wise"])   # in (0, 1]: resolve_settings checked it
    # WiSE is applied to model.pt's state in memory, before its one write: a run killed at
    # any point leaves model.pt absent or interpolated, never the trained weights under the
    # WiSE label. Only model.pt carries the label; last.pt and best.pt hold trained weights.
    start = _wise_start(objective) if wise < 1.0 else None
    transform = None if start is None else partial(wise_state, start=start, alpha=wise)
    result = train(objective, dataset, cfg, meta=meta, validator=validator,
                   model_transform=transform)
    return Path(result.run_dir)


def _wise_start(objective: MTMIMObjective) -> dict[str, Tensor]:
    """The encoder's and factorization's weights before training (the other end of WiSE)."""
    return {k: v.detach().clone() for k, v in objective.state_dict().items()
            if k.startswith(("encoder.", "factorize.")) and v.is_floating_point()}


def wise_state(state: dict[str, Any], *, start: dict[str, Tensor], alpha: float) -> dict[str, Any]:
    """A checkpoint state whose encoder and factorization are (1 - alpha) * start + alpha *
    trained, labelled meta["wise"] = alpha: weight-space ensembling with the initial model
    (WiSE-FT, Wortsman et al., CVPR 2022), which keeps most of a small-set fine-tune's gain
    on the target faces while giving back what it cost on general faces. The heads stay as
    trained (only x_id is used at test). The loop applies it to model.pt alone, so
    checkpoints/last.pt keeps the trained weights and a resumed run interpolates again."""
    obj = dict(state["objective"])
    for k, v0 in start.items():
        obj[k] = (1.0 - alpha) * v0.to(obj[k].device) + alpha * obj[k]
    return {**state, "meta": {**state["meta"], "wise": alpha}, "objective": obj}


def _stage(encoder: nn.Module, name: str | None) -> str | None:
    """--freeze-through: a stage name, "last:K" = all but the encoder's last K stages (the
    last K parametric layers of an imported ONNX encoder train), or "auto" = "last:2"
    (MobileFaceNet: through conv2, so linear7 + linear1 train; iresnet: through bn2, so fc
    + features train)."""
    if not name or name == "none":
        return None
    if name != "auto" and not name.startswith("last:"):
        return name
    if not hasattr(encoder, "stages"):
        raise MtmimError(f"--freeze-through {name}: this encoder has no named stages")
    stages = encoder.stages()
    k = 2 if name == "auto" else name[len("last:"):]
    try:
        k = int(k)
    except ValueError:
        raise MtmimError(f"--freeze-through {name}: expected last:K with K a whole number") from None
    if not 1 <= k < len(stages):
        raise MtmimError(f"--freeze-through {name}: K must be 1..{len(stages) - 1} "
                         f"(this encoder has {len(stages)} stages)")
    return stages[-k - 1][0]


def _epoch_steps(dataset, cfg: TrainConfig) -> int:
    sampler = dataset.make_sampler(cfg.batch_size, D.world_size(), D.rank(), cfg.seed)
    return sampler.steps if sampler is not None else len(dataset) // cfg.batch_size


def _validator(o: dict[str, Any], base, val_labels: np.ndarray | None, width: int, seed: int):
    """Pairs of a held-out cache (--val-cache) or of the carved-out identities (--val-identities)."""
    from mtmim_cli.train.validate import PairValidator

    if o["val_cache"] and val_labels is not None:
        raise MtmimError("--val-cache and --val-identities: choose one")
    if o["val_cache"]:
        return PairValidator(o["val_cache"], width, n_pairs=o["val_pairs"], seed=seed)
    if val_labels is None:
        return None
    cache = base.caches[0]
    records = base.record[(base.cache_of == 0) & np.isin(base.labels, val_labels)]
    keep = np.zeros(len(cache), bool)
    keep[records] = True
    return PairValidator(cache, width, n_pairs=o["val_pairs"], seed=seed, keep=keep)


def _init_centres(objective: MTMIMObjective, dataset, mirror: bool, device: torch.device,
                  progress: bool) -> None:
    """Margin-head class centres at each class's mean x_id under the initial encoder."""
    from mtmim_cli.train.transfer import class_mean_centres

    was = objective.training
    objective.to(device).eval()
    centres, has = class_mean_centres(lambda x: objective.factorize(objective.encode(x))[0],
                                      dataset, mirror, device=device, progress=progress)
    objective.train(was)
    with torch.no_grad():
        w = objective.id_head.weight
        a, b = getattr(w, "row_shard", (0, len(w)))[:2]   # Partial FC: this rank's rows
        rows = torch.from_numpy(has[a:b])
        w[rows.to(w.device)] = centres[a:b][rows].to(w.device, w.dtype)


def _digest(values: Sequence[int] | None) -> str:
    if values is None:
        return ""
    import hashlib
    return hashlib.sha1(",".join(str(int(v)) for v in sorted(values)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
class _FeatureEncoder(nn.Identity):
    """The 'encoder' of feature-level fitting: features are the encoder's outputs already."""


def fit_heads_on_features(features: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                          ages: Tensor | np.ndarray, *, mode: str = "mtmim", age_groups: int = 8,
                          boundaries: Sequence[float] | None = None, epochs: int = 20,
                          batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                          **objective_options: Any) -> FactorizationUnit:
    """Fit the factorization unit and the heads (and q) on fixed encoder features x (N, d),
    raw (not L2-normalised): MTMIMObjective's own step with the encoder left out, so a
    leave-one-out round re-fits in well under a second. Returns the fitted unit in eval mode
    (x_id = unit(x)[0]). Labels may be any integers (re-indexed here); ages NaN = unknown."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    lab = np.unique(np.asarray(labels), return_inverse=True)[1].astype(np.int64)
    y = torch.from_numpy(lab)
    a = torch.as_tensor(np.asarray(ages, dtype=np.float64), dtype=torch.float32)
    if boundaries is None:
        try:
            boundaries = equal_frequency_groups(a.numpy(), age_groups)
        except ValueError as exc:
            raise MtmimError(f"features: age groups: {exc}") from None
    torch.manual_seed(seed)
    obj = MTMIMObjective(_FeatureEncoder(), int(lab.max()) + 1, age_groups, mode=mode,
                         embedding_size=x.shape[1], boundaries=boundaries,
                         **{"warn_negative_after": 0, **objective_options})
    opt = torch.optim.Adam(obj.main_parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    bs = min(batch_size, n)
    obj.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - bs + 1, bs):
            idx = perm[s:s + bs]
            loss, _ = obj(x[idx], y[idx], a[idx])
            if not math.isfinite(float(loss.detach())):
                raise MtmimError(f"features: loss became {float(loss.detach())} while fitting the heads")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            obj.after_step()
    return obj.factorize.eval()
