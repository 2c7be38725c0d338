"""insightface's evaluation `.bin` pair files and MXNet `.rec/.idx` image packs.

A `.bin` file (lfw.bin, agedb_30.bin, calfw.bin, ...) is a pickle of `(bins, issame)`: a
list of 2N encoded 112x112 images (pairs are consecutive) and a list of N booleans. A pickle
can run any code on load, so it is read by an unpickler that builds only bytes, lists, tuples
and booleans; Python 2 era files spell bytes as `_codecs.encode(str, 'latin1')`, the only
callable admitted, and only in that form.

A `.rec` file is MXNet RecordIO: per record a magic word, a length word (upper 3 bits a
continuation flag), the payload padded to 4 bytes. The payload starts with an IRHeader
(flag uint32, label float32, id uint64, id2 uint64) followed by `flag` extra float32 labels
when flag > 0, then the encoded image. The `.idx` file maps record keys to byte offsets.

insightface's face packs (CASIA-WebFace, MS1M, Glint360K) put a header at key 0 whose two
labels are (identity_key_start, identity_key_end): images are keys 1..identity_key_start-1,
and each key in [identity_key_start, identity_key_end) is an identity record whose two labels
are the range [a, b) of that identity's image keys (insightface's mxnet iterators and
rec2image read them this way; arcface_torch reads record 0 for the image key range).
`rec_labels` uses those ranges, so collecting the labels of 5.8M photos reads about three
record headers per identity and no image.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from mtmim_cli.atomic import atomic_write
from mtmim_cli.errors import MtmimError

_MAX_BIN_BYTES = 4 << 30


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode admitted only as encode(str, 'latin1')")
    return text.encode("latin1")


class _PairUnpickler(pickle.Unpickler):
    """Admits no global except a guarded `_codecs.encode`; the pickle opcodes themselves
    build only str/bytes/lists/tuples/bools/ints/None, checked after loading."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not allowed")


@dataclass
class PairBin:
    images: list[bytes]      # 2N encoded images, pair k = (2k, 2k+1)
    issame: np.ndarray       # N booleans

    def __len__(self) -> int:
        return len(self.issame)


