"""Commands registered on mtmim_cli.app.app (import heavy modules inside the commands)."""

from __future__ import annotations

from pathlib import Path

import typer

from mtmim_cli import __version__
from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable
from mtmim_cli.commands.align_cmd import PAD_HELP
from mtmim_cli.eval.flip import FLIP_MODES

BACKBONE_HELP = "Backbone of plain weights; onnx:CHANNELS[,MEAN,STD] for *.onnx."


@app.command()
def version(full: bool = typer.Option(False, "--full", help="Also report torch, CUDA and devices.")) -> None:
    """Print the tool version (and with --full the torch build and visible devices)."""
    typer.echo(f"mtmim {__version__}")
    if full:
        import torch

        typer.echo(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
                   f"devices: {torch.cuda.device_count()}")


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to create (must be new or empty)."),
    identities: int = typer.Option(24, help="Number of synthetic identities."),
    per_identity: int = typer.Option(10, "--per-identity", help="Photos per identity (ages spread over the range)."),
    age_min: float = typer.Option(1.0, "--age-min", help="Youngest age drawn (years)."),
    age_max: float = typer.Option(70.0, "--age-max", help="Oldest age drawn (years)."),
    test_fraction: float = typer.Option(0.25, "--test-fraction", help="Share of identities marked split=test."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same photos."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate the embedded cross-age face set (offline) with labels.csv for `align --format csv`."""
    ensure_writable(out, folder=True)

    from mtmim_cli.demo.synth import SynthConfig, synthesize

    cfg = SynthConfig(identities=identities, per_identity=per_identity, age_min=age_min,
                      age_max=age_max, test_fraction=test_fraction, seed=seed)
    summary = synthesize(out, cfg, progress=not quiet)
    typer.echo(f"{summary['photos']} photos of {summary['identities']} identities "
               f"({summary['test_identities']} held out) -> {summary['labels']}")


@app.command()
def report(
    inputs: list[Path] = typer.Argument(..., help="Run folders (metrics.csv) and evaluate outputs (results.json or its folder)."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Folder for report.md and its PNG figures."),
    max_images: int = typer.Option(400, "--max-images", help="Faces per model to project from features files."),
    age_map_model: str = typer.Option(None, "--age-map-model", help="Model label whose age map to draw (default: the first with one)."),
) -> None:
    """Markdown report from run folders and evaluate's outputs: training curves, CLUB over
    training, x_id/x_age projections, CMC and ROC, rank-1 by age and age gap, a probe-age x
    gallery-age map.

    An evaluation's results.json lists its files with their sha256: only those that match
    are attached (each other one is named on one line). The projections come from the
    <stem>.features.npz it lists (`evaluate --features`);
    --age-map-model picks whose probe-age x gallery-age success map is drawn.
    """
    ensure_writable(out, folder=True)

    from mtmim_cli.report import build_report

    path = build_report(inputs, out, max_images=max_images, age_map_model=age_map_model,
                        echo=lambda line: typer.echo(line, err=True))
    typer.echo(f"report: {path}")


@app.command()
def calibrate(
    model: Path = typer.Argument(..., help="Checkpoint: ours, MobileFaceNet, a backbone.pth or a *.onnx encoder."),
    cache: Path = typer.Option(..., "--cache", "-c", help="Labelled cache the model was not trained on."),
    far: float = typer.Option(1e-3, "--far", help="Target false-accept rate over impostor pairs."),
    n_pairs: int = typer.Option(6000, "--n-pairs", help="Pairs to draw (half genuine)."),
    min_gap: float = typer.Option(0.0, "--min-gap", help="Minimum age gap of the drawn pairs (years)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the pair draw."),
    flip: str = typer.Option(FLIP_MODES[0], "--flip", help=f"Mirror features: {', '.join(FLIP_MODES)} (verify uses the same)."),
    backbone: str = typer.Option(None, "--backbone", help=BACKBONE_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="Calibrated copy to write (default: MODEL in place; ours only)."),
    min_false_accepts: int = typer.Option(10, "--min-false-accepts", help="False accepts --far must leave to count as measured."),
    allow_unresolved: bool = typer.Option(False, "--allow-unresolved", help="Store a threshold at an unresolved FAR (marked so)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Measure the verification threshold at a FAR and store it in the checkpoint's meta.

    A FAR is measured only when the impostor pairs leave at least --min-false-accepts above
    the threshold (FAR x impostor pairs); below that calibrate refuses, unless
    --allow-unresolved stores the threshold marked unresolved. External weights need --out.
    """
    ensure_writable(out or model, option="--out" if out else "MODEL")

    from mtmim_cli.deploy.verify import calibrate_threshold, is_mtmim_checkpoint, store_threshold
    from mtmim_cli.errors import MtmimError

    if out is None and not is_mtmim_checkpoint(model):
        raise MtmimError(f"{model}: not an mtmim checkpoint; give --out for the calibrated copy")
    t = calibrate_threshold(model, cache, far=far, n_pairs=n_pairs, seed=seed, min_gap=min_gap,
                            flip=flip, backbone=backbone, min_false_accepts=min_false_accepts,
                            allow_unresolved=allow_unresolved, progress=not quiet)
    path = store_threshold(model, {**t, "backbone": backbone}, out)
    lo, hi = t["far_interval"]
    typer.echo(f"threshold {t['value']:.4f} at FAR {far:g} (measured {t['far_measured']:.4g}: "
               f"{t['false_accepts']} of {t['impostor_pairs']} impostor pairs, 95% interval "
               f"{lo:.2g}-{hi:.2g}; TAR {t['tar']:.4f} over {t['genuine_pairs']} genuine) -> {path}")
    if not t["far_resolved"]:
        typer.echo(f"warning: UNRESOLVED: {t['impostor_pairs']} impostor pairs leave fewer than "
                   f"{min_false_accepts} false accepts at FAR {far:g}; the threshold is stored "
                   "marked unresolved (--allow-unresolved)", err=True)


@app.command()
def verify(
    photo_a: Path = typer.Argument(..., help="First photo."),
    photo_b: Path = typer.Argument(..., help="Second photo."),
    model: Path = typer.Option(..., "--model", "-m", help="Calibrated checkpoint (see `mtmim calibrate`)."),
    threshold: float = typer.Option(None, "--threshold", help="Decide at this cosine instead of the stored threshold."),
    backbone: str = typer.Option(None, "--backbone", help=BACKBONE_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    pad: float = typer.Option(0.0, "--pad", help=PAD_HELP),
) -> None:
    """Same person? Prints the cosine similarity and the decision; exit 0 same, 1 different."""
    from mtmim_cli.deploy.verify import verify_photos

    v = verify_photos(photo_a, photo_b, model, threshold=threshold, backbone=backbone,
                      device=device, pad=pad)
    t = v.threshold
    far = f" (FAR {t['far']:g} on {t['protocol']})" if t.get("far") is not None else ""
    if t.get("far_resolved") is False:
        far = (f" (FAR {t['far']:g} requested, UNRESOLVED by {t['impostor_pairs']} impostor "
               f"pairs on {t['protocol']})")
    typer.echo(f"cosine {v.score:.4f}, threshold {float(t['value']):.4f}{far}: "
               f"{'same person' if v.same else 'different people'}")
    raise typer.Exit(0 if v.same else 1)


@app.command()
def embed(
    src: Path = typer.Argument(..., help="A folder of photos (aligned here) or an aligned cache (.h5)."),
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to embed with (x_id of a fine-tuned model, else x)."),
    out: Path = typer.Option(..., "--out", "-o", help="HDF5 file to write (one row per face)."),
    flip: str = typer.Option(FLIP_MODES[0], "--flip", help=f"Mirror features: {', '.join(FLIP_MODES)} (concat: the paper)."),
    on_miss: str = typer.Option("skip", "--on-miss", help="No face found: skip (listed, no row) or center (a centre crop)."),
    backbone: str = typer.Option(None, "--backbone", help=BACKBONE_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(None, "--batch-size", min=1,
                                    help="Images per forward pass with their mirrors (default: sized to the model)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: one per core)."),
    pad: float = typer.Option(0.0, "--pad", help=f"Photo folders only. {PAD_HELP}"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """L2-normalised identity embeddings (x_id of a fine-tuned model, x of a pretrained one) of
    a photo folder or a cache, one row per face, in one HDF5 file.

    The file holds embeddings, path, identity, age and status per face, and missed_path and
    missed_reason for photos without one (a cache's misses are always skipped); its `feature`
    attribute says which feature it is. --pad frames tight crops before detecting.
    """
    ensure_writable(out)

    from mtmim_cli.deploy.embed import embed_source
    from mtmim_cli.threads import set_torch_threads

    set_torch_threads(threads)
    s = embed_source(src, model, out, flip=flip, on_miss=on_miss, backbone=backbone,
                     device=device, batch_size=batch_size, pad=pad, progress=not quiet)
    center = f", {s['center']} from a centre crop" if s["center"] else ""
    typer.echo(f"{s['embedded']}/{s['total']} faces embedded ({s['dim']}-d {s['feature']}"
               f"{center}) -> {s['out']}")
    if s["missed"]:
        typer.echo(f"skipped {len(s['missed'])} without a face (no row; listed in missed_path "
                   "of the file):")
    for path, reason in s["missed"][:20]:
        typer.echo(f"  {path}: {reason}")
    if len(s["missed"]) > 20:
        typer.echo(f"  ... and {len(s['missed']) - 20} more")


@app.command()
def export(
    model: Path = typer.Argument(..., help="Checkpoint to export (x_id for a fine-tuned model)."),
    onnx: Path = typer.Option(..., "--onnx", help="ONNX file to write."),
    backbone: str = typer.Option(None, "--backbone", help=BACKBONE_HELP),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
    check_cache: Path = typer.Option(None, "--check-cache", help="Check on real faces from this cache (default: a seeded random batch)."),
) -> None:
    """Export the identity encoder to ONNX and check onnxruntime against torch on one batch."""
    ensure_writable(onnx, option="--onnx")

    from mtmim_cli.deploy.export import export_onnx

    r = export_onnx(model, onnx, backbone=backbone, opset=opset, check_cache=check_cache)
    typer.echo(f"wrote {r['out']}: input {r['input']} -> {r['dim']}-d features; "
               f"onnxruntime vs torch on {r['batch']} images: max |diff| {r['max_abs_diff']:.2e} "
               f"(outputs up to {r['max_abs_value']:.3g}), min cosine {r['min_cosine']:.6f}")


@app.command("remove-age")
def remove_age_cmd(
    model: Path = typer.Argument(..., help="Model file (any that evaluate takes)."),
    cache: Path = typer.Option(..., "--cache", help="Labelled cache with ages to fit on (never your test people)."),
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write: MODEL plus the subspace."),
    identities: str = typer.Option(None, "--identities", help="Fit on these identities only: NAMES, @FILE or @FILE.json:key."),
    age_bins: str = typer.Option("0,6,11,16,21,31", "--age-bins", help="Lower edges of the age groups whose mean change is removed."),
    backbone: str = typer.Option(None, "--backbone", help=BACKBONE_HELP),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: one per core)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Project the within-identity age subspace out of a model's features: the closed-form,
    linear counterpart of MT-MIM's x_id = x - x_age, fitted on dated photos (no training).
    evaluate, embed, verify and export use the projected features; as a fine-tuning --init only
    the encoder counts (fit again after fine-tuning).

    At most one dimension fewer than age groups is removed. The file records the faces the
    subspace was fitted on: `evaluate` refuses to score it on any of them (they shaped it),
    as it refuses a model trained on its test faces.
    """
    ensure_writable(out)

    from mtmim_cli.data.identity_lists import read_identity_list
    from mtmim_cli.deploy.remove_age import remove_age
    from mtmim_cli.eval.agebins import parse_edges
    from mtmim_cli.threads import set_torch_threads

    set_torch_threads(threads)
    edges = parse_edges(age_bins)
    ids = read_identity_list(identities) if identities else None
    r = remove_age(model, cache, out, edges=edges, identities=ids, backbone=backbone,
                   progress=not quiet)
    typer.echo(f"fitted on {r['photos']} photos of {r['identities']} identities: "
               f"{r['dims']} of {r['feature_dim']} dimensions removed -> {r['out']}")
    typer.echo(f"age probe of the fitting photos' features (cross-validated by identity; "
               f"optimistic, they shaped the subspace): R^2 of log(1+age) "
               f"{r['r2_before']:.3f} -> {r['r2_after']:.3f}, age group accuracy "
               f"{100 * r['group_acc_before']:.1f}% -> {100 * r['group_acc_after']:.1f}% "
               f"(chance {100 * r['group_chance']:.1f}%)")
