"""ONNX face encoders as trainable torch modules (models/onnx_graph.py,
models/backbones/onnx_encoder.py): outputs against the torch models the files were exported
from and against onnxruntime, the input convention, stages, checkpoints and export round
trips, and the refusals. The files are made here (tests/onnx_models.py); SFace's quantized
path is in tests/real/test_sface.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtmim_cli.data.dataset import preprocess
from mtmim_cli.errors import MtmimError
from mtmim_cli.models.identity import load_identity_model
from mtmim_cli.models.onnx_graph import dequantize, parse_spec
from tests.conftest import run_cli, write_cache
from tests.onnx_models import (
    batch_one_mobilefacenet,
    dynamic_width_graph,
    insightface_iresnet,
    ort_features,
    pixel_mobilefacenet,
    tiny_graph,
)


def _faces(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def _nchw(images: np.ndarray, width: int = 112) -> np.ndarray:
    """uint8 (N,112,112,3) -> float32 (N,3,112,width) raw pixels, centre columns."""
    cut = (112 - width) // 2
    return np.ascontiguousarray(images[:, :, cut:cut + width].transpose(0, 3, 1, 2)).astype(np.float32)


# ---------------------------------------------------------------------------------------
def test_dequantize_matches_the_onnx_reference_block_axis_and_tensor() -> None:
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (6, 130), dtype=np.int8)
    cases = [(rng.random((6, 3), dtype=np.float32) + 0.01, rng.integers(-5, 5, (6, 3)).astype(np.int8), 1, 64),
             (rng.random((6,), dtype=np.float32) + 0.01, rng.integers(-5, 5, 6).astype(np.int8), 0, 0),
             (np.float32(0.02), np.int8(3), 1, 0)]
    for scale, zp, axis, block in cases:
        attrs = {"axis": axis, **({"block_size": block} if block else {})}
        node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], **attrs)
        graph = helper.make_graph(
            [node], "dq", [helper.make_tensor_value_info(n, t, None) for n, t in
                           (("x", TensorProto.INT8), ("s", TensorProto.FLOAT), ("z", TensorProto.INT8))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        ref = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
        want = ref.run(None, {"x": x, "s": np.asarray(scale), "z": np.asarray(zp)})[0]
        np.testing.assert_array_equal(dequantize(x, np.asarray(scale), np.asarray(zp), axis, block), want)


def test_spec_parsing() -> None:
    assert parse_spec("onnx") == {} and parse_spec(None) == {} and parse_spec("iresnet50") == {}
    assert parse_spec("onnx:BGR") == {"channels": "bgr"}
    assert parse_spec("onnx:rgb,127.5,128") == {"channels": "rgb", "mean": 127.5, "std": 128.0}
    assert parse_spec("onnx:,0,1") == {"mean": 0.0, "std": 1.0}
    for bad in ("onnx:gbr", "onnx:rgb,1", "onnx:rgb,a,b", "onnx:rgb,0,0"):
        with pytest.raises(MtmimError, match="--backbone"):
            parse_spec(bad)


def _close(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> bool:
    """Equal to float32 rounding: within tol of the outputs' scale (unnormalised outputs
    reach ~30, and sums taken in another order, by another thread count, differ by ~1e-5 of
    that; a wrong conversion differs by the outputs' own size)."""
    return float(np.abs(got - want).max()) <= tol * max(1.0, float(np.abs(want).max()))


@pytest.mark.slow
def test_insightface_iresnet_equals_its_torch_model_and_onnxruntime(tmp_path: Path) -> None:
    path, ref_model = insightface_iresnet(tmp_path / "r18.onnx")
    model = load_identity_model(path)
    assert (model.meta["backbone"], model.input_width, model.embedding_size) == ("onnx", 112, 512)
    conv = model.meta["onnx"]["input"]
    assert (conv["channels"], conv["mean"], conv["std"]) == ("rgb", 127.5, 127.5)
    assert conv["decided"] == {"channels": "default (rgb)", "scaling": "default (insightface's)"}
    images = _faces(4)
    with torch.no_grad():
        got = model(preprocess(images, 112)).numpy()
        want = ref_model(torch.from_numpy((_nchw(images) - 127.5) / 127.5)).numpy()
    assert _close(got, want)
    assert _close(got, ort_features(path, (_nchw(images) - 127.5) / 127.5))
    # the stages, applied in order, are forward(); residual blocks are never cut inside
    stages = model.encoder.stages()
    h = preprocess(images, 112)
    with torch.no_grad():
        for _, m in stages:
            h = m(h)
    assert torch.equal(h, torch.from_numpy(got))
    assert 10 <= len(stages) <= 30