def load_pair_bin(path: str | os.PathLike) -> PairBin:
    """Read an insightface `.bin` pair file safely. Anything that is not
    `(list[bytes], list[bool])` with 2 images per flag raises MtmimError."""
    path = Path(path)
    if not path.exists():
        raise MtmimError(f"{path}: no such file")
    if path.stat().st_size > _MAX_BIN_BYTES:
        raise MtmimError(f"{path}: larger than 4 GiB, not a pair file")
    data = path.read_bytes()
    try:
        obj = _PairUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, struct.error, UnicodeError) as exc:
        raise MtmimError(f"{path}: not a readable pair file ({exc})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise MtmimError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, list) or not all(isinstance(b, bytes) for b in bins):
        raise MtmimError(f"{path}: the first element must be a list of encoded images (bytes)")
    if not isinstance(issame, list) or not all(isinstance(b, bool) for b in issame):
        raise MtmimError(f"{path}: the second element must be a list of booleans")
    if len(bins) != 2 * len(issame):
        raise MtmimError(f"{path}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)")
    return PairBin(images=bins, issame=np.array(issame, dtype=bool))


def decode_image(data: bytes, where: str = "") -> np.ndarray:
    """An encoded image -> (112,112,3) uint8 RGB (resized when the file holds another size)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if im.size != (112, 112):
                im = im.resize((112, 112), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - a broken image is the input's fault
        raise MtmimError(f"{where}: undecodable image ({exc})") from None


def decode_pair_images(pb: PairBin, where: str = "") -> np.ndarray:
    """All images of a pair file as one uint8 (2N,112,112,3) array."""
    out = np.empty((len(pb.images), 112, 112, 3), np.uint8)
    for k, b in enumerate(pb.images):
        out[k] = decode_image(b, f"{where} image {k}")
    return out


# ---------------------------------------------------------------- RecordIO
_MAGIC = 0xCED7230A
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)


@dataclass
class RecItem:
    key: int
    label: float | np.ndarray   # one float, or the extra labels when flag > 0
    id: int
    image: bytes                # encoded image ('' for header records)


def read_idx_arrays(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """`.idx` as (keys, offsets) int64 arrays sorted by key: one `key<TAB>offset` line per
    record. Parsed with numpy (an MS1M index has 5.8M lines); a malformed file is re-read line
    by line only to name the bad line."""
    data = Path(path).read_bytes()
    try:
        flat = np.array(data.split(), dtype=np.int64)
    except (ValueError, OverflowError):
        _idx_error(path, data)
    buf = np.frombuffer(data, np.uint8)
    tab_line = np.searchsorted(np.flatnonzero(buf == 10), np.flatnonzero(buf == 9))
    # two numbers per line, one tab between them: as many tabs as pairs, no two on one line
    if flat.size != 2 * tab_line.size or (np.diff(tab_line) == 0).any():
        _idx_error(path, data)
    pairs = flat.reshape(-1, 2)
    order = np.argsort(pairs[:, 0], kind="stable")
    keys, offsets = pairs[order, 0], pairs[order, 1]
    if keys.size and (np.diff(keys) == 0).any():
        dup = int(keys[np.flatnonzero(np.diff(keys) == 0)[0]])
        raise MtmimError(f"{path}: key {dup} appears twice")
    return keys, offsets


def _idx_error(path: str | os.PathLike, data: bytes) -> NoReturn:
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            if len(parts) != 2:
                raise ValueError
            int(parts[0]), int(parts[1])
        except ValueError:
            raise MtmimError(f"{path}: line {n} is not 'key<TAB>offset'") from None
    raise MtmimError(f"{path}: not a RecordIO index ('key<TAB>offset' lines)")


def read_idx(path: str | os.PathLike) -> dict[int, int]:
    """`.idx`: one `key<TAB>offset` line per record, as a dict."""
    keys, offsets = read_idx_arrays(path)
    return dict(zip(keys.tolist(), offsets.tolist(), strict=True))


def _read_record(fh, where: str) -> bytes:
    chunks = []
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise MtmimError(f"{where}: truncated record header")
        magic, lrec = struct.unpack("<II", head)
        if magic != _MAGIC:
            raise MtmimError(f"{where}: bad RecordIO magic {magic:#x}")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        body = fh.read(length)
        if len(body) < length:
            raise MtmimError(f"{where}: truncated record")
        fh.read((4 - length % 4) % 4)
        chunks.append(body)
        if cflag in (0, 3):  # whole record, or the last part of a split one
            return b"".join(chunks)


def unpack_record(payload: bytes, key: int, where: str = "") -> RecItem:
    if len(payload) < _IR_SIZE:
        raise MtmimError(f"{where}: record {key} shorter than its header")
    flag, label, ident, _ = struct.unpack_from(_IR_FORMAT, payload)
    body = payload[_IR_SIZE:]
    lab: float | np.ndarray = float(label)
    if flag > 0:
        if len(body) < 4 * flag:
            raise MtmimError(f"{where}: record {key} shorter than its {flag} labels")
        lab = np.frombuffer(body[:4 * flag], dtype="<f4").copy()
        body = body[4 * flag:]
    return RecItem(key=key, label=lab, id=int(ident), image=body)


def iter_rec(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None
             ) -> Iterator[RecItem]:
    """Every record of a `.rec` file in key order (insightface's record 0 is a header whose
    labels give the image key range; it is yielded like the others, with `image` empty)."""
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path else rec_path.with_suffix(".idx")
    if not rec_path.exists():
        raise MtmimError(f"{rec_path}: no such file")
    if not idx_path.exists():
        raise MtmimError(f"{idx_path}: no such file (the .idx beside the .rec)")
    index = read_idx(idx_path)
    with open(rec_path, "rb") as fh:
        for key in sorted(index):
            fh.seek(index[key])
            yield unpack_record(_read_record(fh, str(rec_path)), key, str(rec_path))


# ------------------------------------------------------------ labels without image payloads
# Enough bytes for the RecordIO word pair, the IRHeader and two extra labels.
_HEAD = 8 + _IR_SIZE + 8


@dataclass
class RecLabels:
    """The image records of a pack: keys (increasing) and labels (the first label of records
    that carry several), and how they were found ("ranges" or "headers")."""
    keys: np.ndarray
    labels: np.ndarray
    method: str


def _head(fd: int, offset: int, where: str) -> tuple[int, tuple[float, ...], bool]:
    """(flag, labels, has_image) of the record at `offset`, from its first `_HEAD` bytes.
    `labels` is (label,) when flag == 0, else the first (up to two) extra labels."""
    raw = os.pread(fd, _HEAD, offset)
    if len(raw) < 8 + _IR_SIZE:
        raise MtmimError(f"{where}: truncated record at byte {offset}")
    magic, lrec = struct.unpack_from("<II", raw)
    if magic != _MAGIC:
        raise MtmimError(f"{where}: bad RecordIO magic {magic:#x} at byte {offset}")
    cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
    flag, label, _, _ = struct.unpack_from(_IR_FORMAT, raw, 8)
    if flag == 0:
        return 0, (float(label),), cflag != 0 or length > _IR_SIZE
    n = min(int(flag), 2, (len(raw) - 8 - _IR_SIZE) // 4)
    if n < 1 or length < _IR_SIZE + 4 * n:
        raise MtmimError(f"{where}: record at byte {offset} shorter than its {flag} labels")
    extra = struct.unpack_from(f"<{n}f", raw, 8 + _IR_SIZE)
    # a split record (cflag 1) is long, so it holds an image
    return int(flag), tuple(float(v) for v in extra), cflag != 0 or length > _IR_SIZE + 4 * flag


def _labels_from_ranges(fd: int, keys: np.ndarray, offsets: np.ndarray,
                        where: str) -> RecLabels | None:
    """Labels from the identity ranges of an insightface header, or None when the pack has
    none or they do not check (each range's first and last image must carry one label)."""
    if not keys.size or keys[0] != 0:
        return None
    flag, lab, _ = _head(fd, int(offsets[0]), where)
    if flag != 2 or len(lab) != 2:
        return None
    id_start, id_end = int(lab[0]), int(lab[1])
    # every key 0..id_end-1 present and nothing else: offsets[k] is key k's offset
    if not (1 < id_start < id_end) or keys.size != id_end or keys[-1] != id_end - 1:
        return None
    labels = np.empty(id_start - 1, np.float64)
    expect = 1
    for ident in range(id_start, id_end):
        flag, lab, _ = _head(fd, int(offsets[ident]), where)
        if flag != 2 or len(lab) != 2:
            return None
        a, b = int(lab[0]), int(lab[1])
        if a != expect or not a < b <= id_start:
            return None
        first, last = _head(fd, int(offsets[a]), where), _head(fd, int(offsets[b - 1]), where)
        if not (first[2] and last[2]) or first[1][0] != last[1][0]:
            return None
        labels[a - 1:b - 1] = first[1][0]
        expect = b
    if expect != id_start:
        return None
    return RecLabels(np.arange(1, id_start, dtype=np.int64), labels, "ranges")


def _labels_from_headers(fd: int, keys: np.ndarray, offsets: np.ndarray,
                         where: str) -> RecLabels:
    """Every record's header, in key order; records without an image are left out."""
    out_keys, out_labels = [], []
    for key, off in zip(keys.tolist(), offsets.tolist(), strict=True):
        _, lab, has_image = _head(fd, off, where)
        if has_image:
            out_keys.append(key)
            out_labels.append(lab[0])
    return RecLabels(np.array(out_keys, np.int64), np.array(out_labels, np.float64), "headers")


def rec_labels(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
               method: str = "auto") -> RecLabels:
    """Image keys and labels of a `.rec` pack without reading any image payload.

    "auto" uses the header's identity ranges when they are present and consistent, and
    otherwise reads each record's header (about 40 bytes a record); "headers" forces the
    latter. Either gives what reading every whole record would (`iter_rec`).
    """
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path else rec_path.with_suffix(".idx")
    if not rec_path.exists():
        raise MtmimError(f"{rec_path}: no such file")
    if not idx_path.exists():
        raise MtmimError(f"{idx_path}: no such file (the .idx beside the .rec)")
    if method not in ("auto", "headers"):
        raise ValueError(f"method {method!r}")
    keys, offsets = read_idx_arrays(idx_path)
    with open(rec_path, "rb", buffering=0) as fh:
        got = None
        if method == "auto":
            got = _labels_from_ranges(fh.fileno(), keys, offsets, str(rec_path))
        return got or _labels_from_headers(fh.fileno(), keys, offsets, str(rec_path))


def write_rec(rec_path: str | os.PathLike, items: Iterable[tuple[float, bytes]],
              identity_ranges: bool = True) -> Path:
    """Write `(label, encoded image)` items as an insightface pack `<name>.rec` + `<name>.idx`.

    With `identity_ranges` the pack has insightface's layout: header at key 0, images at keys
    1..n, then one identity record per label (items must then come grouped by label); without,
    the images start at key 0 and there is no header (a plain mxnet im2rec pack). Both files
    are written under temporary names and renamed when complete.
    """
    rec_path = Path(rec_path)
    idx_path = rec_path.with_suffix(".idx")
    offsets: list[int] = []
    ranges: list[tuple[int, int]] = []
    with atomic_write(rec_path) as tmp, open(tmp, "wb") as fh:
        def put(flag: int, label: float, key: int, extra: Sequence[float], body: bytes) -> None:
            payload = struct.pack(_IR_FORMAT, flag, label, key, 0)
            payload += struct.pack(f"<{len(extra)}f", *extra) + body
            offsets.append(fh.tell())
            fh.write(struct.pack("<II", _MAGIC, len(payload)))
            fh.write(payload + b"\0" * ((4 - len(payload) % 4) % 4))

        if identity_ranges:
            put(2, 0.0, 0, (0.0, 0.0), b"")   # rewritten below, same size
        first = int(identity_ranges)
        labels_seen: list[float] = []
        for key, (label, image) in enumerate(items, first):
            if identity_ranges and (not labels_seen or labels_seen[-1] != label):
                if label in labels_seen:
                    raise ValueError(f"label {label} appears in two runs; group items by label")
                labels_seen.append(label)
                ranges.append((key, key + 1))
            elif identity_ranges:
                ranges[-1] = (ranges[-1][0], key + 1)
            put(0, float(label), key, (), image)
        if identity_ranges:
            id_start = len(offsets)
            for k, (a, b) in enumerate(ranges):
                put(2, 0.0, id_start + k, (float(a), float(b)), b"")
            end = fh.tell()
            fh.seek(0)
            put(2, 0.0, 0, (float(id_start), float(id_start + len(ranges))), b"")
            offsets.pop()
            fh.seek(end)
    with atomic_write(idx_path) as tmp:
        tmp.write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    return rec_path
