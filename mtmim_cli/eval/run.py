"""`mtmim evaluate` as a library function: load inputs and models, run one protocol for
each model, write the tables. The CLI only parses options into an `EvalConfig`.

Models load through `mtmim_cli.models.identity.load_identity_model` (any of our
checkpoints, the shared MobileFaceNet, an insightface backbone). FG-NET's `--refit head`
and `--refit full` re-fit per round with the fine-tuning issue's `fit_heads_on_features`
and `finetune`; their rounds are stored as they finish, so a killed run resumes and shards
(`--shard I/N`) run by separate processes merge into one result.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mtmim_cli import __version__
from mtmim_cli.atomic import atomic_write_text
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval import protocols as P

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
    out: Path | None = None            # results.md (results.json, cmc.csv, roc.csv beside it)
    flip: str = "concat"
    refit: str = "none"
    folds: int | None = None           # fgnet-loo grouped variant; None = exact (1002 rounds)
    shard: str | None = None
    rounds_dir: Path | None = None
    merge_only: bool = False
    seed: int = 0
    batch_size: int = 128
    device: str = "cpu"
    max_rank: int = 20
    n_pairs: int = 6000                # generated pairs (pairs protocol without --pairs)
    min_gap: float = 0.0
    test_subjects: int | None = None
    train_subjects: int | None = None
    split_out: Path | None = None
    refit_options: dict = field(default_factory=dict)
    command: str = ""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _default_loader(path: Path, backbone: str | None):
    from mtmim_cli.models.identity import load_identity_model

    return load_identity_model(path, backbone=backbone)


# Tests swap this for a loader of small modules; everything else goes through B's loader.
MODEL_LOADER: Callable = _default_loader


def _load_model(m: ModelArg, device: str):
    if not m.path.exists():
        raise MtmimError(f"{m.path}: no such model file")
    return MODEL_LOADER(m.path, m.backbone).to(device).eval()


def _variant_text(cfg: EvalConfig, n_images: int | None = None) -> str:
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
    return "; ".join(parts)


# ---------------------------------------------------------------- FG-NET
def _fgnet(cfg: EvalConfig, cache, model_arg: ModelArg, progress: bool) -> dict:
    from mtmim_cli.eval.features import extract_features, extract_views

    idx = np.flatnonzero(cache.usable)
    ident = cache.identity[idx]
    n_all = len(cache)
    model = _load_model(model_arg, cfg.device)
    extra = {"images_total": n_all, "images_without_face": int(n_all - len(idx))}
    if cfg.refit == "none":
        feats = extract_features(model, cache, idx, cfg.flip, cfg.batch_size, device=cfg.device,
                                 progress=progress)
        m = P.identification(feats, ident, max_rank=cfg.max_rank)
    else:
        rounds = P.loo_rounds(len(idx), cfg.folds, cfg.seed)
        store = P.RoundStore(_rounds_dir(cfg, model_arg), _round_config(cfg, cache, model_arg))
        if cfg.refit == "head":
            encoder = getattr(model, "encoder", model)  # re-fit starts from encoder features x
            f, ff = _stored_views(store.folder / "views.npz", lambda: extract_views(
                encoder, cache, idx, mirror=cfg.flip != "none", batch_size=cfg.batch_size,
                device=cfg.device, progress=progress))
            round_fn = _head_round_fn(cfg, f, ff, ident, cache.age[idx])
        else:
            round_fn = _full_round_fn(cfg, cache, idx, ident, model_arg, progress)
        t0 = time.perf_counter()
        done = store.done() if cfg.merge_only else P.run_rounds(
            rounds, round_fn, store, P.parse_shard(cfg.shard), progress,
            f"{model_arg.label}: refit {cfg.refit}")
        if P.parse_shard(cfg.shard)[1] > 1 and len(done) < len(rounds):
            return {"partial": True, "rounds_done": len(done), "rounds": len(rounds),
                    "wall_seconds": time.perf_counter() - t0, **extra}
        m = P.merge_rounds(done, len(rounds), len(idx), cfg.max_rank)
        m["rounds_dir"] = str(store.folder)
    # Photos without a face cannot be ranked: count them as failures for the all-image figure.
    m["rank1_all_images"] = m["rank1"] * len(idx) / n_all if n_all else float("nan")
    return {**m, **extra}


def _stored_views(path: Path, compute: Callable[[], tuple[np.ndarray, np.ndarray | None]]
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Encoder features of a re-fit run, kept in its rounds folder (whose config pins the
    model and cache checksums) so resumed runs and later shards skip the extraction."""
    if path.exists():
        with np.load(path) as z:
            return z["f"], (z["ff"] if "ff" in z.files else None)
    f, ff = compute()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, f=f, **({"ff": ff} if ff is not None else {}))
    os.replace(tmp, path)
    return f, ff


