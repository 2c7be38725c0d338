#!/usr/bin/env python
"""The whole toolkit in one run: `make demo` (embedded synthetic faces) and `make demo-fgnet`.

synth -> align -> groups -> pretrain (short) -> finetune baseline / age / mtmim -> evaluate
-> calibrate + verify + export -> report. Every stage is a real `mtmim` command in its own
process, printed before it runs so it can be copied. Ends with the report's path and the
wall time of each stage.

    python scripts/demo.py                      # synthetic set, about 5-10 min on 2 CPU cores
    python scripts/demo.py --size small         # the same chain at test size (make test)
    python scripts/demo.py --fgnet ../shared    # FG-NET: subjects 1-60 train, 61-82 test
"""

from __future__ import annotations

import argparse
import csv
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mtmim_cli, installed or not

# Synthetic-set sizes: photos, training length. "small" is the test-time chain.
# Demo settings that differ from the paper's, so that a 30-step run on a tiny encoder shows
# the method's effects: fine-tuning lr 1e-3 (the paper's 0.02 wrecks the tiny encoder within a
# few steps), lambda_MIM 0.1 and q lr 1e-3 (the paper's 1e-4 and 1e-5 move nothing in 30
# steps: the three modes' curves coincide). demo-fgnet uses the paper's lambda_MIM and q lr.
DEMO_FT = {"ft_lr": 1e-3, "lambda_mim": 0.1, "q_lr": 1e-3}
# "far": the calibration FAR, the lowest at which the held-out impostor pairs put at least 10
# false accepts above the threshold (calibrate refuses less): 270 impostor pairs for "full"
# (0.05: 13), 20 for "small" (0.5: 10), about 1500 for FG-NET subjects 61-82 (0.01: 15).
SIZES = {
    "full": {"identities": 24, "per_identity": 10, "pre_epochs": 12, "ft_epochs": 6,
             "batch": 32, "pairs": 3000, "groups": 4, "far": 0.05, **DEMO_FT},
    "small": {"identities": 8, "per_identity": 5, "pre_epochs": 1, "ft_epochs": 1,
              "batch": 8, "pairs": 40, "groups": 2, "far": 0.5, **DEMO_FT},
}
MODES = ("baseline", "age", "mtmim")


def _in_process(args: list[str]) -> int:
    """Run one `mtmim` command in this process (torch is imported once, not per stage)."""
    import typer

    from mtmim_cli.cli import app
    from mtmim_cli.errors import MtmimError

    saved_argv = sys.argv
    sys.argv = ["mtmim", *args]  # what commands record as their command line
    try:
        rc = app(args=args, prog_name="mtmim", standalone_mode=False)
    except MtmimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 1))
    except typer.TyperException as exc:  # a usage error
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    return rc if isinstance(rc, int) else 0


class Chain:
    times: list[tuple[str, float]]

    def __init__(self, subprocesses: bool = False) -> None:
        self.times = []
        self.start = time.perf_counter()
        self.subprocesses = subprocesses

    def mtmim(self, stage: str, *args: str, ok: tuple[int, ...] = (0,)) -> int:
        printable = "mtmim " + " ".join(shlex.quote(str(a)) for a in args)
        print(f"\n\033[1m[{stage}] {printable}\033[0m", flush=True)
        t0 = time.perf_counter()
        if self.subprocesses:
            rc = subprocess.run([sys.executable, "-m", "mtmim_cli.cli", *map(str, args)],
                                cwd=REPO).returncode
        else:
            rc = _in_process([str(a) for a in args])
        self.times.append((stage, time.perf_counter() - t0))
        if rc not in ok:
            sys.exit(f"demo: stage {stage} failed (exit {rc}): {printable}")
        return rc

    def summary(self) -> str:
        total = time.perf_counter() - self.start
        merged: dict[str, float] = {}
        for stage, t in self.times:
            merged[stage] = merged.get(stage, 0.0) + t
        rows = [f"  {stage:<10} {t:7.1f} s" for stage, t in merged.items()]
        return "\n".join(["stage wall times:", *rows, f"  {'total':<10} {total:7.1f} s"])


