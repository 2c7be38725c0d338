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


# ---------------------------------------------------------------- header-only label scan
def _rchar() -> int:
    """Bytes this process has asked the kernel to read (read, pread, readv ...)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _pack_items(n_ids: int, seed: int = 0, size: int = 3000) -> list[tuple[float, bytes]]:
    """Random-length runs of records per label; payloads are random bytes (never decoded)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(1000)[:n_ids]
    return [(float(lab), rng.bytes(size + int(rng.integers(0, 500))))
            for lab in labels for _ in range(int(rng.integers(1, 7)))]


def _full_labels(rec: Path) -> tuple[list[int], list[float]]:
    """What reading every whole record gives (today's reader)."""
    got = [g for g in iter_rec(rec) if g.image]
    return ([g.key for g in got],
            [g.label if isinstance(g.label, float) else float(g.label[0]) for g in got])


def _measured(fn):
    """fn's result and the bytes it read (less what reading /proc/self/io itself costs)."""
    fn()  # imports and first-touch costs out of the way
    before = _rchar()
    itself = _rchar() - before
    before = _rchar()
    out = fn()
    return out, _rchar() - before - itself


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("ranges", [True, False])
def test_label_scan_reads_no_image(tmp_path: Path, ranges: bool) -> None:
    from mtmim_cli.data.insightface import rec_labels, write_rec

    items = _pack_items(40)
    rec = write_rec(tmp_path / "train.rec", items, identity_ranges=ranges)
    payload = sum(len(b) for _, b in items)
    idx_bytes = rec.with_suffix(".idx").stat().st_size

    full, full_read = _measured(lambda: _full_labels(rec))
    assert full_read >= payload                       # the measure sees whole records
    assert full[1] == [lab for lab, _ in items]
    got, read = _measured(lambda: rec_labels(rec))
    assert got.method == ("ranges" if ranges else "headers")
    assert got.keys.tolist() == full[0] and got.labels.tolist() == full[1]
    # the index, plus ~40 bytes per record header looked at: no payload
    per_record = 40 * (3 * 40 + 1) if ranges else 40 * (len(items) + 1)  # + key 0 tried as a header
    assert read <= idx_bytes + per_record, (read, idx_bytes, per_record)
    assert read < payload / 20


def test_label_scan_falls_back_when_ranges_do_not_check(tmp_path: Path) -> None:
    from mtmim_cli.data.insightface import read_idx, rec_labels, write_rec

    items = [(7.0, b"a" * 100)] * 3 + [(2.0, b"b" * 100)] * 2
    rec = write_rec(tmp_path / "train.rec", items)
    assert rec_labels(rec).method == "ranges"
    # relabel the last image of the first identity's range: the range no longer checks
    off = read_idx(rec.with_suffix(".idx"))[3]
    data = bytearray(rec.read_bytes())
    data[off + 12: off + 16] = struct.pack("<f", 9.0)
    rec.write_bytes(bytes(data))
    got = rec_labels(rec)
    assert got.method == "headers"
    assert got.labels.tolist() == [7.0, 7.0, 9.0, 2.0, 2.0] == _full_labels(rec)[1]
    assert rec_labels(rec, method="headers").labels.tolist() == got.labels.tolist()


def test_label_scan_matches_hand_written_pack(tmp_path: Path) -> None:
    from mtmim_cli.data.insightface import rec_labels

    items = [(float(k // 2), _jpeg(k)) for k in range(5)]
    rec = _write_rec(tmp_path, items)
    got = rec_labels(rec)
    assert got.keys.tolist() == [1, 2, 3, 4, 5]
    assert got.labels.tolist() == [lab for lab, _ in items]


@pytest.mark.parametrize("text,msg", [
    ("0\t0\n1\t40\n1\t80\n", "key 1 appears twice"),
    ("0\t0\n1 40\n", "line 2"),
    ("0\t0\t5\n1\n", "line 1"),
    ("0\tx\n", "line 1"),
])
def test_bad_idx(tmp_path: Path, text: str, msg: str) -> None:
    from mtmim_cli.data.insightface import read_idx

    (tmp_path / "t.idx").write_text(text)
    with pytest.raises(MtmimError, match=msg):
        read_idx(tmp_path / "t.idx")
