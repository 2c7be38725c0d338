"""The report's view of the identity and age parts: the factorized models' x_id / x_age from
evaluate's features file, thinned to an even spread, scored for disentanglement and
projected to 2-D (PCA)."""

from __future__ import annotations

import numpy as np

from mtmim_cli.plot_style import Palette
from mtmim_cli.report.figures import pyplot
from mtmim_cli.report.loading import Evaluation


def projected_features(evals: list[Evaluation], max_images: int = 400) -> list[tuple[str, dict, dict | None]]:
    """(label, features, test-faces record) of every factorized model in the evaluations'
    features files (the first evaluation that holds a label wins), thinned to an even
    spread of at most `max_images` faces."""
    out, seen = [], set()
    for e in evals:
        for label, f in (e.features or {}).items():
            if f["x_age"] is None or label in seen:
                continue
            seen.add(label)
            n = len(f["x_id"])
            if n > max_images:
                keep = np.linspace(0, n - 1, max_images).round().astype(int)
                f = {k: v[keep] for k, v in f.items()}
            out.append((label, f, e.test_faces(label)))
    return out

def pca_2d(x: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=0).fit_transform(np.asarray(x, dtype=np.float64))

def disentanglement_scores(feats: dict) -> dict:
    """How much identity and age each part carries, on held-out faces:
    age R^2 of a cross-validated ridge regression, identity leave-one-out 1-NN accuracy (cosine)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    out = {}
    age = feats["age"]
    known = np.isfinite(age)
    for part in ("x_id", "x_age"):
        x = feats[part]
        if known.sum() >= 10:
            pred = cross_val_predict(RidgeCV(alphas=np.logspace(-3, 3, 13)), x[known], age[known],
                                     cv=KFold(5, shuffle=True, random_state=0))
            resid = ((age[known] - pred) ** 2).sum()
            total = ((age[known] - age[known].mean()) ** 2).sum()
            out[f"age_r2_{part}"] = float(1 - resid / total) if total > 0 else float("nan")
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = xn @ xn.T
        np.fill_diagonal(sim, -np.inf)
        out[f"id_1nn_{part}"] = float((feats["identity"][sim.argmax(1)] == feats["identity"]).mean())
    return out

def plot_projection(named_feats: list[tuple[str, dict]], palette: Palette | None = None,
                    faces: str = "scored faces"):
    """Rows: models (titles in the model's colour); columns: x_id by identity, x_id by age,
    x_age by identity, x_age by age."""
    plt = pyplot()
    palette = palette or Palette()
    n = len(named_feats)
    fig, axes = plt.subplots(n, 4, figsize=(15, 3.6 * n), squeeze=False)
    for row, (name, f) in enumerate(named_feats):
        for c, part in enumerate(("x_id", "x_age")):
            xy = pca_2d(f[part])
            ids = np.unique(f["identity"], return_inverse=True)[1]
            ax = axes[row, 2 * c]
            ax.scatter(xy[:, 0], xy[:, 1], c=ids % 20, cmap="tab20", s=12, vmin=0, vmax=19)
            ax.set_title(f"{name}: {part}, colour = identity", fontsize=9, color=palette(name))
            ax = axes[row, 2 * c + 1]
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=f["age"], cmap="viridis", s=12)
            ax.set_title(f"{name}: {part}, colour = age", fontsize=9, color=palette(name))
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02, label="age")
            for a in axes[row, 2 * c:2 * c + 2]:
                a.set_xticks([])
                a.set_yticks([])
                a.set_xlabel("PC 1")
                a.set_ylabel("PC 2")
    fig.suptitle(f"{faces[:1].upper()}{faces[1:]}: PCA of the identity part x_id and the age part x_age")
    fig.tight_layout()
    return fig
