"""The files of one `evaluate` run, a set that is whole or absent. Each is named after
--out's stem (`<stem>.md`, `<stem>.cmc.csv`, `<stem>.roc.csv`, `<stem>.outcomes.json`,
`<stem>.features.npz`, `<stem>.distractors.png`, MORPH's `<stem>.split.json`), so two
evaluations with other stems in one folder never overwrite each other's files.
`<stem>.json` is the manifest: it lists each sibling's name and sha256 under "files" and is
written last, so it is also the completion marker.

A rerun of the same stem removes the old manifest (then the old siblings) before it writes
anything, so a run that dies midway leaves siblings without a manifest, never an old
manifest beside new siblings. Were one left anyway (a manifest copied back, a sibling edited
by hand), the digests catch it: readers attach only a listed file whose sha256 matches
(`verified_files`, `listed_file`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mtmim_cli.atomic import atomic_write_text, fsync_folder
from mtmim_cli.digest import file_sha256
from mtmim_cli.errors import MtmimError

OUTPUT_SUFFIXES = {"md": ".md", "json": ".json", "cmc": ".cmc.csv", "roc": ".roc.csv",
                   "outcomes": ".outcomes.json", "features": ".features.npz",
                   "png": ".distractors.png", "split": ".split.json"}

# What a reader says of a results.json older than manifests: its siblings cannot be checked.
NO_MANIFEST = "lists no outputs (written before manifests)"
NOT_ATTACHED = ": not attached"


def output_paths(out_md: str | Path) -> dict[str, Path]:
    """Every file an evaluation with `--out out_md` may write, by kind ("md" is out_md)."""
    out_md = Path(out_md)
    return {kind: out_md if kind == "md" else out_md.with_name(out_md.stem + suffix)
            for kind, suffix in OUTPUT_SUFFIXES.items()}


def write_output_set(out_md: str | Path, payload: dict,
                     writers: dict[str, Callable[[Path], object]]) -> dict[str, Path]:
    """Write each of `writers` (kind -> a function writing that file atomically) in order,
    then, last, `<stem>.json`: `payload` with the name and sha256 of each file under
    "files".

    Any older manifest of this stem goes first, then the stem's other old files: from then
    until the new manifest lands, the folder holds no set of this stem that looks complete.
    A writer that raises takes the files written so far with it (the set is absent); a run
    killed outright leaves them without a manifest, which no reader attaches. Returns the
    paths by kind in the order written, the manifest last."""
    paths = output_paths(out_md)
    if paths["md"] == paths["json"]:
        raise MtmimError(f"--out {out_md}: names the manifest itself; give the results .md")
    unknown = (set(writers) - set(paths)) | ({"json"} & set(writers))
    if unknown:
        raise ValueError(f"write_output_set: no output kind {sorted(unknown)}")
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].unlink(missing_ok=True)
    fsync_folder(paths["json"].parent)   # the manifest is gone before any new file lands
    for kind, path in paths.items():
        if kind != "json":
            path.unlink(missing_ok=True)   # a stale sibling would read as this run's
    written: dict[str, Path] = {}
    try:
        for kind, write in writers.items():
            write(paths[kind])
            written[kind] = paths[kind]
        files = {kind: {"name": p.name, "sha256": file_sha256(p)} for kind, p in written.items()}
        atomic_write_text(paths["json"], json.dumps({**payload, "files": files}, indent=1,
                                                    default=json_default) + "\n")
    except BaseException:
        for p in written.values():
            p.unlink(missing_ok=True)
        raise
    return {**written, "json": paths["json"]}


def verified_files(manifest: Path, results: dict) -> tuple[dict[str, Path], list[str]]:
    """The files `manifest` (a results.json, read into `results`) lists whose sha256 still
    matches, by kind, and one line for each that is not attached (missing, changed, or no
    list at all: a results.json written before manifests)."""
    listed = results.get("files")
    if not isinstance(listed, dict):
        return {}, [NO_MANIFEST]
    good, bad = {}, []
    for kind, entry in listed.items():
        name = entry.get("name", "") if isinstance(entry, dict) else ""
        path = manifest.parent / name
        # a bare file name: the manifest speaks only for files beside it
        if not name or Path(name).name != name or not path.is_file():
            bad.append(f"{name or kind}: listed but missing{NOT_ATTACHED}")
        elif file_sha256(path) != entry.get("sha256"):
            bad.append(f"{name}: changed since evaluate wrote it (sha256 differs){NOT_ATTACHED}")
        else:
            good[kind] = path
    return good, bad


def read_manifest(path: str | Path) -> tuple[Path, dict]:
    """`path` is a results.json or the folder of one (its results.json, else its one
    `<stem>.json` beside a `<stem>.md`). Returns the manifest's path and its contents."""
    path = Path(path)
    if path.is_dir():
        if (path / "results.json").is_file():
            path = path / "results.json"
        else:
            stems = [p.stem for p in sorted(path.glob("*.json")) if (path / f"{p.stem}.md").is_file()]
            if len(stems) > 1:
                raise MtmimError(f"{path}: holds {len(stems)} evaluations ({', '.join(stems)}); "
                                 "name one's .json")
            path = path / f"{stems[0] if stems else 'results'}.json"
    elif path.suffix != ".json":
        path = path.with_suffix(".json")
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MtmimError(f"{path}: not a readable results file ({exc})") from None
    if not isinstance(results, dict):
        raise MtmimError(f"{path}: not a results file of `mtmim evaluate` (not a JSON object)")
    return path, results


def listed_file(manifest: Path, results: dict, kind: str) -> Path:
    """The `kind` file `manifest` lists, checked against its sha256; MtmimError (one line
    naming the manifest) when it is not listed, missing or changed."""
    good, bad = verified_files(manifest, results)
    if kind in good:
        return good[kind]
    entry = (results.get("files") or {}).get(kind) if isinstance(results.get("files"), dict) else None
    if entry is None and bad == [NO_MANIFEST]:
        raise MtmimError(f"{manifest}: {NO_MANIFEST}: its {kind} file cannot be checked; "
                         "rerun evaluate")
    if entry is None:
        raise MtmimError(f"{manifest}: lists no {kind} file")
    name = (entry.get("name") if isinstance(entry, dict) else None) or kind
    line = next(b for b in bad if b.startswith(f"{name}:"))
    raise MtmimError(f"{manifest}: {line.removesuffix(NOT_ATTACHED)}")


def json_default(obj: object) -> object:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
