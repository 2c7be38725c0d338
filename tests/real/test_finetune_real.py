"""`mtmim finetune` on a real FG-NET slice from the shared CASIA MobileFaceNet (--init).

Four subjects are aligned by `align_dataset`; one short MT-MIM epoch runs through the real CLI.
The three-mode table on subjects 1-60 / 61-82 is bench/fgnet_modes.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtmim_cli.data.cache import Cache
from tests.conftest import align_fgnet_subjects, run_cli

pytestmark = [pytest.mark.real, pytest.mark.slow]

SUBJECTS = ("010", "011", "012", "013")


@pytest.fixture(scope="module")
def fgnet_four(fgnet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return align_fgnet_subjects(fgnet_dir, SUBJECTS, tmp_path_factory.mktemp("fgnet-four"))


def test_finetune_from_shared_mobilefacenet(fgnet_four: Path, mobilefacenet_ckpt: Path,
                                            tmp_path: Path) -> None:
    from mtmim_cli.eval.features import extract_features
    from mtmim_cli.eval.metrics import rank1_dense
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.train.mtmim_objective import MTMIMObjective

    cache = Cache(fgnet_four)
    pre = load_identity_model(mobilefacenet_ckpt)
    # The factorization starts near the identity map: x_id keeps the pretrained features.
    torch.manual_seed(0)
    obj = MTMIMObjective(pre.encoder, 4, 4, embedding_size=128).eval()
    from mtmim_cli.data.dataset import preprocess
    x = preprocess(cache.images(np.arange(8)), 96)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(obj.identity_features(x), pre.encoder(x))
    assert float(cos.min()) > 0.98

    out = tmp_path / "run"
    r = run_cli("finetune", str(fgnet_four), "--init", str(mobilefacenet_ckpt), "--mode", "mtmim",
                "--epochs", "1", "--batch-size", "16", "--age-groups", "4", "--lr", "1e-4",
                "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    model = load_identity_model(out / "model.pt")
    assert model.meta["backbone"] == "mobilefacenet" and model.input_width == 96
    assert model.embedding_size == 128 and model.factorize is not None
    rows = [line.split(",") for line in (out / "metrics.csv").read_text().splitlines()]
    head = rows[0]
    for row in rows[1:]:
        assert np.isfinite(float(row[head.index("club")])) and np.isfinite(float(row[head.index("q_loglik")]))
    idx = np.flatnonzero(cache.usable)
    ids = cache.identity[idx]
    feats = extract_features(model, cache, idx, "concat")
    r1 = rank1_dense(feats, ids, feats, ids, exclude_self=True)
    assert r1 > 0.6  # four subjects: chance is ~0.25; a short gentle fine-tune keeps the model