def test_pixel_mobilefacenet_reads_its_scaling_from_the_graph_and_keeps_its_width(tmp_path: Path) -> None:
    from mtmim_cli.eval.features import extract_views
    from mtmim_cli.orchestration.refit import encoder_of

    path, ref_model = pixel_mobilefacenet(tmp_path / "mfn.onnx")
    model = load_identity_model(path)
    assert (model.input_width, model.embedding_size) == (96, 128)
    conv = model.meta["onnx"]["input"]
    assert (conv["height"], conv["width"], conv["mean"], conv["std"]) == (112, 96, 0.0, 1.0)
    assert conv["decided"]["scaling"] == "graph"
    images = _faces(5, seed=1)
    with torch.no_grad():
        got = model(preprocess(images, 96)).numpy()
        want = ref_model(torch.from_numpy(_nchw(images, 96))).numpy()
    assert _close(got, want)
    assert _close(got, ort_features(path, _nchw(images, 96)))
    # The crop the model was built for, everywhere: a 112-wide batch is refused, and the
    # head re-fit's features (encoder_of -> extract_views) are the 112x96 ones.
    with pytest.raises(ValueError, match="112x96"):
        model(preprocess(images, 112))
    cache = write_cache(tmp_path / "c.h5", [f"p{k}" for k in range(5)], images=images)
    from mtmim_cli.data.cache import Cache

    a, _ = extract_views(encoder_of(model), Cache(cache), np.arange(5), mirror=False)
    assert np.abs(a - got).max() <= 1e-5


def test_a_batch_of_one_baked_into_a_reshape_is_freed(tmp_path: Path) -> None:
    """The field's MobileFaceNet exports: batch fixed at 1 and `Reshape(x, [1, -1])` before
    the last BatchNorm (once refused: "output has shape [1, None]"). The file runs on any
    batch and gives each face the reference model's features."""
    import onnx
    from onnx import numpy_helper

    path, ref_model = batch_one_mobilefacenet(tmp_path / "mfn-b1.onnx")
    g = onnx.load(str(path)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t)
                   for n in g.node if n.op_type == "Constant"})
    targets = [consts[n.input[1]].tolist() for n in g.node if n.op_type == "Reshape"]
    assert targets == [[1, -1]]              # the file is what it claims to be
    model = load_identity_model(path)
    assert model.embedding_size == 128
    assert model.meta["onnx"]["freed_batch_reshapes"] == 1
    images = _faces(5, seed=2)
    norm = (_nchw(images) - 127.5) / 127.5
    with torch.no_grad():
        got = model(preprocess(images, 112)).numpy()
        want = ref_model(torch.from_numpy(norm)).numpy()
    assert got.shape == (5, 128)
    assert _close(got, want)
    assert _close(got, ort_features(path, norm))


