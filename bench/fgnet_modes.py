"""The paper's three ablation rows on real faces, with MI as a metric.

From the shared CASIA MobileFaceNet, fine-tune on FG-NET subjects 1-60 in each mode
(baseline, age, mtmim; one seed), then on the held-out subjects 61-82:
- rank-1: each held-out image against the rest of the held-out images (image + mirror
  features concatenated, L2-normalised, cosine);
- MI between x_id and x_age of the held-out images (raw features, no mirror) as the interval
  [InfoNCE lower bound, CLUB] from estimators trained from scratch on these features
  (`mi_interval`: fitted on one half, evaluated on the other, then swapped).
The pretrained model without fine-tuning is printed as a reference row (no x_age: rank-1 only).

Runs are kept in --out: rerunning reuses finished fine-tunes made with the same settings,
inputs and code (bench/_runs.py), and resumes a killed one.

    .venv/bin/python bench/fgnet_modes.py --cache fgnet.h5 [--epochs 4] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._runs import reusable, write_settings  # noqa: E402
from mtmim_cli.paths import shared_path  # noqa: E402


class RawEncoder:
    """The encoder's x (before the factorization) with the attributes extract_views reads."""

    def __init__(self, model) -> None:
        self.model, self.input_width, self.training = model, model.input_width, False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, x):
        return self.model.encoder(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="aligned FG-NET cache (mtmim align ... --format fgnet)")
    ap.add_argument("--init", default=str(shared_path("weights", "mobilefacenet-casia-arcface.ckpt")))
    ap.add_argument("--out", default="runs/fgnet-modes")
    ap.add_argument("--modes", default="baseline,age,mtmim")
    ap.add_argument("--train-subjects", type=int, default=60, help="subjects 1..K train, the rest test")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4, help="the paper's 0.02 is an option; see the closing note")
    ap.add_argument("--q-lr", type=float, default=1e-5)
    ap.add_argument("--lambda-mim", type=float, default=1e-4)
    ap.add_argument("--head-warmup-steps", type=int, default=0,
                    help="first steps with the encoder held (lr 0) while the new heads fit")
    ap.add_argument("--age-groups", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mi-steps", type=int, default=1000)
    ap.add_argument("--reuse-stale", action="store_true",
                    help="reuse finished runs made by other code (the table says which)")
    a = ap.parse_args()

    import torch

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.digest import file_sha256
    from mtmim_cli.eval.features import extract_features, extract_views
    from mtmim_cli.eval.metrics import rank1
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.models.mi_bounds import mi_interval
    from mtmim_cli.train.finetune import finetune
    from mtmim_cli.train.finetune_options import resolved_settings

    cache = Cache(a.cache)
    subject = np.array([int(n) for n in cache.identity_names])[cache.identity]
    held_all = np.flatnonzero(subject > a.train_subjects)
    test = np.flatnonzero((subject > a.train_subjects) & cache.usable)
    ids = cache.identity[test]
    n_train = int(((subject <= a.train_subjects) & cache.usable).sum())
    out = Path(a.out)
    print(f"FG-NET {a.cache}: train subjects 1-{a.train_subjects} ({n_train} usable images), "
          f"test subjects {a.train_subjects + 1}-{subject.max()} ({len(test)} usable images, "
          f"{len(np.unique(ids))} subjects)", flush=True)

    def evaluate(model) -> float:
        feats = extract_features(model, cache, test, flip="concat")
        return rank1(feats, ids, feats, ids, exclude_self=True)

    inputs = {"cache_sha256": file_sha256(a.cache), "init_sha256": file_sha256(a.init)}
    rows = []
    t0 = time.perf_counter()
    rows.append({"mode": "pretrained (no fine-tune)", "rank1": evaluate(load_identity_model(a.init)),
                 "mi_lower": float("nan"), "mi_club": float("nan"), "train_s": 0.0})
    print(f"pretrained: rank-1 {rows[-1]['rank1']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for mode in a.modes.split(","):
        run = out / mode
        t0 = time.perf_counter()
        opts = {"out": str(run), "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
                "seed": a.seed, "progress": False, "mode": mode, "exclude": held_all.tolist(),
                "q_lr": a.q_lr, "lambda_mim": a.lambda_mim,
                "head_warmup_steps": a.head_warmup_steps, "age_groups": a.age_groups}
        state = reusable(run, resolved_settings(opts), inputs, a.reuse_stale)
        if state is None:
            finetune([a.cache], a.init, {**opts,
                                         "resume": (run / "checkpoints" / "last.pt").exists()})
            write_settings(run, resolved_settings(opts), inputs)
        elif state == "stale":
            mode = f"{mode} (made by other code, --reuse-stale)"
        train_s = time.perf_counter() - t0
        model = load_identity_model(run / "model.pt")
        r1 = evaluate(model)

        x, _ = extract_views(RawEncoder(model), cache, test, mirror=False)
        with torch.no_grad():
            x_id, x_age = model.factorize(torch.from_numpy(x))
        lower, upper = mi_interval(x_id.numpy(), x_age.numpy(), steps=a.mi_steps, seed=a.seed)
        last = (run / "metrics.csv").read_text().splitlines()
        head, tail = last[0].split(","), last[-1].split(",")
        club_train = float(tail[head.index("club")])
        rows.append({"mode": mode, "rank1": r1, "mi_lower": lower, "mi_club": upper,
                     "train_s": train_s, "club_last_train_step": club_train,
                     "age_acc_last_train_step": float(tail[head.index("age_accuracy")])})
        print(f"{mode}: rank-1 {r1:.4f}, MI [{lower:.3f}, {upper:.3f}] nats, "
              f"fine-tune {train_s:.0f} s, last training-step CLUB {club_train:.3f}", flush=True)

    print(f"\n| mode | rank-1 (held-out subjects {a.train_subjects + 1}+) | MI(x_id; x_age) [InfoNCE, CLUB] nats |")
    print("|---|---|---|")
    for r in rows:
        mi = "n/a (no x_age)" if np.isnan(r["mi_lower"]) else f"[{r['mi_lower']:.3f}, {r['mi_club']:.3f}]"
        print(f"| {r['mode']} | {r['rank1']:.4f} | {mi} |")
    print(f"\nsettings: {json.dumps({k: v for k, v in vars(a).items()})}; held-out half size for the "
          f"interval {len(test) // 2} (InfoNCE cap log {len(test) // 2} = {np.log(len(test) // 2):.2f})")
    out.mkdir(parents=True, exist_ok=True)
    from mtmim_cli.source import source_record

    (out / "results.json").write_text(json.dumps({"settings": vars(a), "rows": rows,
                                                  "source": source_record()}, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
