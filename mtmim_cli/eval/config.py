"""What `mtmim evaluate` was asked to do: `EvalConfig` (the CLI parses its options into one),
the model arguments, the checks that need no file, and the sentence describing the variant."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.flip import check_flip

PROTOCOLS = ("fgnet-loo", "morph-s1", "morph-s2", "cacd-map", "cacd-vs", "agedb30", "lfw",
             "calfw", "pairs")
VERIFICATION = ("cacd-vs", "agedb30", "lfw", "calfw", "pairs")
REFITS = ("none", "head", "full")


@dataclass
class ModelArg:
    label: str
    path: Path
    backbone: str | None = None


def parse_model_arg(text: str, backbone: str | None = None) -> ModelArg:
    """'[LABEL=]PATH' -> ModelArg; the label defaults to the file's stem."""
    label, sep, path = text.partition("=")
    if not sep:
        label, path = "", text
    p = Path(path)
    return ModelArg(label=label or p.stem, path=p, backbone=backbone)


@dataclass
class EvalConfig:
    protocol: str
    models: list[ModelArg]
    cache: Path | None = None
    pairs: Path | None = None          # .bin (insightface), .csv (path_a,path_b,same[,fold]), LFW .txt
    meta: Path | None = None           # CACD: csv path,year,test
    out: Path | None = None            # results.md (results.json, results.cmc.csv, ... beside it)
    flip: str = "concat"
    refit: str = "none"
    folds: int | None = None           # fgnet-loo grouped variant; None = exact (1002 rounds)
    shard: str | None = None
    rounds_dir: Path | None = None
    merge_only: bool = False
    reuse_stale: bool = False          # use stored rounds made by other code (tables flag them)
    seed: int = 0
    batch_size: int | None = None   # images per pass (None: features.images_per_pass)
    device: str = "cpu"
    max_rank: int = 20
    n_pairs: int = 6000                # generated pairs (pairs protocol without --pairs)
    min_gap: float = 0.0
    test_subjects: int | None = None
    train_subjects: int | None = None
    split_out: Path | None = None
    refit_options: dict = field(default_factory=dict)
    refit_modes: tuple[str, ...] = ()   # () = all three (or the mode refit_options names)
    allow_trained_on: bool = False     # score models that trained on test images (labelled so)
    features: bool = False             # also write <stem>.features.npz (x_id, x_age) beside out
    command: str = ""
    # Analyses across models and by age (eval.analysis):
    resample: str = "identity"         # bootstrap unit: identity or probe; fold (verification)
    resamples: int = 10_000
    age_edges: tuple[int, ...] = (0, 6, 11, 16, 21, 31)   # lower edges of the probe age groups
    gap_edges: tuple[int, ...] = (0, 6, 11, 21)           # lower edges of the age gap bins
    age_probe: bool = True             # age leakage probe of the identity features
    mi_steps: int = 0                  # InfoNCE estimator steps for factorized models (0: skipped)
    # fgnet-loo against distractors (eval.distractors):
    distractors: Path | None = None    # a cache of faces of other people
    distractor_counts: str | None = None   # "10,100,..." (None: powers of ten up to all)
    distractor_index: str = "auto"     # exact, ivf, hnsw, ivfpq; auto: eval.distractors.distractor_search


def check_config(cfg: EvalConfig) -> None:
    """The refusals that need no file: unknown protocol, flip or refit, refit outside FG-NET,
    no model, two models under one label, a protocol without the input it needs."""
    if cfg.protocol not in PROTOCOLS:
        raise MtmimError(f"--protocol {cfg.protocol}: choose from {', '.join(PROTOCOLS)}")
    check_flip(cfg.flip)
    if cfg.refit not in REFITS:
        raise MtmimError(f"--refit {cfg.refit}: choose from {', '.join(REFITS)}")
    if cfg.refit != "none" and cfg.protocol != "fgnet-loo":
        raise MtmimError(f"--refit {cfg.refit} applies to fgnet-loo only")
    if cfg.reuse_stale and cfg.refit == "none":
        raise MtmimError("--reuse-stale: applies to stored re-fit rounds (--refit head|full)")
    bad = [m for m in cfg.refit_modes if m not in ("baseline", "age", "mtmim")]
    if bad:
        raise MtmimError(f"--refit-modes {','.join(cfg.refit_modes)}: {bad[0]} is not one of "
                         "baseline, age, mtmim")
    if not cfg.models:
        raise MtmimError("no --model given")
    if cfg.features and cfg.out is None:
        raise MtmimError("--features: needs --out (<stem>.features.npz is written beside it)")
    if cfg.out is not None and Path(cfg.out).suffix == ".json":
        # <stem>.json is the manifest the results .md would overwrite
        raise MtmimError(f"--out {cfg.out}: give the results .md (its .json is written beside it)")
    labels = [m.label for m in cfg.models]
    if len(set(labels)) != len(labels):
        raise MtmimError(f"two models share a label ({', '.join(labels)}); name them LABEL=PATH")
    if cfg.resample not in ("identity", "probe", "fold"):
        raise MtmimError(f"--resample {cfg.resample}: choose identity, probe or fold")
    if cfg.resample == "fold" and cfg.protocol not in VERIFICATION:
        raise MtmimError(f"--resample fold: applies to verification protocols "
                         f"({', '.join(VERIFICATION)})")
    if cfg.resamples < 100:
        raise MtmimError(f"--resamples {cfg.resamples}: use at least 100")
    if cfg.mi_steps < 0:
        raise MtmimError(f"--mi-steps {cfg.mi_steps}: must be >= 0")
    if cfg.cache is None and not (cfg.protocol in VERIFICATION and cfg.pairs is not None
                                  and cfg.pairs.suffix == ".bin"):
        raise MtmimError(f"{cfg.protocol}: needs --cache")


def variant_text(cfg: EvalConfig, n_images: int | None = None, pairs: str = "") -> str:
    """One sentence saying how the figures were made (features, refit, rounds, and where
    verification pairs came from: `pairs`, from `inputs.pairs_origin_text`)."""
    parts = [f"features: image + mirror {cfg.flip}" if cfg.flip != "none" else "features: image only",
             "L2-normalised, cosine"]
    if cfg.protocol == "fgnet-loo":
        if cfg.refit == "none":
            parts.insert(0, "refit none (the given model, no fine-tuning per round; every image "
                            "ranked against all the others)")
        else:
            rounds = n_images if cfg.folds is None or (n_images and cfg.folds >= n_images) else cfg.folds
            kind = "exact leave-one-out" if rounds == n_images else f"grouped, {rounds} rounds"
            parts.insert(0, f"refit {cfg.refit} ({kind}; each round re-fit without its held-out "
                            "images, which are then ranked against all other images)")
    if pairs:
        parts.insert(0, pairs)
    return "; ".join(parts)