def test_an_output_width_the_graph_leaves_unknown_is_found_by_a_forward_pass(tmp_path: Path) -> None:
    from mtmim_cli.models.weights_io import load_weights_file
    from mtmim_cli.train.checkpoint import save_checkpoint

    path = dynamic_width_graph(tmp_path / "dyn.onnx", out_dim=64)
    model = load_identity_model(path)
    assert model.embedding_size == 64
    assert model.meta["onnx"]["embedding_size_from"] == "forward pass"
    images = _faces(3, seed=3)
    norm = (_nchw(images) - 127.5) / 127.5
    with torch.no_grad():
        got = model(preprocess(images, 112)).numpy()
    assert _close(got, ort_features(path, norm))
    # A checkpoint of it carries the width it was measured to have.
    ckpt = tmp_path / "dyn.pt"
    save_checkpoint(ckpt, load_weights_file(path))
    again = load_identity_model(ckpt)
    assert again.embedding_size == 64
    with torch.no_grad():
        assert np.abs(again(preprocess(images, 112)).numpy() - got).max() <= 1e-6
    # A width measured to be class scores is refused as a declared one is.
    bad = dynamic_width_graph(tmp_path / "scores.onnx", out_dim=1000)
    with pytest.raises(MtmimError, match="1000 values per image .ImageNet class scores") as info:
        load_identity_model(bad)
    assert str(info.value).startswith(str(bad))


