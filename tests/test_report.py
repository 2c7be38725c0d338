"""`mtmim report`: what is drawn is what the run and evaluation files hold, the figures are
real images with content, and the disentanglement scores agree with independent ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mtmim_cli import report as R
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.output_set import write_output_set
from mtmim_cli.report import figures as F
from mtmim_cli.report import loading as L
from mtmim_cli.report import page as P
from mtmim_cli.report import projection as PR
from tests.conftest import run_cli, write_cache


def _line_data(ax, label: str) -> tuple[np.ndarray, np.ndarray]:
    line = next(ln for ln in ax.get_lines() if ln.get_label() == label)
    return np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)


def _png_has_content(path: Path) -> None:
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img.std() > 10  # not a blank canvas
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 50


def _metrics_csv(folder: Path, mode: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """A metrics.csv with the real column names of the loop and of the MT-MIM objective."""
    from mtmim_cli.train.loop import BASE_COLUMNS
    from mtmim_cli.train.mtmim_objective import MTMIMObjective

    rng = np.random.default_rng(seed)
    cols = {c: rng.normal(size=n).cumsum() for c in (*BASE_COLUMNS, *MTMIMObjective.metric_names)}
    cols["step"] = np.arange(1, n + 1)
    cols["epoch"] = 1 + np.arange(n) // 10
    cols["lr"] = np.where(np.arange(n) < n // 2, 0.02, 0.002)
    folder.mkdir(parents=True)
    header = list(cols)
    lines = [",".join(header)] + [",".join(f"{cols[c][i]:.6g}" for c in header) for i in range(n)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    (folder / "config.json").write_text(json.dumps({"epochs": 3, "extra": {"mode": mode}}))
    return cols


def test_smooth_is_a_trailing_mean_ignoring_nan() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=57)
    v[[3, 10, 11]] = np.nan
    for w in (1, 4, 9):
        got = F.smooth(v, w)
        for i in range(len(v)):
            window = v[max(0, i - w + 1):i + 1]
            window = window[np.isfinite(window)]
            want = window.mean() if len(window) else np.nan
            assert (math.isnan(got[i]) and math.isnan(want)) or got[i] == pytest.approx(want)


def test_curves_and_club_draw_the_logged_values(tmp_path: Path) -> None:
    logged = {m: _metrics_csv(tmp_path / m, m, 80, k) for k, m in enumerate(("baseline", "mtmim"))}
    runs = [L.load_run(tmp_path / m) for m in ("baseline", "mtmim")]
    assert [r.mode for r in runs] == ["baseline", "mtmim"]
    fig = F.plot_training_curves(runs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:2] == ["loss", "l_id"] and "club" in titles and titles[-2:] == ["accuracy", "lr"]
    for name in ("loss", "club", "age_accuracy"):
        ax = fig.axes[titles.index(name)]
        x, y = _line_data(ax, "mtmim")
        np.testing.assert_allclose(x, logged["mtmim"]["step"])
        np.testing.assert_allclose(y, F.smooth(logged["mtmim"][name], F._window(80)), rtol=1e-5, atol=1e-5)
    assert fig.axes[titles.index("lr")].get_yscale() == "log"
    club = F.plot_club(runs)
    x, y = _line_data(club.axes[0], "baseline")
    np.testing.assert_allclose(y, F.smooth(logged["baseline"]["club"], F._window(80)), rtol=1e-5, atol=1e-5)
    assert {t.get_text() for t in club.axes[0].get_legend().get_texts()} == {"baseline", "mtmim"}


def test_figures_share_mode_colours_label_axes_and_draw_lr_as_set(tmp_path: Path) -> None:
    import matplotlib.colors as mc

    from mtmim_cli.plot_style import MODE_COLOURS, Palette

    logged = {m: _metrics_csv(tmp_path / m, m, 60, k) for k, m in enumerate(("baseline", "mtmim"))}
    pre = tmp_path / "pretrain"
    pre.mkdir()
    # A constant lr over a long run: smoothing it used to leave round-off noise that gave the
    # log axis a zero-height range and broke the panel.
    pre_rows = ["step,epoch,loss,accuracy,lr,images_per_s"] + [
        f"{i},1,{3 - i / 50:.4f},{i / 200:.4f},0.001,50" for i in range(1, 151)]
    (pre / "metrics.csv").write_text("\n".join(pre_rows) + "\n")
    runs = [L.load_run(p) for p in (pre, tmp_path / "baseline", tmp_path / "mtmim")]
    ev = tmp_path / "ev"
    cmc = "protocol,model,rank,rate\n" + "".join(
        f"fgnet-loo,{m},{r},{min(1, 0.5 + r / 10)}\n" for m in ("mtmim", "pretrained", "casia")
        for r in range(1, 8))
    roc = "protocol,model,far,tar\n" + "".join(
        f"pairs,{m},{f},{f ** 0.2}\n" for m in ("baseline", "mtmim") for f in (0.001, 0.01, 0.1, 1))
    write_output_set(ev / "results.md", {}, {"cmc": lambda p: p.write_text(cmc),
                                             "roc": lambda p: p.write_text(roc)})
    evals = [L.load_evaluation(ev)]
    palette = Palette()
    curves = F.plot_training_curves(runs, palette)
    figs = [curves, F.plot_club(runs, palette), F.plot_cmc(evals, palette), F.plot_roc(evals, palette)]

    def colour_of(fig, label: str) -> set[str]:
        return {mc.to_hex(ln.get_color()) for ax in fig.axes for ln in ax.get_lines()
                if ln.get_label() in (label, f"{label} (fgnet-loo)", f"{label} (pairs)")}

    assert colour_of(curves, "mtmim") == colour_of(figs[1], "mtmim") == colour_of(figs[2], "mtmim") \
        == colour_of(figs[3], "mtmim") == {MODE_COLOURS["mtmim"]}
    assert colour_of(curves, "baseline") == colour_of(figs[3], "baseline") == {MODE_COLOURS["baseline"]}
    assert colour_of(curves, "pretrain") == colour_of(figs[2], "pretrained") == {MODE_COLOURS["pretrained"]}
    assert colour_of(figs[2], "casia") and not colour_of(figs[2], "casia") & set(MODE_COLOURS.values())
    for fig in figs:
        for ax in fig.axes:
            if ax.get_lines() or ax.collections:
                assert ax.get_ylabel(), (fig, ax.get_title())
    titles = [ax.get_title() for ax in curves.axes]
    lr_ax = curves.axes[titles.index("lr")]
    x, y = _line_data(lr_ax, "mtmim")
    np.testing.assert_array_equal(y, logged["mtmim"]["lr"])   # as set, not smoothed
    _, y = _line_data(lr_ax, "pretrain")
    assert (y == 0.001).all()
    lo, hi = lr_ax.get_ylim()
    assert lr_ax.get_yscale() == "log" and lo < 0.001 and hi > 0.02
    alone = F.plot_training_curves(runs[:1])
    lr_ax = alone.axes[[ax.get_title() for ax in alone.axes].index("lr")]
    lo, hi = lr_ax.get_ylim()
    assert lo <= 0.001 / 5 and hi >= 0.001 * 5   # room around a constant
    cmc_ax = figs[2].axes[0]
    figs[2].canvas.draw()
    ticks = [t for t in cmc_ax.get_xticks() if cmc_ax.get_xlim()[0] <= t <= cmc_ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    path = F.save_figure(curves, tmp_path / "curves.png")
    _png_has_content(path)


def test_club_figure_absent_without_a_club_column(tmp_path: Path) -> None:
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "metrics.csv").write_text("step,epoch,loss,accuracy,lr,images_per_s\n1,1,3,0.1,0.01,50\n")
    assert F.plot_club([L.load_run(tmp_path / "pre")]) is None


def test_disentanglement_scores_match_sklearn() -> None:
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(1)
    ident = np.repeat(np.arange(12), 8)
    age = rng.uniform(0, 70, len(ident))
    centres = rng.normal(size=(12, 16))
    x_id = centres[ident] + 0.05 * rng.normal(size=(len(ident), 16))       # identity only
    x_age = np.outer(age, rng.normal(size=16)) + 0.5 * rng.normal(size=(len(ident), 16))  # age only
    s = PR.disentanglement_scores({"x_id": x_id, "x_age": x_age, "identity": ident, "age": age})
    assert s["id_1nn_x_id"] == 1.0 and s["id_1nn_x_age"] < 0.3
    assert s["age_r2_x_age"] > 0.95 and s["age_r2_x_id"] < 0.2
    # the R^2 is sklearn's on the same cross-validated predictions
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    pred = cross_val_predict(RidgeCV(alphas=np.logspace(-3, 3, 13)), x_age, age,
                             cv=KFold(5, shuffle=True, random_state=0))
    assert s["age_r2_x_age"] == pytest.approx(r2_score(age, pred))


def test_bad_inputs_fail_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MtmimError, match="neither a training run"):
        R.build_report([tmp_path / "empty"], tmp_path / "rep")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.csv").write_text("a,b\n1,2\n")
    res = run_cli("report", str(tmp_path / "bad"), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2 and "no 'step' column" in res.stderr and "Traceback" not in res.stderr


def test_projection_comes_from_evaluates_features_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The report draws x_id / x_age from the features file results.json lists, alone: no model is
    loaded, no cache opened; its scores are those of the file's arrays."""
    from mtmim_cli.data.cache import Cache
    from mtmim_cli.eval.feature_file import read_feature_file, write_feature_file

    rng = np.random.default_rng(0)
    ids = [f"p{k}" for k in range(6) for _ in range(5)]
    cache = Cache(write_cache(tmp_path / "c.h5", ids, [float(3 * j + k) for k in range(6) for j in range(5)]))
    idx = np.arange(2, 30)
    parts = {"mtmim": {"x_id": rng.normal(size=(28, 8)), "x_age": rng.normal(size=(28, 8))},
             "pretrained": {"x_id": rng.normal(size=(28, 8)), "x_age": None}}
    ev = tmp_path / "ev"
    write_output_set(ev / "results.md", {"results": [
        {"model": "mtmim", "test_faces": {"status": "held-out", "trained_on": 0, "test_images": 28}}]},
        {"features": lambda p: write_feature_file(p, cache, idx, parts)})
    import mtmim_cli.models.identity as I

    monkeypatch.setattr(I, "load_identity_model", lambda *a, **k: pytest.fail("report ran a model"))
    monkeypatch.setattr(Cache, "__init__", lambda *a, **k: pytest.fail("report opened a cache"))
    text = R.build_report([ev], tmp_path / "rep", max_images=20).read_text()
    _png_has_content(tmp_path / "rep" / "projection.png")
    assert "## Identity and age features: held-out faces" in text
    assert "| pretrained |" not in text   # no factorization unit: nothing to project
    f = read_feature_file(ev / "results.features.npz")["mtmim"]
    np.testing.assert_array_equal(f["paths"], [cache.paths[k] for k in idx])
    keep = np.linspace(0, 27, 20).round().astype(int)
    sc = PR.disentanglement_scores({k: v[keep] for k, v in f.items()})
    assert f"| mtmim | {P._fmt(sc['age_r2_x_id'])} | {P._fmt(sc['age_r2_x_age'])} " in text


