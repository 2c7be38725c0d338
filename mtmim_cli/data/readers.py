"""Dataset layouts -> records, and decoding one photo to RGB.

Every reader returns records sorted by path (deterministic across machines and runs), with
paths relative to the source root that `source_root(src, fmt)` names. A layout that does not
match, or holds no photo, fails at once with a message saying what was expected.

Formats (``--format``):

=========  =====================================================================================
fgnet      folder of ``SSSAaa[x].JPG`` (subject SSS, age aa); SRC or SRC/images
celeba     folder with ``identities.txt`` or ``identity_CelebA.txt`` (``image identity`` lines,
           optional header) and the photos in ``images/``, ``img_celeba/``, ``img_align_celeba/``
           or beside the file; SRC may also be the label file itself
folder     one sub-folder per identity (LFW, CASIA-WebFace, VGGFace2 ...)
csv        a manifest with a header: ``path,identity[,age][,split]``; paths relative to the CSV
agedb      folder of ``<n>_<Name>_<age>_<g>.jpg``
cacd       folder of ``<age>_<Name>_<nnnn>.jpg``
cacd-vs    the CACD-VS release: ``NNNN_0.jpg``, ``NNNN_1.jpg`` (pair NNNN); SRC or SRC/images;
           labels and folds from the release's rule (`mtmim_cli.data.cacd_vs`)
morph      the MORPH Album 2 CSV (columns ``id_num``, ``age``, ``photo``), or a folder of
           ``<id>_<nn><G><age>.JPG`` files when no CSV is at hand
rec        an insightface RecordIO pack (``train.rec`` + ``train.idx``; CASIA-WebFace, MS1M):
           already aligned 112x112 crops, identity = the record's label
=========  =====================================================================================
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mtmim_cli.data.records import Record
from mtmim_cli.errors import MtmimError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}

FGNET_RE = re.compile(r"^(\d{3})A(\d{2})([a-z]?)$", re.IGNORECASE)
AGEDB_RE = re.compile(r"^(\d+)_(.+)_(\d+)_([mf])$", re.IGNORECASE)
CACD_RE = re.compile(r"^(\d+)_(.+)_(\d+)$")
MORPH_RE = re.compile(r"^(\d+)_(\d+)([MF])(\d+)$", re.IGNORECASE)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if _is_image(p))


def _need_dir(src: Path, fmt: str, expected: str) -> Path:
    if not src.exists():
        raise MtmimError(f"{src}: no such file or folder")
    if not src.is_dir():
        raise MtmimError(f"{src}: --format {fmt} expects a folder of {expected}")
    return src


def _named_files(folder: Path, fmt: str, pattern: re.Pattern, expected: str) -> list[tuple[Path, re.Match]]:
    """Every photo in `folder` must match `pattern` (on its stem): a stray name means a wrong layout."""
    photos = _images_in(folder)
    if not photos:
        raise MtmimError(f"{folder}: no photos found; --format {fmt} expects {expected}")
    out = []
    for p in photos:
        m = pattern.match(p.stem)
        if m is None:
            raise MtmimError(f"{p}: name does not match --format {fmt} (expected {expected})")
        out.append((p, m))
    return out


def _sorted(records: list[Record]) -> list[Record]:
    return sorted(records, key=lambda r: r.path)


def _fgnet_root(src: Path) -> Path:
    _need_dir(src, "fgnet", "SSSAaa[x].JPG photos")
    return src / "images" if (src / "images").is_dir() else src


def read_fgnet(src: Path) -> list[Record]:
    root = _fgnet_root(src)
    expected = "SSSAaa[x].JPG photos (subject SSS, age aa, e.g. 001A02.JPG, 001A43a.JPG)"
    return _sorted([Record(p.name, m.group(1), float(m.group(2)))
                    for p, m in _named_files(root, "fgnet", FGNET_RE, expected)])


_CELEBA_LABELS = ("identities.txt", "identity_CelebA.txt")
_CELEBA_IMAGES = ("images", "img_celeba", "img_align_celeba")


def _celeba_paths(src: Path) -> tuple[Path, Path]:
    """(label file, image folder) for a CelebA source."""
    if not src.exists():
        raise MtmimError(f"{src}: no such file or folder")
    if src.is_file():
        labels, base = src, src.parent
    else:
        found = [src / n for n in _CELEBA_LABELS if (src / n).is_file()]
        if not found:
            raise MtmimError(f"{src}: --format celeba expects an identity file "
                             f"({' or '.join(_CELEBA_LABELS)}: 'image identity' per line)")
        labels, base = found[0], src
    for name in _CELEBA_IMAGES:
        if (base / name).is_dir():
            return labels, base / name
    return labels, base


def read_celeba(src: Path) -> list[Record]:
    labels, images = _celeba_paths(src)
    records = []
    for n, line in enumerate(labels.read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise MtmimError(f"{labels}:{n}: expected 'image identity', got {line.strip()!r}")
        name, ident = parts
        if Path(name).suffix.lower() not in IMAGE_EXTS:
            if n == 1:
                continue  # a header line
            raise MtmimError(f"{labels}:{n}: {name!r} is not an image file name")
        records.append(Record(name, ident))
    if not records:
        raise MtmimError(f"{labels}: no 'image identity' lines")
    return _sorted(records)


def read_folder(src: Path) -> list[Record]:
    _need_dir(src, "folder", "one sub-folder of photos per identity")
    records = []
    for sub in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for p in _images_in(sub, recursive=True):
            records.append(Record(p.relative_to(src).as_posix(), sub.name))
    if not records:
        raise MtmimError(f"{src}: no photos found; --format folder expects one sub-folder of "
                         "photos per identity (SRC/<identity>/<photo>.jpg)")
    return _sorted(records)


def _float_or_nan(text: str | None, where: str) -> float:
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise MtmimError(f"{where}: age {text!r} is not a number") from None


def _csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in rows]
    return fields, rows


def read_csv(src: Path) -> list[Record]:
    if not src.is_file():
        raise MtmimError(f"{src}: --format csv expects a CSV file with a header "
                         "path,identity[,age][,split]")
    fields, rows = _csv_rows(src)
    missing = [c for c in ("path", "identity") if c not in fields]
    if missing:
        raise MtmimError(f"{src}: CSV header lacks {', '.join(missing)} "
                         f"(expected path,identity[,age][,split]; found {','.join(fields)})")
    if not rows:
        raise MtmimError(f"{src}: CSV has a header but no rows")
    records = []
    for n, row in enumerate(rows, 2):
        if not row["path"] or not row["identity"]:
            raise MtmimError(f"{src}:{n}: empty path or identity")
        records.append(Record(row["path"], row["identity"],
                              _float_or_nan(row.get("age"), f"{src}:{n}"), row.get("split", "")))
    return _sorted(records)


def read_agedb(src: Path) -> list[Record]:
    _need_dir(src, "agedb", "<n>_<Name>_<age>_<g>.jpg photos")
    expected = "<n>_<Name>_<age>_<g>.jpg photos (e.g. 0_MariaCallas_35_f.jpg)"
    return _sorted([Record(p.name, m.group(2), float(m.group(3)))
                    for p, m in _named_files(src, "agedb", AGEDB_RE, expected)])


def read_cacd(src: Path) -> list[Record]:
    _need_dir(src, "cacd", "<age>_<Name>_<nnnn>.jpg photos")
    expected = "<age>_<Name>_<nnnn>.jpg photos (e.g. 14_Aaron_Johnson_0001.jpg)"
    return _sorted([Record(p.name, m.group(2), float(m.group(1)))
                    for p, m in _named_files(src, "cacd", CACD_RE, expected)])


def _cacd_vs_root(src: Path) -> Path:
    _need_dir(src, "cacd-vs", "NNNN_0.jpg, NNNN_1.jpg photos")
    return src / "images" if (src / "images").is_dir() else src


def read_cacd_vs(src: Path) -> list[Record]:
    from mtmim_cli.data import cacd_vs

    root = _cacd_vs_root(src)
    return cacd_vs.release_records([p for p, _ in _named_files(root, "cacd-vs", cacd_vs.NAME_RE,
                                                                cacd_vs.EXPECTED)])


def _morph_csv(src: Path) -> Path | None:
    if src.is_file():
        return src
    found = sorted(src.glob("*.csv"))
    return found[0] if len(found) == 1 else None


def read_morph(src: Path) -> list[Record]:
    if not src.exists():
        raise MtmimError(f"{src}: no such file or folder")
    table = _morph_csv(src)
    if table is None:
        if len(sorted(src.glob("*.csv"))) > 1:
            raise MtmimError(f"{src}: several CSV files; pass the MORPH CSV itself as SRC")
        expected = "<id>_<nn><G><age>.JPG photos (e.g. 003620_00M25.JPG) or the MORPH CSV"
        # identity as the CSV writes it (no leading zeros), so both sources agree
        return _sorted([Record(p.name, str(int(m.group(1))), float(m.group(4)))
                        for p, m in _named_files(src, "morph", MORPH_RE, expected)])
    fields, rows = _csv_rows(table)
    missing = [c for c in ("id_num", "age", "photo") if c not in fields]
    if missing:
        raise MtmimError(f"{table}: MORPH CSV lacks column(s) {', '.join(missing)} "
                         f"(expected id_num, age, photo; found {','.join(fields)})")
    if not rows:
        raise MtmimError(f"{table}: MORPH CSV has no rows")
    return _sorted([Record(r["photo"].replace("\\", "/"), r["id_num"],
                           _float_or_nan(r["age"], f"{table}:{n}"))
                    for n, r in enumerate(rows, 2)])


READERS: dict[str, Callable[[Path], list[Record]]] = {
    "fgnet": read_fgnet, "celeba": read_celeba, "folder": read_folder, "csv": read_csv,
    "agedb": read_agedb, "cacd": read_cacd, "cacd-vs": read_cacd_vs, "morph": read_morph,
    "rec": lambda src: read_rec(src),
}


def source_root(src: str | Path, fmt: str) -> Path:
    """The folder that record paths are relative to."""
    src = Path(src)
    if fmt == "fgnet":
        return _fgnet_root(src).resolve()
    if fmt == "celeba":
        return _celeba_paths(src)[1].resolve()
    if fmt == "cacd-vs":
        return _cacd_vs_root(src).resolve()
    if fmt in ("csv", "morph") and src.is_file():
        return src.parent.resolve()
    if fmt == "rec":
        return _rec_paths(src)[0].parent.resolve()
    return src.resolve()


def read_records(src: str | Path, fmt: str, **opts: object) -> list[Record]:
    """All records of the dataset at `src` in layout `fmt`, sorted by path.

    `opts` is accepted for forward compatibility; no reader takes options today.
    """
    if fmt not in READERS:
        raise MtmimError(f"--format {fmt}: unknown format (choose from {', '.join(READERS)})")
    if opts:
        raise MtmimError(f"--format {fmt}: unexpected reader option(s) {', '.join(opts)}")
    return READERS[fmt](Path(src))


class UnreadableImage(MtmimError):
    """A photo that cannot be decoded; `reason` is the message without the file name."""

    def __init__(self, where: str | Path, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def load_image(path: str | Path | io.BytesIO, where: str | Path | None = None) -> np.ndarray:
    """Decode a photo to RGB uint8 (H, W, 3): EXIF orientation applied, grey/CMYK/alpha -> RGB.

    `path` may be a file-like object (then `where` names it in messages). Raises
    UnreadableImage (an MtmimError, "<path>: <reason>") for a missing, corrupt or non-image file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    where = where if where is not None else path
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256.0).convert("L")  # 16-bit grey -> 8-bit
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(bg, im)
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise UnreadableImage(where, "no such file") from None
    except UnidentifiedImageError:
        raise UnreadableImage(where, "not an image file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(where, f"unreadable image ({exc})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise UnreadableImage(where, f"unreadable image (decoded shape {rgb.shape})")
    return np.ascontiguousarray(rgb)


def image_loader(src: str | Path, fmt: str) -> Callable[[str], np.ndarray]:
    """A function from a record's path to its decoded RGB photo (thread-safe)."""
    if fmt == "rec":
        return _rec_loader(src)
    root = source_root(src, fmt)
    return lambda rel: load_image(root / rel)


# ------------------------------------------------------------------ insightface RecordIO packs

def _rec_paths(src: Path) -> tuple[Path, Path]:
    """(.rec, .idx) for a .rec file or a folder holding train.rec (insightface's layout)."""
    if not src.exists():
        raise MtmimError(f"{src}: no such file or folder")
    rec = src if src.is_file() else src / "train.rec"
    if rec.suffix != ".rec" or not rec.is_file():
        raise MtmimError(f"{src}: --format rec expects an insightface .rec file (with its .idx "
                         "beside it) or a folder holding train.rec and train.idx")
    idx = rec.with_suffix(".idx")
    if not idx.is_file():
        raise MtmimError(f"{idx}: no such file (the .idx beside the .rec)")
    return rec, idx


def read_rec(src: Path) -> list[Record]:
    """One record per image of an insightface .rec pack; path '<name>.rec#<key>', identity the
    label. Labels come from record headers only (`insightface.rec_labels`): no image is read,
    so every `align --shard` process can afford to list the whole pack."""
    from mtmim_cli.data.insightface import rec_labels

    rec, idx = _rec_paths(src)
    found = rec_labels(rec, idx)
    if not found.keys.size:
        raise MtmimError(f"{rec}: no image records")
    # keys are increasing and zero-padded, so this is already sorted by path
    return [Record(f"{rec.name}#{key:010d}", str(int(label)))
            for key, label in zip(found.keys.tolist(), found.labels.tolist(), strict=True)]


def _rec_loader(src: str | Path) -> Callable[[str], np.ndarray]:
    from mtmim_cli.data.insightface import _read_record, read_idx_arrays, unpack_record

    rec, idx = _rec_paths(Path(src))
    keys, offsets = read_idx_arrays(idx)

    def load(rel: str) -> np.ndarray:
        key = int(rel.rsplit("#", 1)[1])
        where = f"{rec}#{key}"
        at = int(np.searchsorted(keys, key))
        if at == len(keys) or keys[at] != key:
            raise MtmimError(f"{where}: no such record in {idx.name}")
        with open(rec, "rb") as fh:  # one handle per call: loads run in several threads
            fh.seek(int(offsets[at]))
            item = unpack_record(_read_record(fh, where), key, where)
        return load_image(io.BytesIO(item.image), where=where)

    return load
