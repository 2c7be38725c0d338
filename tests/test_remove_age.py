"""`mtmim remove-age`: the written model's features are the source model's features minus their
projection on the age subspace computed independently here (by the loop definition in
tests/test_age_subspace.py) from the source model's own views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from mtmim_cli.errors import MtmimError
from tests.conftest import run_cli, tiny_finetuned, write_cache

EDGES = (0, 6, 11, 16, 21, 31)


@pytest.fixture(scope="module")
def model_and_cache(tmp_path_factory) -> tuple[Path, Path]:
    """A real fine-tuned tiny model (x_id from its factorization unit) and 8 people x 6 ages."""
    return tiny_finetuned(tmp_path_factory.mktemp("noage"),
                          [float(2 + 7 * j + k) for k in range(8) for j in range(6)], seed=3)


def _views(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    off = (112 - model.input_width) // 2
    x = (x[..., off:off + model.input_width] - 127.5) / 128
    with torch.no_grad():
        return model(x).double().numpy(), model(torch.flip(x, dims=[3])).double().numpy()


def test_written_model_projects_off_the_subspace_fitted_on_its_own_views(model_and_cache,
                                                                           tmp_path) -> None:
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.deploy.remove_age import remove_age
    from mtmim_cli.models.identity import load_identity_model
    from tests.test_age_subspace import reference_basis

    src, cache = model_and_cache
    keep = [f"id{k}" for k in range(6)]
    r = remove_age(src, cache, tmp_path / "noage.pt", edges=EDGES, identities=keep)
    c = Cache(cache)
    rows = np.flatnonzero(np.isin(np.array(c.identity_names)[c.identity], keep))
    images = c.images(np.arange(len(c)))
    a, b = _views(load_identity_model(src), images)
    want = reference_basis(np.concatenate([a[rows], b[rows]]), np.tile(c.identity[rows], 2),
                           np.tile(c.age[rows], 2), EDGES)
    new = load_identity_model(tmp_path / "noage.pt")
    basis = new.age_basis.double().numpy()
    assert r["dims"] == basis.shape[1] == want.shape[1] >= 1 and r["photos"] == len(rows)
    assert np.max(subspace_angles(basis, want)) < 1e-4
    assert new.meta["age_subspace"]["identities"] == 6 and "basis" not in new.meta["age_subspace"]
    # the faces it was fitted on, as blake2b-64 digests of their stored pixels
    import hashlib

    fitted = new.meta["age_subspace"]["fitted_on"]
    want_digests = sorted(int.from_bytes(hashlib.blake2b(images[k].tobytes(), digest_size=8)
                                         .digest(), "little") for k in rows)
    assert sorted(np.frombuffer(fitted["images"], "<u8").tolist()) == want_digests
    assert fitted["caches"][0]["used"] == len(rows) and fitted["init"] is None
    got, _ = _views(new, images)
    np.testing.assert_allclose(got, a - (a @ basis) @ basis.T, atol=1e-5)
    assert np.abs(got @ basis).max() < 1e-5


def test_plain_state_dict_is_wrapped_and_exported_with_the_projection(model_and_cache,
                                                                         tmp_path) -> None:
    import onnxruntime as ort

    from mtmim_cli.deploy.export import export_onnx
    from mtmim_cli.deploy.remove_age import remove_age
    from mtmim_cli.models.backbones import build_backbone
    from mtmim_cli.models.identity import load_identity_model

    _, cache = model_and_cache
    torch.manual_seed(0)
    plain = tmp_path / "backbone.pth"
    torch.save(build_backbone("tiny", 16).state_dict(), plain)
    remove_age(plain, cache, tmp_path / "noage.pt", edges=EDGES, backbone="tiny")
    model = load_identity_model(tmp_path / "noage.pt", "tiny")
    export_onnx(tmp_path / "noage.pt", tmp_path / "m.onnx", backbone="tiny", check_cache=cache)
    x = torch.randn(4, 3, 112, model.input_width, generator=torch.Generator().manual_seed(1))
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]) \
        .run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
        raw = model.encoder(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert not np.allclose(want, raw, atol=1e-4)   # the projection is in the graph


def test_refusals_are_one_line_and_write_nothing(model_and_cache, tmp_path) -> None:
    from mtmim_cli.deploy.remove_age import remove_age

    src, cache = model_and_cache
    with pytest.raises(MtmimError, match="1 identities selected"):
        remove_age(src, cache, tmp_path / "x.pt", edges=EDGES, identities=["id0"])
    remove_age(src, cache, tmp_path / "once.pt", edges=EDGES)
    with pytest.raises(MtmimError, match="already has an age subspace"):
        remove_age(tmp_path / "once.pt", cache, tmp_path / "twice.pt", edges=EDGES)
    undated = write_cache(tmp_path / "undated.h5", [f"p{k}" for k in range(4) for _ in range(2)])
    with pytest.raises(MtmimError, match="0 dated photos"):
        remove_age(src, undated, tmp_path / "y.pt", edges=EDGES)
    assert not any(p.name.startswith(("x.pt", "twice", "y.pt", ".x.pt", ".y.pt", ".twice"))
                   for p in tmp_path.iterdir())
    r = run_cli("remove-age", str(src), "--cache", str(cache), "--out", str(tmp_path / "z.pt"),
                "--identities", "id0", "-q")
    assert r.returncode == 2 and not (tmp_path / "z.pt").exists()   # input errors exit 2
    assert len(r.stderr.strip().splitlines()) == 1 and "c.h5" in r.stderr
    r = run_cli("remove-age", str(src), "--cache", str(cache), "--out", str(tmp_path / "z.pt"),
                "--age-bins", "5,3")
    assert r.returncode != 0 and "--age-bins" in r.stderr


def test_embed_says_the_features_have_their_age_subspace_removed(model_and_cache, tmp_path) -> None:
    import h5py

    from mtmim_cli.deploy.embed import embed_source
    from mtmim_cli.deploy.remove_age import remove_age

    src, cache = model_and_cache
    r = remove_age(src, cache, tmp_path / "noage.pt", edges=EDGES)
    embed_source(cache, tmp_path / "noage.pt", tmp_path / "e.h5")
    with h5py.File(tmp_path / "e.h5") as f:
        assert f.attrs["feature"] == f"x_id minus its age subspace ({r['dims']} dims)"