@pytest.mark.slow
def test_report_from_a_real_finetune_run(tmp_path: Path) -> None:
    """A real fine-tuning run and its evaluation (`--features`) feed a complete report; the
    file's x_id is the identity model's output and x_id + x_age is the encoder's x."""
    import torch

    from mtmim_cli.data.cache import Cache
    from mtmim_cli.data.dataset import preprocess
    from mtmim_cli.eval.config import EvalConfig, ModelArg
    from mtmim_cli.eval.feature_file import read_feature_file
    from mtmim_cli.models.identity import load_identity_model
    from mtmim_cli.orchestration.evaluate import evaluate
    from mtmim_cli.train.finetune import finetune

    ids = [f"id{k}" for k in range(6) for _ in range(4)]
    ages = [float(5 + 15 * j + k) for k in range(6) for j in range(4)]
    cache = write_cache(tmp_path / "c.h5", ids, ages, seed=3)
    run = finetune([cache], None, {"out": str(tmp_path / "mtmim"), "backbone": "tiny",
                                   "mode": "mtmim", "age_groups": 2, "batch_size": 8,
                                   "epochs": 1, "progress": False, "lr": 1e-3})
    held = write_cache(tmp_path / "held.h5", [f"other{k}" for k in range(3) for _ in range(4)],
                       ages[:12], seed=4)

    def ev(name: str, on: Path, **kw) -> Path:
        evaluate(EvalConfig(protocol="fgnet-loo", models=[ModelArg("mtmim", run / "model.pt")],
                            cache=on, out=tmp_path / name / "results.md", features=True, **kw),
                 progress=False)
        return tmp_path / name

    md = R.build_report([run, ev("ev", held)], tmp_path / "rep", max_images=10)
    text = md.read_text()
    for fig in ("training_curves.png", "club.png", "projection.png"):
        assert f"]({fig})" in text
        _png_has_content(tmp_path / "rep" / fig)
    assert "| mtmim | mtmim | 3 | 1 |" in text  # 24 images / batch 8, one epoch
    assert "## Identity and age features: held-out faces" in text
    f = read_feature_file(tmp_path / "ev" / "results.features.npz")["mtmim"]
    model = load_identity_model(run / "model.pt")
    with torch.no_grad():
        batch = preprocess(Cache(held).images(np.arange(12)), model.input_width)
        np.testing.assert_allclose(f["x_id"], model(batch).numpy(), atol=1e-5)
        np.testing.assert_allclose(f["x_id"] + f["x_age"], model.encoder(batch).numpy(), atol=1e-4)
    # The run's own training faces: evaluate refuses, or (on purpose) the report says so.
    from mtmim_cli.errors import MtmimError

    with pytest.raises(MtmimError, match="trained on 24 of the 24 test images"):
        ev("ev2", cache)
    text = R.build_report([ev("ev2", cache, allow_trained_on=True)], tmp_path / "rep2",
                          max_images=10).read_text()
    assert "## Identity and age features: includes faces seen in training" in text
    assert "held-out" not in text.split("## Identity and age features")[1].split("##")[0]
