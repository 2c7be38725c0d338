"""insightface .bin pair files (restricted unpickler, malicious pickles) and .rec/.idx packs."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtmim_cli.data.insightface import decode_pair_images, iter_rec, load_pair_bin
from mtmim_cli.errors import MtmimError


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("protocol", [2, 4])
def test_reads_a_pair_bin(tmp_path: Path, protocol: int) -> None:
    bins = [_jpeg(k) for k in range(6)]
    issame = [True, False, True]
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
    pb = load_pair_bin(path)
    assert pb.images == bins and pb.issame.tolist() == issame
    imgs = decode_pair_images(pb, str(path))
    assert imgs.shape == (6, 112, 112, 3) and imgs.dtype == np.uint8


def test_python2_style_strings(tmp_path: Path) -> None:
    # Python 2 wrote bytes as SHORT_BINSTRING; protocol-0 text uses STRING. Hand-assembled:
    # ( [ 'ab' ] , [ True ] ) with a second image, as a py2 protocol-2 pickle.
    body = (b"\x80\x02" b"]q\x00(U\x02abq\x01U\x02cdq\x02e" b"]q\x03\x88a" b"\x86q\x04.")
    path = tmp_path / "old.bin"
    path.write_bytes(body)
    pb = load_pair_bin(path)
    assert pb.images == [b"ab", b"cd"] and pb.issame.tolist() == [True]


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(target)], [True]), protocol=2))
    with pytest.raises(MtmimError, match="not allowed"):
        load_pair_bin(path)
    assert not target.exists()
    # Smuggling through the one admitted callable does not work either.
    path.write_bytes(b"\x80\x02c_codecs\nencode\nq\x00K\x01K\x02\x86R.")
    with pytest.raises(MtmimError, match="encode"):
        load_pair_bin(path)
    # Nor does a builtins lookup (eval) in protocol 0.
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(MtmimError, match="not allowed"):
        load_pair_bin(path)


@pytest.mark.parametrize("obj,msg", [
    ({"a": 1}, "pair"),
    (([b"a", b"b"], [1]), "booleans"),
    (([b"a", "b"], [True]), "bytes"),
    (([b"a"], [True]), "2 per pair"),
])
def test_wrong_structure(tmp_path: Path, obj, msg: str) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(MtmimError, match=msg):
        load_pair_bin(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"\x00\x01not a pickle")
    with pytest.raises(MtmimError, match="x.bin"):
        load_pair_bin(path)


def _write_rec(tmp_path: Path, items: list[tuple[float, bytes]]) -> Path:
    """A .rec/.idx pair written from the RecordIO spec, with one header record first."""
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    lines = []
    with open(rec, "wb") as fh:
        payloads = [struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", 1, len(items) + 1)]
        payloads += [struct.pack("<IfQQ", 0, lab, k + 1, 0) + img
                     for k, (lab, img) in enumerate(items)]
        for key, p in enumerate(payloads):
            lines.append(f"{key}\t{fh.tell()}")
            fh.write(struct.pack("<II", 0xCED7230A, len(p)))
            fh.write(p + b"\x00" * ((4 - len(p) % 4) % 4))
    idx.write_text("\n".join(lines) + "\n")
    return rec


def test_rec_reader(tmp_path: Path) -> None:
    items = [(float(k // 2), _jpeg(k)) for k in range(5)]
    rec = _write_rec(tmp_path, items)
    got = list(iter_rec(rec))
    assert len(got) == 6
    assert got[0].label.tolist() == [1.0, 6.0] and got[0].image == b""
    assert [g.label for g in got[1:]] == [lab for lab, _ in items]
    assert [g.image for g in got[1:]] == [img for _, img in items]
    rec.write_bytes(rec.read_bytes()[:-10])
    with pytest.raises(MtmimError, match="truncated"):
        list(iter_rec(rec))