def _rounds_dir(cfg: EvalConfig, m: ModelArg) -> Path:
    if cfg.rounds_dir is not None:
        return Path(cfg.rounds_dir) / m.label
    base = cfg.out.parent if cfg.out else Path(".")
    folds = "exact" if cfg.folds is None else f"k{cfg.folds}"
    return base / "rounds" / f"{cfg.protocol}-{cfg.refit}-{folds}-{m.label}"


def _round_config(cfg: EvalConfig, cache, m: ModelArg) -> dict:
    return {"protocol": cfg.protocol, "refit": cfg.refit, "folds": cfg.folds, "seed": cfg.seed,
            "flip": cfg.flip, "cache_sha256": sha256_file(cache.path),
            "model_sha256": sha256_file(m.path), "refit_options": cfg.refit_options}


def _head_round_fn(cfg: EvalConfig, f: np.ndarray, ff: np.ndarray | None, ident: np.ndarray,
                   age: np.ndarray) -> Callable[[int, np.ndarray], dict]:
    try:
        from mtmim_cli.train.finetune import fit_heads_on_features
    except ImportError as exc:
        raise MtmimError(f"--refit head needs mtmim_cli.train.finetune.fit_heads_on_features "
                         f"(not available: {exc})") from None
    import torch

    from mtmim_cli.eval.features import combine_views

    opts = dict(cfg.refit_options)

    def round_fn(r: int, held: np.ndarray) -> dict:
        train = np.ones(len(f), bool)
        train[held] = False
        # Both views train the heads, as the random flip does in image training.
        x = f[train] if ff is None else np.concatenate([f[train], ff[train]])
        reps = 1 if ff is None else 2
        torch.manual_seed(cfg.seed * 100_003 + r)
        try:
            unit = fit_heads_on_features(
                torch.from_numpy(x), torch.from_numpy(np.tile(ident[train], reps)),
                torch.from_numpy(np.tile(age[train], reps)),
                **{**opts, "seed": cfg.seed * 100_003 + r})
        except TypeError as exc:  # an option fit_heads_on_features does not know
            raise MtmimError(f"--refit-options: {exc}") from None
        with torch.no_grad():
            xid = unit(torch.from_numpy(f))[0].numpy()
            xid_f = unit(torch.from_numpy(ff))[0].numpy() if ff is not None else None
        feats = combine_views(xid, xid_f, cfg.flip)
        return P.rank_held_out(feats, ident, held)

    return round_fn


def _full_round_fn(cfg: EvalConfig, cache, idx: np.ndarray, ident: np.ndarray, m: ModelArg,
                   progress: bool) -> Callable[[int, np.ndarray], dict]:
    try:
        from mtmim_cli.train.finetune import finetune
    except ImportError as exc:
        raise MtmimError(f"--refit full needs mtmim_cli.train.finetune.finetune "
                         f"(not available: {exc})") from None
    from mtmim_cli.eval.features import extract_features

    base = _rounds_dir(cfg, m) / "runs"

    def round_fn(r: int, held: np.ndarray) -> dict:
        run = base / f"round-{r:04d}"
        exclude = idx[held]  # cache record indices left out of this round's training
        # resume=True: a round killed mid-training continues from its last checkpoint.
        # progress=False: rich allows one live display, and the rounds bar is it.
        run_dir = finetune([cache.path], m.path, {**cfg.refit_options, "out": str(run),
                                                  "exclude": exclude.tolist(), "seed": cfg.seed,
                                                  "progress": False, "resume": True})
        model = _load_model(ModelArg(m.label, _final_checkpoint(Path(run_dir)), None), cfg.device)
        feats = extract_features(model, cache, idx, cfg.flip, cfg.batch_size, device=cfg.device)
        return P.rank_held_out(feats, ident, held)

    return round_fn


