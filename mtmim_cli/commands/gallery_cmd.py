"""enroll, unenroll, search: a gallery of enrolled faces and 1:N search (mtmim_cli.api)."""

from __future__ import annotations

from pathlib import Path

import typer

from mtmim_cli.app import app
from mtmim_cli.atomic import ensure_writable
from mtmim_cli.commands.align_cmd import PAD_HELP
from mtmim_cli.commands.tools_cmd import BACKBONE_HELP
from mtmim_cli.eval.flip import FLIP_MODES


@app.command()
def enroll(
    src: Path = typer.Argument(..., help="A cache (.h5), a folder of photos or a CSV path,identity[,age]."),
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to embed with (as `mtmim embed`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Gallery folder to create (or add to with --append)."),
    append: bool = typer.Option(False, "--append", help="Add to an existing gallery (same model)."),
    index: str = typer.Option(None, "--index", help="exact, ivf, hnsw, ivfpq or auto (by size; the default). With --append: the gallery's own kind and ivfpq options unless given."),
    pq_m: int = typer.Option(None, "--pq-m", help="--index ivfpq: one-byte PQ codes a face, dividing the feature dimension (default: dimension / 4)."),
    pq_refine: str = typer.Option(None, "--pq-refine", help="--index ivfpq: re-rank the PQ shortlist on none, sq8, fp16 or flat codes (default sq8)."),
    flip: str = typer.Option(None, "--flip", help=f"{', '.join(FLIP_MODES)} (default: the threshold's, else concat)."),
    on_miss: str = typer.Option("skip", "--on-miss", help="Photo without a face: skip (listed) or center."),
    backbone: str = typer.Option(None, "--backbone", help=BACKBONE_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Images per forward pass (default: sized to the model)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch (default: one per core)."),
    pad: float = typer.Option(0.0, "--pad", help=f"Photos only. {PAD_HELP}"),
    seed: int = typer.Option(0, "--seed", help="Seed of the index's k-means and recall sample."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Enroll faces into a gallery folder: align photos where needed, embed, index.

    The gallery holds features, identities, source paths, ages where known, a 56-px crop per
    face (for `search --sheet`), the model's sha256 and the settings. --index auto uses the
    exact scan up to 100,000 faces and HNSW above (48 links a face, walked on SQ8 codes, its
    shortlist re-scored on the float32 features); an index's recall@1 against the exact scan
    is measured on a sample of the gallery's own faces (each with itself left out), and one
    below 0.99 is replaced by the exact scan (said so). --index ivfpq keeps one byte per 4
    dimensions of PQ codes a face (--pq-m), re-ranked on SQ8 codes (--pq-refine); bytes per
    face and parameters in the manifest (docs/SCALE.md). A killed enroll resumes when run
    again; a gallery is only complete once its manifest.json is written. --append refuses
    another model.
    """
    ensure_writable(out, folder=True)

    from mtmim_cli.api import enroll as api_enroll
    from mtmim_cli.threads import set_torch_threads

    set_torch_threads(threads)
    g = api_enroll(src, model, out, append=append, index=index, pq_m=pq_m, pq_refine=pq_refine,
                   flip=flip, on_miss=on_miss,
                   backbone=backbone, device=device, batch_size=batch_size, pad=pad, seed=seed,
                   progress=not quiet)
    s = g.last_summary
    resumed = f" ({s['resumed']} resumed from an interrupted run)" if s["resumed"] else ""
    typer.echo(f"{s['enrolled']}/{s['records']} faces enrolled{resumed} -> {s['out']}: "
               f"{s['total']} faces of {s['identities']} identities, {s['dim']}-d")
    for path, reason in s["missed"][:20]:
        typer.echo(f"  skipped {path}: {reason}")
    if len(s["missed"]) > 20:
        typer.echo(f"  ... and {len(s['missed']) - 20} more without a face")
    typer.echo(index_line(s["index"]))


def index_line(b: dict) -> str:
    params = ", ".join(f"{k} {v}" for k, v in b["params"].items())
    rec = (f", recall@1 {b['recall_at_1']:.4f} of the exact scan on {b['recall_sample']} "
           "of its own faces" if b["recall_at_1"] is not None else "")
    line = f"index: {b['kind']}{' (' + params + ')' if params else ''}{rec}, " \
           f"{b['bytes_per_face']:.0f} bytes/face"
    if b["fallback"]:
        line += f"; {b['requested']} refused: {b['fallback']}"
    return line


@app.command()
def unenroll(
    gallery: Path = typer.Argument(..., help="Gallery folder."),
    identities: list[str] = typer.Argument(..., help="Identities to remove."),
) -> None:
    """Remove identities (all their faces) from a gallery; the index is rebuilt."""
    from mtmim_cli.deploy.enroll import remove_identities

    r = remove_identities(gallery, identities)
    typer.echo(f"removed {r['removed']} faces; {r['total']} faces of {r['identities']} "
               f"identities remain in {gallery}")
    typer.echo(index_line(r["index"]))


@app.command()
def search(
    probes: list[Path] = typer.Argument(..., help="Photos, folders of photos or caches (.h5)."),
    gallery: Path = typer.Option(..., "--gallery", "-g", help="Gallery folder (`mtmim enroll`)."),
    top: int = typer.Option(5, "--top", "-k", min=1, help="Matches per probe."),
    out: Path = typer.Option(None, "--out", "-o", help="Results to write: .md, .csv or .json."),
    sheet: Path = typer.Option(None, "--sheet", help="PNG: each probe beside its matches."),
    model: Path = typer.Option(None, "--model", "-m", help="The enrolled model, if it moved (sha256 checked)."),
    threshold: float = typer.Option(None, "--threshold", help="Decide at this cosine (default: the model's calibrated one)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table on the terminal."),
) -> None:
    """Search probes against a gallery: the top matches with cosine, age and the decision.

    Decisions need a threshold: the model's calibrated one (`mtmim calibrate`, when measured
    with the gallery's --flip) or --threshold; without one they read n/a. A probe without a
    face is one line naming the file.

    \b
    Exit codes: 0 every probe's best match accepted (no threshold: every
    probe had a face and a match); 1 some probe had no face or no accepted
    match; 2 an error (bad gallery, wrong model, unreadable input).
    """
    for path, option in ((out, "--out"), (sheet, "--sheet")):
        if path is not None:
            ensure_writable(path, option=option)

    from rich.console import Console
    from rich.table import Table

    from mtmim_cli.api import open_gallery
    from mtmim_cli.deploy.search_report import decision_text, write_results, write_sheet
    from mtmim_cli.errors import MtmimError

    if out is not None and out.suffix.lower() not in (".md", ".csv", ".json"):
        raise MtmimError(f"--out {out}: write .md, .csv or .json")
    if sheet is not None and sheet.suffix.lower() != ".png":
        raise MtmimError(f"--sheet {sheet}: write a .png")
    g = open_gallery(gallery)
    results = g.search(probes, top, model=model, threshold=threshold, device=device)
    t = g.threshold(threshold)
    t_text = "none (decisions n/a)" if t is None else f"{t['value']:.4f} ({t['source']})"
    console = Console(highlight=False)
    if not quiet:
        table = Table(title=f"{len(g)} faces, index {g.manifest['index']['kind']}, "
                            f"threshold {t_text}")
        for c in ("probe", "rank", "identity", "photo", "age", "cosine", "decision"):
            table.add_column(c, justify="right" if c in ("rank", "age", "cosine") else "left")
        style = {"accept": "green", "reject": "red", "n/a": "dim"}
        for r in results:
            for h in r.hits:
                d = decision_text(h.accepted)
                # file names on the terminal (full paths go to --out)
                table.add_row(Path(r.probe).name if h.rank == 1 else "", str(h.rank),
                              h.identity, Path(h.path).name,
                              "" if h.age != h.age else f"{h.age:g}", f"{h.score:.4f}",
                              f"[{style[d]}]{d}[/]")
        if table.rows:
            console.print(table)
    for r in results:
        if not r.hits:
            typer.echo(f"{r.probe}: {r.reason or 'no match'}")
    meta = {"gallery": str(gallery), "faces": len(g), "identities": len(g.identities),
            "index": g.manifest["index"]["kind"], "threshold": t_text, "top": top}
    if out is not None:
        typer.echo(f"wrote {write_results(out, results, meta)}")
    if sheet is not None:
        typer.echo(f"wrote {write_sheet(sheet, results, g.faces, top)}")
    raise typer.Exit(0 if all(r.accepted for r in results) else 1)
