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
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def read_idx(path: str | os.PathLike) -> dict[int, int]:
    """`.idx`: one `key<TAB>offset` line per record."""
    out: dict[int, int] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            out[int(parts[0])] = int(parts[1])
        except (IndexError, ValueError):
            raise MtmimError(f"{path}: line {n} is not 'key<TAB>offset'") from None
    return out


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