def _final_checkpoint(run_dir: Path) -> Path:
    for name in ("model.pt", "final.pt"):
        if (run_dir / name).exists():
            return run_dir / name
    raise MtmimError(f"{run_dir}: fine-tuning left no model.pt")


# ---------------------------------------------------------------- MORPH / CACD / pairs
def _morph(cfg: EvalConfig, cache, model_arg: ModelArg, split: dict, progress: bool) -> dict:
    from mtmim_cli.eval.features import extract_features

    probe, gallery, used = P.largest_gap_pairs(cache.identity, np.where(cache.usable, cache.age, np.nan),
                                               split["test"])
    idx = np.unique(np.r_[probe, gallery])
    model = _load_model(model_arg, cfg.device)
    sub = extract_features(model, cache, idx, cfg.flip, cfg.batch_size, device=cfg.device,
                           progress=progress)
    feats = np.zeros((len(cache), sub.shape[1]), np.float32)
    feats[idx] = sub
    masked_age = np.where(cache.usable, cache.age, np.nan)
    return P.morph_rank1(feats, cache.identity, masked_age, split["test"], cfg.max_rank)


def read_cacd_meta(path: Path, cache) -> tuple[np.ndarray, np.ndarray]:
    """CSV with columns path,year,test (test: 1 for the 120 test celebrities), joined to the
    cache by its `path` field. Returns (year per record, test mask); unmatched records get
    year 0 and are left out."""
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    pos = {p: k for k, p in enumerate(cache.paths)}
    year = np.zeros(len(cache), np.int64)
    test = np.zeros(len(cache), bool)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "year", "test"} <= set(reader.fieldnames):
            raise MtmimError(f"{path}: needs the columns path,year,test")
        for n, row in enumerate(reader, 2):
            k = pos.get(row["path"])
            if k is None:
                continue
            try:
                year[k] = int(row["year"])
                test[k] = row["test"].strip().lower() in ("1", "true", "yes")
            except ValueError:
                raise MtmimError(f"{path}: line {n}: year must be an integer") from None
    return year, test & cache.usable


def _cacd(cfg: EvalConfig, cache, model_arg: ModelArg, progress: bool) -> dict:
    from mtmim_cli.eval.features import extract_features

    if cfg.meta is None:
        raise MtmimError("cacd-map needs --meta (CSV: path,year,test)")
    year, test = read_cacd_meta(cfg.meta, cache)
    idx = np.flatnonzero(test & (year >= 2004) & (year <= 2013))
    model = _load_model(model_arg, cfg.device)
    sub = extract_features(model, cache, idx, cfg.flip, cfg.batch_size, device=cfg.device,
                           progress=progress)
    return P.cacd_map(sub, cache.identity[idx], year[idx], np.ones(len(idx), bool))


def read_pair_csv(path: Path, cache) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """CSV with columns path_a,path_b,same[,fold]; paths as stored in the cache."""
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    pos = {p: k for k, p in enumerate(cache.paths)}
    a, b, same, fold = [], [], [], []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if not {"path_a", "path_b", "same"} <= cols:
            raise MtmimError(f"{path}: needs the columns path_a,path_b,same[,fold]")
        for n, row in enumerate(reader, 2):
            for key in ("path_a", "path_b"):
                if row[key] not in pos:
                    raise MtmimError(f"{path}: line {n}: {row[key]} is not in {cache.path}")
                if not cache.usable[pos[row[key]]]:
                    raise MtmimError(f"{path}: line {n}: {row[key]} has no aligned face in "
                                     f"{cache.path} (re-align with --on-miss center)")
            a.append(pos[row["path_a"]])
            b.append(pos[row["path_b"]])
            same.append(row["same"].strip().lower() in ("1", "true", "yes"))
            if "fold" in cols:
                fold.append(int(row["fold"]))
    if not a:
        raise MtmimError(f"{path}: no pairs")
    return (np.array(a), np.array(b), np.array(same, bool),
            np.array(fold) if "fold" in cols else None)