def fgnet_manifests(shared: Path, out: Path, last_train_subject: int = 60) -> tuple[Path, Path]:
    """train.csv / test.csv over FG-NET split by subject (absolute paths: the data stays put)."""
    from mtmim_cli.data.readers import read_records

    images = shared / "data" / "fgnet" / "images"
    records = read_records(images, "fgnet")
    paths = {}
    for split in ("train", "test"):
        paths[split] = out / f"fgnet-{split}.csv"
        with open(paths[split], "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "identity", "age", "split"])
            for r in records:
                is_train = int(r.identity) <= last_train_subject
                if is_train == (split == "train"):
                    w.writerow([str((images / r.path).resolve()), r.identity, f"{r.age:g}", split])
    return paths["train"], paths["test"]


def verification_examples(manifest: Path) -> tuple[Path, Path, Path, str]:
    """Two photos of one held-out person at the closest ages, and a photo of someone else."""
    rows = sorted(csv.DictReader(open(manifest)), key=lambda r: r["path"])
    first = rows[0]["identity"]
    mine = sorted((r for r in rows if r["identity"] == first), key=lambda r: float(r["age"]))
    k = min(range(len(mine) - 1), key=lambda n: float(mine[n + 1]["age"]) - float(mine[n]["age"]))
    other = next(r for r in rows if r["identity"] != first)
    path = [manifest.parent / r["path"] for r in (mine[k], mine[k + 1], other)]
    note = (f"verify: {first} at ages {mine[k]['age']} and {mine[k + 1]['age']} (same person), "
            f"then {first} against {other['identity']} (different people)")
    return path[0], path[1], path[2], note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "demo_out", help="Output folder (replaced).")
    ap.add_argument("--size", choices=tuple(SIZES), default="full", help="Synthetic set size.")
    ap.add_argument("--fgnet", type=Path, default=None,
                    help="Shared data folder holding data/fgnet (runs the chain on FG-NET).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subprocesses", action="store_true",
                    help="Run each stage as its own `mtmim` process (default: one process).")
    a = ap.parse_args()
    out = a.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    c = Chain(a.subprocesses)
    s = SIZES[a.size]
    runs = out / "runs"

    if a.fgnet is None:
        syn = out / "synth"
        c.mtmim("synth", "synth", "--out", syn, "--identities", s["identities"], "--per-identity",
                s["per_identity"], "--seed", a.seed, "--quiet")
        train_csv, test_csv = syn / "train.csv", syn / "test.csv"
        backbone = ["--backbone", "tiny"]
    else:
        shared = a.fgnet.resolve()
        weights = shared / "weights" / "mobilefacenet-casia-arcface.ckpt"
        if not (shared / "data" / "fgnet" / "images").is_dir() or not weights.is_file():
            sys.exit(f"demo: {shared} lacks data/fgnet/images or {weights.name} (set MTMIM_SHARED)")
        train_csv, test_csv = fgnet_manifests(shared, out)
        s = {**s, "pre_epochs": 0, "ft_epochs": 3, "batch": 64, "pairs": 3000, "groups": 8,
             "ft_lr": 1e-4, "lambda_mim": 1e-4, "q_lr": 1e-5, "far": 0.01}

    train, test = out / "train.h5", out / "test.h5"
    c.mtmim("align", "align", train_csv, "--format", "csv", "--out", train, "--quiet")
    c.mtmim("align", "align", test_csv, "--format", "csv", "--out", test, "--quiet")
    c.mtmim("groups", "groups", train, "--k", s["groups"])

    if a.fgnet is None:
        c.mtmim("pretrain", "pretrain", train, "--out", runs / "pretrain", *backbone,
                "--epochs", s["pre_epochs"], "--batch-size", s["batch"], "--val-cache", test,
                "--val-pairs", s["pairs"], "--seed", a.seed, "--no-progress")
        init = runs / "pretrain" / "model.pt"
    else:
        print("\n[pretrain] using the shared CASIA-WebFace MobileFaceNet (the paper's GFD stage)")
        init = weights
    print(f"\nfine-tuning settings: lr {s['ft_lr']:g}, lambda_MIM {s['lambda_mim']:g}, "
          f"q lr {s['q_lr']:g} (the paper: 0.02, 1e-4, 1e-5); see scripts/demo.py")
    for mode in MODES:
        c.mtmim("finetune", "finetune", train, "--init", init, "--mode", mode, "--out", runs / mode,
                "--age-groups", s["groups"], "--epochs", s["ft_epochs"], "--batch-size", s["batch"],
                "--lr", s["ft_lr"], "--lambda-mim", s["lambda_mim"], "--q-lr", s["q_lr"],
                "--val-cache", test, "--val-pairs", s["pairs"], "--seed", a.seed, "--no-progress")

    models = [f"pretrained={init}"] + [f"{m}={runs / m / 'model.pt'}" for m in MODES]
    model_args = [x for m in models for x in ("--model", m)]
    c.mtmim("evaluate", "evaluate", "--protocol", "fgnet-loo", *model_args, "--cache", test,
            "--out", out / "eval" / "rank1" / "results.md", "--features")
    c.mtmim("evaluate", "evaluate", "--protocol", "pairs", *model_args, "--cache", test,
            "--n-pairs", s["pairs"], "--out", out / "eval" / "pairs" / "results.md")

    # everyday use: a threshold at a FAR the held-out pairs can resolve, two verifications,
    # the ONNX export
    final = runs / "mtmim" / "model.pt"
    c.mtmim("tools", "calibrate", final, "--cache", test, "--n-pairs", s["pairs"], "--far", s["far"])
    a_, b_, d_, note = verification_examples(test_csv)
    print(f"\n{note}")
    c.mtmim("tools", "verify", a_, b_, "--model", final, ok=(0, 1))
    c.mtmim("tools", "verify", a_, d_, "--model", final, ok=(0, 1))
    c.mtmim("tools", "export", final, "--onnx", out / "mtmim.onnx", "--check-cache", test)

    report_dir = out / "report"
    c.mtmim("report", "report", *(runs / r for r in (["pretrain"] if a.fgnet is None else []) + list(MODES)),
            out / "eval" / "rank1", out / "eval" / "pairs", "--out", report_dir)
    print("\n" + c.summary())
    print(f"\nreport: {report_dir / 'report.md'}")


if __name__ == "__main__":
    main()