def test_channel_order_and_scaling_given_by_the_spec(tmp_path: Path) -> None:
    path = tiny_graph(tmp_path / "t.onnx", op="Relu")
    images = _faces(3, seed=2)
    rgb = load_identity_model(path)
    bgr = load_identity_model(path, "onnx:bgr")
    raw = load_identity_model(path, "onnx:rgb,0,1")
    assert bgr.meta["onnx"]["input"]["decided"]["channels"] == "option"
    with torch.no_grad():
        x = preprocess(images, 112)
        f_rgb, f_bgr, f_raw = rgb(x).numpy(), bgr(x).numpy(), raw(x).numpy()
    norm = (_nchw(images) - 127.5) / 127.5
    assert np.abs(f_rgb - ort_features(path, norm)).max() <= 1e-5
    assert np.abs(f_bgr - ort_features(path, norm[:, ::-1].copy())).max() <= 1e-5
    assert np.abs(f_raw - ort_features(path, _nchw(images))).max() <= 1e-4
    with pytest.raises(MtmimError, match="records its own input convention"):
        ckpt = tmp_path / "c.pt"
        from mtmim_cli.models.weights_io import load_weights_file
        from mtmim_cli.train.checkpoint import save_checkpoint

        save_checkpoint(ckpt, load_weights_file(path))
        load_identity_model(ckpt, "onnx:bgr")


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"\x08\x07not a protobuf at all" * 9) and p, "not a readable ONNX model"),
    (lambda p: tiny_graph(p, height="H", width="W"), "dynamic size"),
    (lambda p: tiny_graph(p, height=112, width=100), "non-square 112x100"),
    (lambda p: tiny_graph(p, op="Hardmax"), "unsupported op Hardmax"),
    (lambda p: tiny_graph(p, op="FusedGelu", domain="com.microsoft"), "unsupported op com.microsoft.FusedGelu"),
    (lambda p: tiny_graph(p, out_dim=1000), "1000 values per image .ImageNet class scores"),
    (lambda p: tiny_graph(p, final="Softmax"), "comes from Softmax"),
])
def test_refusals_are_one_line_naming_the_file(tmp_path: Path, make, reason: str) -> None:
    path = tmp_path / "bad.onnx"
    make(path)
    with pytest.raises(MtmimError, match=reason) as info:
        load_identity_model(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_cli_refuses_without_writing(tmp_path: Path) -> None:
    bad = tiny_graph(tmp_path / "logits.onnx", out_dim=1000)
    out = tmp_path / "out.onnx"
    r = run_cli("export", str(bad), "--onnx", str(out))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "ImageNet" in lines[0]
    assert not out.exists() and not list(tmp_path.glob("out*"))


@pytest.mark.slow
def test_finetune_from_onnx_then_checkpoint_and_export_round_trip(tmp_path: Path) -> None:
    """finetune --init x.onnx (last two stages on cached activations, BatchNorm frozen):
    the checkpoint rebuilds the encoder from its own graph, the trunk is untouched, the tail
    moved; export writes an ONNX that reads back as the same model."""
    from mtmim_cli.deploy.export import export_onnx
    from mtmim_cli.train.finetune import finetune

    path, _ = pixel_mobilefacenet(tmp_path / "mfn.onnx", seed=3)
    ids = [f"id{k}" for k in range(6) for _ in range(4)]
    ages = [float(5 + 9 * j + k) for k in range(6) for j in range(4)]
    cache = write_cache(tmp_path / "c.h5", ids, ages, seed=4)
    run = finetune([cache], path, {"out": str(tmp_path / "run"), "mode": "mtmim",
                                   "freeze_through": "last:2", "freeze_bn": "all",
                                   "init_centres": "mean", "age_groups": 2, "batch_size": 8,
                                   "epochs": 2, "lr": 1e-2, "progress": False, "wise": 0.5})
    init = load_identity_model(path)
    tuned = load_identity_model(run / "model.pt")
    assert tuned.meta["backbone"] == "onnx" and tuned.meta["onnx"]["sha256"] == init.meta["onnx"]["sha256"]
    s0, s1 = init.encoder.state_dict(), tuned.encoder.state_dict()
    trunk_key = "net." + next(n for n, p in init.encoder.net.named_parameters()) .split(".")[0]
    assert torch.equal(s0[trunk_key + ".weight"], s1[trunk_key + ".weight"])
    tail = [k for k in s0 if s0[k].is_floating_point() and not torch.equal(s0[k], s1[k])]
    assert tail and all(k.startswith("net.") for k in tail)
    x = preprocess(_faces(3, seed=5), 96)
    result = export_onnx(run / "model.pt", tmp_path / "tuned.onnx")
    assert result["max_abs_diff"] <= 1e-4
    back = load_identity_model(tmp_path / "tuned.onnx")
    assert back.meta["onnx"]["input"]["decided"] == {"channels": "metadata", "scaling": "metadata"}
    with torch.no_grad():
        assert np.abs(back(x).numpy() - tuned(x).numpy()).max() <= 1e-4


@pytest.mark.slow
def test_head_refit_from_onnx_takes_the_models_own_crop(tmp_path: Path, monkeypatch) -> None:
    """--refit head from an imported 112x96 encoder: the rounds' features are its output on
    112x96 crops (the old head re-fit fed 112-wide crops to a 96-wide model); with identity
    maps the re-fit reproduces --refit none exactly."""
    import json

    import mtmim_cli.train.round_heads as H
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.config import EvalConfig, ModelArg
    from mtmim_cli.orchestration.evaluate import evaluate
    from tests.test_refit import _cache, _identity_maps

    cache_path = _cache(tmp_path)
    path, ref_model = pixel_mobilefacenet(tmp_path / "mfn.onnx", seed=2)
    monkeypatch.setattr(H, "fit_rounds", _identity_maps())
    base = dict(protocol="fgnet-loo", models=[ModelArg("mfn", path)], cache=cache_path, batch_size=4)
    none = evaluate(EvalConfig(**base), progress=False)["results"][0]["metrics"]
    head = evaluate(EvalConfig(**base, refit="head", rounds_dir=tmp_path / "rounds",
                               refit_modes=("baseline",)), progress=False)["results"][0]["metrics"]
    with np.load(tmp_path / "rounds" / "mfn" / "views.npz") as z:
        f = z["f"]
    images = Cache(cache_path).images(np.arange(12))
    with torch.no_grad():
        direct = ref_model(torch.from_numpy(_nchw(images, 96))).numpy()
    assert f.shape == (12, 128)
    np.testing.assert_allclose(f, direct, rtol=1e-4, atol=1e-4)
    assert head["rank1"] == none["rank1"] and head["cmc"] == none["cmc"]
    key = json.loads((tmp_path / "rounds" / "mfn" / "config.json").read_text())
    assert key["input_width"] == 96 and key["features"] == [12, 128]


@pytest.mark.slow
def test_full_refit_from_onnx_fine_tunes_each_round_from_the_file(tmp_path: Path) -> None:
    from mtmim_cli.eval.config import EvalConfig, ModelArg
    from mtmim_cli.orchestration.evaluate import evaluate
    from tests.test_refit import _cache

    cache_path = _cache(tmp_path, n_ids=4, per_id=4)
    path, _ = pixel_mobilefacenet(tmp_path / "mfn.onnx", seed=4)
    opts = {"epochs": 1, "batch_size": 4, "age_groups": 2, "workers": 0,
            "freeze_through": "last:2", "freeze_bn": "all", "init_centres": "mean"}
    got = evaluate(EvalConfig(protocol="fgnet-loo", models=[ModelArg("mfn", path)],
                              cache=cache_path, refit="full", folds=2, refit_options=opts,
                              refit_modes=("baseline", "mtmim"), rounds_dir=tmp_path / "rounds"),
                   progress=False)
    assert [r["metrics"]["rounds"] for r in got["results"]] == [2, 2]
    runs = sorted((tmp_path / "rounds").rglob("round-*/model.pt"))
    assert len(runs) == 4
    tuned = load_identity_model(runs[0])
    assert tuned.meta["backbone"] == "onnx" and tuned.meta["frozen_through"]


@pytest.mark.slow
def test_every_command_takes_an_onnx_model(tmp_path: Path) -> None:
    """embed, calibrate (into a checkpoint at --out; the ONNX file is left alone),
    remove-age and pretrain --init take an ONNX file; what they write loads back as the
    same encoder (the graph travels in the checkpoint)."""
    import h5py

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.deploy.embed import embed_source
    from mtmim_cli.deploy.remove_age import remove_age
    from mtmim_cli.deploy.verify import calibrate_threshold, store_threshold
    from mtmim_cli.train.config import TrainConfig
    from mtmim_cli.train.pretrain import pretrain

    path, ref_model = pixel_mobilefacenet(tmp_path / "mfn.onnx", seed=6)
    ids = [f"id{k}" for k in range(8) for _ in range(6)]
    ages = [float(3 + 11 * j + k) for k in range(8) for j in range(6)]
    cache = write_cache(tmp_path / "c.h5", ids, ages, seed=7)
    images = Cache(cache).images(np.arange(48))
    with torch.no_grad():
        raw = _nchw(images, 96)
        f = torch.cat([ref_model(torch.from_numpy(raw)),
                       ref_model(torch.from_numpy(raw[..., ::-1].copy()))], 1).numpy()
    want = f / np.linalg.norm(f, axis=1, keepdims=True)

    embed_source(cache, path, tmp_path / "e.h5", progress=False)
    with h5py.File(tmp_path / "e.h5", "r") as h:
        np.testing.assert_allclose(h["embeddings"][:], want, atol=1e-5)

    before = path.read_bytes()
    t = calibrate_threshold(path, cache, far=0.1, n_pairs=400, allow_unresolved=True)
    with pytest.raises(MtmimError, match="give --out"):
        store_threshold(path, t)
    cal = store_threshold(path, t, tmp_path / "cal.pt")
    assert path.read_bytes() == before
    cal_model = load_identity_model(cal)
    assert cal_model.meta["threshold"]["value"] == t["value"]

    r = remove_age(path, cache, tmp_path / "noage.pt", edges=[0, 20, 40])
    no_age = load_identity_model(tmp_path / "noage.pt")
    assert no_age.age_basis is not None and no_age.age_basis.shape[1] == r["dims"]
    x = preprocess(images[:4], 96)
    with torch.no_grad():
        for m in (cal_model, no_age):
            y = load_identity_model(path)(x)
            if m.age_basis is not None:
                b = m.age_basis
                y = y - (y @ b) @ b.T
            assert torch.allclose(m(x), y, atol=1e-5)

    cfg = TrainConfig(out=str(tmp_path / "pre"), epochs=1, batch_size=16, progress=False)
    run = pretrain([cache], cfg, init=path)
    pre = load_identity_model(Path(run.run_dir) / "model.pt")
    assert pre.meta["kind"] == "pretrain" and pre.meta["backbone"] == "onnx"
    assert pre.input_width == 96
    with pytest.raises(MtmimError, match="fixes its own architecture"):
        pretrain([cache], TrainConfig(out=str(tmp_path / "p2"), epochs=1, progress=False),
                 init=path, backbone="iresnet50")
