"""The report's figures by age draw what results.json says: lines at each bin's rank-1, bands
at its interval, the heat map's cells at the success rates; the report names them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtmim_cli.errors import MtmimError
from mtmim_cli.plot_style import MODE_COLOURS, Palette
from mtmim_cli.report import build_report
from mtmim_cli.report.age import bin_series, plot_age_map, plot_rank1_by_age


def _rows(labels, rates, ns):
    return [{"bin": b, "n": n, "hits": round(r * n) if r is not None else 0, "rank1": r,
             **({"low": r - 0.1, "high": min(1.0, r + 0.05)} if r is not None and n > 1 else {})}
            for b, r, n in zip(labels, rates, ns, strict=True)]


def _results(models=("casia/baseline", "casia/mtmim")) -> dict:
    ages = ["0-5", "6-10", "11-15", "16-20", "21-30", "31+"]
    gaps = ["0-5", "6-10", "11-20", "21+"]
    out = []
    for k, name in enumerate(models):
        shift = 0.02 * k
        out.append({"model": name, "metrics": {
            "rank1": 0.9, "queries": 10,
            "by_age": {"by_probe_age": _rows(ages, [0.6 + shift, 0.9, 0.95, 0.97, 1.0, None],
                                             [20, 10, 8, 5, 1, 0]),
                       "by_gap": _rows(gaps, [0.92 + shift, 0.6, 0.3, None], [30, 10, 4, 0])
                       + [{"bin": "unknown", "n": 2, "hits": 0, "rank1": 0.0}]},
            "age_map": {"labels": ["0-9", "10+"], "n": [[4, 2], [0, 5]],
                        "success": [[3, 1], [0, 5]], "rate": [[0.75, 0.5], [None, 1.0]]}}})
    return {"protocol": "fgnet-loo", "results": out}


def test_bin_series_leaves_out_unknown_and_marks_empty_bins():
    (name, labels, val, low, high, n), _ = bin_series(_results(), "by_gap")
    assert name == "casia/baseline" and labels == ["0-5", "6-10", "11-20", "21+"]
    np.testing.assert_allclose(val[:3], [0.92, 0.6, 0.3])
    assert np.isnan(val[3]) and np.isnan(low[3]) and n.tolist() == [30, 10, 4, 0]


def test_lines_and_bands_are_the_breakdown():
    import matplotlib.pyplot as plt

    fig = plot_rank1_by_age([_results()], Palette())
    ax_age, ax_gap = fig.axes[:2]
    lines = ax_gap.get_lines()
    assert [ln.get_label() for ln in lines] == ["casia/baseline", "casia/mtmim"]
    np.testing.assert_allclose(lines[1].get_ydata()[:3], [94, 60, 30])
    assert lines[0].get_color() == MODE_COLOURS["baseline"]
    assert lines[1].get_color() == MODE_COLOURS["mtmim"]
    band = ax_gap.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(20) and band[:, 1].max() == pytest.approx(97)
    assert [t.get_text() for t in ax_age.get_xticklabels()][0] == "0-5\n(20)"
    plt.close(fig)


def test_heat_map_cells_are_the_rates():
    import matplotlib.pyplot as plt

    amap = _results()["results"][0]["metrics"]["age_map"]
    fig = plot_age_map(amap, "casia")
    data = fig.axes[0].images[0].get_array()
    assert data[0, 0] == 75 and data[0, 1] == 50 and data[1, 1] == 100
    assert np.ma.is_masked(data[1, 0]) or np.isnan(data[1, 0])
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["100\n(5)", "50\n(2)", "75\n(4)"]
    plt.close(fig)


def test_report_draws_the_age_figures(tmp_path: Path):
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.json").write_text(json.dumps(_results()))
    (ev / "results.md").write_text("# mtmim evaluate: fgnet-loo\n")
    report = build_report([ev], tmp_path / "rep", age_map_model="casia/mtmim")
    text = report.read_text()
    assert "![rank-1 by age](rank1_by_age.png)" in text
    assert "### casia/mtmim: probe age x gallery age" in text
    assert (tmp_path / "rep" / "rank1_by_age.png").stat().st_size > 0
    assert (tmp_path / "rep" / "age_map.png").stat().st_size > 0
    with pytest.raises(MtmimError, match="--age-map-model nobody"):
        build_report([ev], tmp_path / "rep2", age_map_model="nobody")
