"""Every reader on small generated trees; decoding of bad and unusual photos."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtmim_cli.data.readers import load_image, read_records, source_root
from mtmim_cli.errors import MtmimError


def touch(root: Path, *names: str) -> None:
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(p, format="PNG")  # the extension is what readers see


def as_tuples(records):
    return [(r.path, r.identity, None if math.isnan(r.age) else r.age, r.split) for r in records]


def test_fgnet(tmp_path):
    touch(tmp_path / "images", "002A10.JPG", "001A43b.JPG", "001A02.jpg", "001A43a.JPG")
    (tmp_path / "images" / "notes.txt").write_text("ignored: not a photo")
    for src in (tmp_path, tmp_path / "images"):  # the dataset folder or its images/ folder
        assert as_tuples(read_records(src, "fgnet")) == [
            ("001A02.jpg", "001", 2.0, ""), ("001A43a.JPG", "001", 43.0, ""),
            ("001A43b.JPG", "001", 43.0, ""), ("002A10.JPG", "002", 10.0, "")]
        assert source_root(src, "fgnet") == (tmp_path / "images").resolve()


def test_fgnet_wrong_names_fail_at_once(tmp_path):
    touch(tmp_path, "001A02.JPG", "holiday.jpg")
    with pytest.raises(MtmimError, match=r"holiday.jpg: name does not match --format fgnet \(expected SSSAaa"):
        read_records(tmp_path, "fgnet")


@pytest.mark.parametrize("header", [True, False])
def test_celeba(tmp_path, header):
    touch(tmp_path / "images", "000002.jpg", "000001.jpg", "000003.jpg")
    lines = (["image identity"] if header else []) + ["000002.jpg 7", "000001.jpg 12", "000003.jpg 7", ""]
    (tmp_path / "identities.txt").write_text("\n".join(lines))
    expected = [("000001.jpg", "12", None, ""), ("000002.jpg", "7", None, ""), ("000003.jpg", "7", None, "")]
    assert as_tuples(read_records(tmp_path, "celeba")) == expected
    assert as_tuples(read_records(tmp_path / "identities.txt", "celeba")) == expected
    assert source_root(tmp_path, "celeba") == (tmp_path / "images").resolve()


def test_celeba_needs_label_file(tmp_path):
    touch(tmp_path, "000001.jpg")
    with pytest.raises(MtmimError, match="expects an identity file"):
        read_records(tmp_path, "celeba")
    (tmp_path / "identities.txt").write_text("000001.jpg\n")
    with pytest.raises(MtmimError, match="expected 'image identity'"):
        read_records(tmp_path, "celeba")


def test_folder(tmp_path):
    touch(tmp_path, "Bob_Smith/Bob_Smith_0002.jpg", "Bob_Smith/Bob_Smith_0001.jpg",
          "0000045/001.png", "0000045/sub/002.jpg", "Ann/readme.txt")
    (tmp_path / "loose.jpg").write_bytes(b"")  # a file at the top is not an identity
    assert as_tuples(read_records(tmp_path, "folder")) == [
        ("0000045/001.png", "0000045", None, ""), ("0000045/sub/002.jpg", "0000045", None, ""),
        ("Bob_Smith/Bob_Smith_0001.jpg", "Bob_Smith", None, ""),
        ("Bob_Smith/Bob_Smith_0002.jpg", "Bob_Smith", None, "")]


def test_empty_folder_fails_for_every_folder_format(tmp_path):
    for fmt in ("fgnet", "folder", "agedb", "cacd", "morph"):
        with pytest.raises(MtmimError, match="no photos found"):
            read_records(tmp_path, fmt)


def test_csv(tmp_path):
    (tmp_path / "list.csv").write_text("Path,identity,age,split\n"
                                       "b/2.jpg,bob,31.5,test\na/1.jpg,ann,,train\n")
    assert as_tuples(read_records(tmp_path / "list.csv", "csv")) == [
        ("a/1.jpg", "ann", None, "train"), ("b/2.jpg", "bob", 31.5, "test")]
    assert source_root(tmp_path / "list.csv", "csv") == tmp_path.resolve()
    (tmp_path / "min.csv").write_text("identity,path\nx,1.jpg\n")
    assert as_tuples(read_records(tmp_path / "min.csv", "csv")) == [("1.jpg", "x", None, "")]


def test_csv_errors(tmp_path):
    (tmp_path / "a.csv").write_text("file,person\n1.jpg,x\n")
    with pytest.raises(MtmimError, match="header lacks path, identity"):
        read_records(tmp_path / "a.csv", "csv")
    (tmp_path / "b.csv").write_text("path,identity,age\n1.jpg,x,old\n")
    with pytest.raises(MtmimError, match=r"b.csv:2: age 'old' is not a number"):
        read_records(tmp_path / "b.csv", "csv")
    (tmp_path / "c.csv").write_text("path,identity\n")
    with pytest.raises(MtmimError, match="no rows"):
        read_records(tmp_path / "c.csv", "csv")
    with pytest.raises(MtmimError, match="expects a CSV file"):
        read_records(tmp_path, "csv")


def test_agedb(tmp_path):
    touch(tmp_path, "10_MariaCallas_35_f.jpg", "2_AlbertEinstein_74_m.jpg", "0_MariaCallas_20_f.jpg")
    assert as_tuples(read_records(tmp_path, "agedb")) == [
        ("0_MariaCallas_20_f.jpg", "MariaCallas", 20.0, ""),
        ("10_MariaCallas_35_f.jpg", "MariaCallas", 35.0, ""),
        ("2_AlbertEinstein_74_m.jpg", "AlbertEinstein", 74.0, "")]
    touch(tmp_path, "14_Aaron_Johnson_0001.jpg")
    with pytest.raises(MtmimError, match="does not match --format agedb"):
        read_records(tmp_path, "agedb")


def test_cacd(tmp_path):
    touch(tmp_path, "14_Aaron_Johnson_0001.jpg", "23_Aaron_Johnson_0002.jpg", "50_Cher_0001.jpg")
    assert as_tuples(read_records(tmp_path, "cacd")) == [
        ("14_Aaron_Johnson_0001.jpg", "Aaron_Johnson", 14.0, ""),
        ("23_Aaron_Johnson_0002.jpg", "Aaron_Johnson", 23.0, ""),
        ("50_Cher_0001.jpg", "Cher", 50.0, "")]


def test_morph_csv_and_names(tmp_path):
    touch(tmp_path / "Album2", "003620_00M25.JPG", "003620_01M27.JPG", "100017_0F21.JPG")
    (tmp_path / "morph.csv").write_text(
        "id_num,picture_num,dob,doa,race,gender,facial_hair,age,age_diff,glasses,photo\n"
        "3620,1,x,x,B,M,0,27,2,0,Album2\\003620_01M27.JPG\n"
        "3620,0,x,x,B,M,0,25,0,0,Album2/003620_00M25.JPG\n"
        "100017,0,x,x,W,F,0,21,0,0,Album2/100017_0F21.JPG\n")
    expected = [("Album2/003620_00M25.JPG", "3620", 25.0, ""), ("Album2/003620_01M27.JPG", "3620", 27.0, ""),
                ("Album2/100017_0F21.JPG", "100017", 21.0, "")]
    assert as_tuples(read_records(tmp_path / "morph.csv", "morph")) == expected
    assert as_tuples(read_records(tmp_path, "morph")) == expected  # the one CSV in the folder
    assert as_tuples(read_records(tmp_path / "Album2", "morph")) == [  # no CSV: from the names
        ("003620_00M25.JPG", "3620", 25.0, ""), ("003620_01M27.JPG", "3620", 27.0, ""),
        ("100017_0F21.JPG", "100017", 21.0, "")]
    (tmp_path / "bad.csv").write_text("id,photo\n1,a.jpg\n")
    with pytest.raises(MtmimError, match="lacks column"):
        read_records(tmp_path / "bad.csv", "morph")


def test_unknown_format_and_missing_source(tmp_path):
    with pytest.raises(MtmimError, match="unknown format .*fgnet, celeba, folder"):
        read_records(tmp_path, "imagenet")
    with pytest.raises(MtmimError, match="no such file"):
        read_records(tmp_path / "nope", "fgnet")


def test_records_are_deterministic(tmp_path):
    names = [f"{s:03d}A{a:02d}.JPG" for s in range(1, 6) for a in (9, 1, 30)]
    touch(tmp_path, *reversed(names))
    a, b = read_records(tmp_path, "fgnet"), read_records(tmp_path, "fgnet")
    assert a == b and [r.path for r in a] == sorted(names)


# ------------------------------------------------------------------------------ decoding

def test_load_image_bad_files(tmp_path):
    from tests.faces import bad_files

    bad_files(tmp_path, {"corrupt": "c.jpg", "text": "t.jpg"})
    with pytest.raises(MtmimError, match=r"c.jpg: unreadable image"):
        load_image(tmp_path / "c.jpg")
    with pytest.raises(MtmimError, match=r"t.jpg: not an image file"):
        load_image(tmp_path / "t.jpg")
    with pytest.raises(MtmimError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(MtmimError, match="empty.jpg: not an image file"):
        load_image(tmp_path / "empty.jpg")


def test_load_image_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    grey = rgb[:, :, 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out == grey[:, :, None]).all()

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    out = load_image(tmp_path / "cmyk.jpg")
    assert out.shape == (20, 30, 3) and np.abs(out.astype(int) - rgb).mean() < 12

    rgba = np.dstack([rgb, np.full((20, 30), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # a transparent pixel becomes black
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert (out[1:, 1:] == rgb[1:, 1:]).all() and (out[0, 0] == 0).all()

    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert (load_image(tmp_path / "g16.png")[:, :, 0] == grey).all()

    Image.new("RGB", (1, 1), (5, 6, 7)).save(tmp_path / "one.png")
    assert load_image(tmp_path / "one.png").tolist() == [[[5, 6, 7]]]


def test_exif_orientation_is_honoured(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = 255  # a white band at the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(img).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=100)
    out = load_image(tmp_path / "o.jpg")
    assert out.shape == (40, 20, 3)  # displayed upright: portrait
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the band is now on top


def write_rec(folder: Path, images: list[np.ndarray], labels: list[int], corrupt: int = -1) -> Path:
    """A minimal insightface pack: header record 0 (flag 2, key range), then one JPEG per record."""
    import io
    import struct

    def record(flag: int, label: float, key: int, extra: bytes, body: bytes) -> bytes:
        payload = struct.pack("<IfQQ", flag, label, key, 0) + extra + body
        pad = (4 - len(payload) % 4) % 4
        return struct.pack("<II", 0xCED7230A, len(payload)) + payload + b"\0" * pad

    folder.mkdir(parents=True, exist_ok=True)
    blobs = [record(2, 0.0, 0, struct.pack("<ff", 1, len(images) + 1), b"")]
    for k, (img, lab) in enumerate(zip(images, labels, strict=True), 1):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        body = buf.getvalue() if k - 1 != corrupt else b"garbage"
        blobs.append(record(0, float(lab), k, b"", body))
    offsets, pos = [], 0
    for b in blobs:
        offsets.append(pos)
        pos += len(b)
    (folder / "train.rec").write_bytes(b"".join(blobs))
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets)))
    return folder


def test_rec_pack(tmp_path):
    from mtmim_cli.data.readers import image_loader

    yy, xx = np.mgrid[0:112, 0:112]
    imgs = [np.dstack([xx * 2, yy * 2, (xx + yy) * k]).astype(np.uint8) for k in range(3)]
    write_rec(tmp_path / "casia", imgs, [5, 0, 5], corrupt=1)
    for src in (tmp_path / "casia", tmp_path / "casia" / "train.rec"):
        assert as_tuples(read_records(src, "rec")) == [
            ("train.rec#0000000001", "5", None, ""), ("train.rec#0000000002", "0", None, ""),
            ("train.rec#0000000003", "5", None, "")]
    load = image_loader(tmp_path / "casia", "rec")
    out = load("train.rec#0000000003")
    assert out.shape == (112, 112, 3) and np.abs(out.astype(int) - imgs[2]).mean() < 20
    with pytest.raises(MtmimError, match=r"train.rec#2: not an image file"):
        load("train.rec#0000000002")
    (tmp_path / "casia" / "train.idx").unlink()
    with pytest.raises(MtmimError, match="train.idx: no such file"):
        read_records(tmp_path / "casia", "rec")
    with pytest.raises(MtmimError, match="expects an insightface .rec file"):
        read_records(tmp_path, "rec")