def read_lfw_pairs(path: Path, cache) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """LFW's pairs.txt: a header `folds n`, then per fold n lines `name i j` (same person)
    and n lines `name1 i name2 j` (different). Photos are found in the cache by the path
    ending `name/name_000i.jpg` (the folder layout `align --format folder` stores)."""
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    try:
        folds, per = int(lines[0][0]), int(lines[0][1])
    except (IndexError, ValueError):
        raise MtmimError(f"{path}: first line must be '<folds> <pairs per class>'") from None
    if len(lines) - 1 != 2 * folds * per:
        raise MtmimError(f"{path}: {len(lines) - 1} pair lines, header promises {2 * folds * per}")
    pos = {}
    for k, p in enumerate(cache.paths):
        parts = p.replace("\\", "/").split("/")
        pos["/".join(parts[-2:])] = k

    def find(name: str, num: str, n: int) -> int:
        key = f"{name}/{name}_{int(num):04d}.jpg"
        if key not in pos:
            raise MtmimError(f"{path}: line {n}: {key} is not in {cache.path}")
        if not cache.usable[pos[key]]:
            raise MtmimError(f"{path}: line {n}: {key} has no aligned face in {cache.path}")
        return pos[key]

    a, b, same = [], [], []
    for n, f in enumerate(lines[1:], 2):
        if len(f) == 3:
            a.append(find(f[0], f[1], n))
            b.append(find(f[0], f[2], n))
            same.append(True)
        elif len(f) == 4:
            a.append(find(f[0], f[1], n))
            b.append(find(f[2], f[3], n))
            same.append(False)
        else:
            raise MtmimError(f"{path}: line {n}: expected 'name i j' or 'name1 i name2 j'")
    return np.array(a), np.array(b), np.array(same), folds


def _pairs_input(cfg: EvalConfig, cache):
    """(image source, i, j, same, folds) for the verification protocols."""
    if cfg.pairs is not None and cfg.pairs.suffix == ".bin":
        from mtmim_cli.data.insightface import decode_pair_images, load_pair_bin

        pb = load_pair_bin(cfg.pairs)
        images = decode_pair_images(pb, str(cfg.pairs))
        n = len(pb)
        return images, np.arange(0, 2 * n, 2), np.arange(1, 2 * n, 2), pb.issame, 10
    if cache is None:
        raise MtmimError(f"{cfg.protocol}: needs --pairs FILE.bin, or --cache with --pairs FILE.csv "
                         "(or --cache alone to draw cross-age pairs)")
    if cfg.pairs is not None and cfg.pairs.suffix == ".txt":
        i, j, same, folds = read_lfw_pairs(cfg.pairs, cache)
        return cache, i, j, same, folds
    if cfg.pairs is not None:
        i, j, same, folds = read_pair_csv(cfg.pairs, cache)
        return cache, i, j, same, (folds if folds is not None else 10)
    i, j, same = _generated_pairs(cfg, cache)
    return cache, i, j, same, 10


def _generated_pairs(cfg: EvalConfig, cache):
    from mtmim_cli.eval.pairs import cross_age_pairs

    return cross_age_pairs(cache.identity, cache.age, cfg.n_pairs, cfg.seed, min_gap=cfg.min_gap,
                           usable=cache.usable)


def _verify(cfg: EvalConfig, source, i, j, same, folds, model_arg: ModelArg,
            progress: bool) -> dict:
    from mtmim_cli.eval.features import extract_features

    used, inv = np.unique(np.r_[i, j], return_inverse=True)
    model = _load_model(model_arg, cfg.device)
    feats = extract_features(model, source, used, cfg.flip, cfg.batch_size, device=cfg.device,
                             progress=progress)
    return P.verification(feats[inv[:len(i)]], feats[inv[len(i):]], same, folds)


# ---------------------------------------------------------------- entry
def evaluate(cfg: EvalConfig, progress: bool = True,
             echo: Callable[[str], None] | None = None) -> dict:
    """Run `cfg.protocol` for every model; write the tables when `cfg.out` is set.
    Returns the results payload (what results.json holds)."""
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.tables import markdown_table, write_results

    say = echo or (lambda s: None)
    if cfg.protocol not in PROTOCOLS:
        raise MtmimError(f"--protocol {cfg.protocol}: choose from {', '.join(PROTOCOLS)}")
    if cfg.refit not in REFITS:
        raise MtmimError(f"--refit {cfg.refit}: choose from {', '.join(REFITS)}")
    if cfg.refit != "none" and cfg.protocol != "fgnet-loo":
        raise MtmimError(f"--refit {cfg.refit} applies to fgnet-loo only")
    if not cfg.models:
        raise MtmimError("no --model given")
    labels = [m.label for m in cfg.models]
    if len(set(labels)) != len(labels):
        raise MtmimError(f"two models share a label ({', '.join(labels)}); name them LABEL=PATH")
    cache = Cache(cfg.cache) if cfg.cache is not None else None
    if cache is None and not (cfg.protocol in VERIFICATION and cfg.pairs is not None
                              and cfg.pairs.suffix == ".bin"):
        raise MtmimError(f"{cfg.protocol}: needs --cache")

    inputs = []
    for p in [cfg.cache, cfg.pairs, cfg.meta]:
        if p is not None:
            if not Path(p).exists():
                raise MtmimError(f"{p}: no such file")
            inputs.append({"path": str(p), "sha256": sha256_file(Path(p)),
                           "bytes": Path(p).stat().st_size})

    extra: dict = {}
    split = None
    if cfg.protocol in ("morph-s1", "morph-s2"):
        ident_usable = cache.identity[cache.usable]
        split = P.morph_split(ident_usable, cfg.protocol, cfg.seed, cfg.test_subjects,
                              cfg.train_subjects)
        split["test_names"] = [cache.identity_names[k] for k in split["test"]]
        split["train_names"] = [cache.identity_names[k] for k in split["train"]]
        split_path = cfg.split_out or ((cfg.out.parent if cfg.out else Path(".")) /
                                       f"{cfg.protocol}-split-seed{cfg.seed}.json")
        atomic_write_text(split_path, json.dumps(split, indent=1) + "\n")
        extra["split_file"] = str(split_path)
        say(f"subject split written to {split_path} ({len(split['train'])} train, "
            f"{len(split['test'])} test)")
    pair_input = _pairs_input(cfg, cache) if cfg.protocol in VERIFICATION else None

    rows, models_info = [], []
    for m in cfg.models:
        t0 = time.perf_counter()
        if cfg.protocol == "fgnet-loo":
            metrics = _fgnet(cfg, cache, m, progress)
        elif split is not None:
            metrics = _morph(cfg, cache, m, split, progress)
        elif cfg.protocol == "cacd-map":
            metrics = _cacd(cfg, cache, m, progress)
        else:
            metrics = _verify(cfg, *pair_input, m, progress)
        metrics["wall_seconds"] = round(time.perf_counter() - t0, 2)
        rows.append({"model": m.label, "metrics": metrics})
        models_info.append({"label": m.label, "path": str(m.path), "backbone": m.backbone,
                            "sha256": sha256_file(m.path)})
        say(_summary_line(cfg.protocol, m.label, metrics))

    n_images = int(cache.usable.sum()) if cache is not None else None
    payload = {
        "tool": "mtmim", "tool_version": __version__, "command": cfg.command,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"python": sys.version.split()[0], "platform": platform.platform(),
                 "cpus": os.cpu_count()},
        "protocol": cfg.protocol, "variant_text": _variant_text(cfg, n_images),
        "variant": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                    if k not in ("models", "command", "out")},
        "inputs": inputs, "models": models_info, "results": rows, **extra,
    }
    partial = any(r["metrics"].get("partial") for r in rows)
    if cfg.out is not None and not partial:
        paths = write_results(cfg.out, payload)
        say(f"wrote {paths['md']}, {paths['json']}, {paths['cmc'].name}, {paths['roc'].name}")
    if not partial:
        say(markdown_table(cfg.protocol, rows, payload["variant_text"]))
    return payload


def _summary_line(protocol: str, label: str, m: dict) -> str:
    if m.get("partial"):
        return (f"{label}: this shard's rounds done ({m['rounds_done']}/{m['rounds']} rounds "
                "stored); run the other shards, then rerun without --shard to merge")
    secs = f" in {m['wall_seconds']:.1f} s"
    if "rank1" in m:
        return f"{label}: rank-1 {100 * m['rank1']:.2f}% over {m['queries']} queries{secs}"
    if protocol == "cacd-map":
        maps = ", ".join(f"{k} {100 * m[k]['map']:.2f}" for k in P.CACD_DATABASES)
        return f"{label}: MAP {maps}{secs}"
    return (f"{label}: accuracy {100 * m['accuracy']:.2f} ± {100 * m['std']:.2f}%, "
            f"TAR@FAR=1e-3 {100 * m['tar_at_far']:.2f}%, AUC {m['auc']:.4f}{secs}")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["mtmim", *sys.argv[1:]])
