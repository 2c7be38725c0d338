"""Age leakage of identity features, measured independently of the CLUB term a model trained
with: how well a linear probe recovers age from the features that are matched.

- Age group accuracy: multinomial logistic regression on standardised features, predicting
  the age group (the breakdown's bins, FG-NET's 0-5 ... 31+ by default). Chance level: the
  majority group of each training fold predicted for its test fold (the same folds).
- Age R^2: ridge regression of log(1 + age) (ages are skewed towards children in FG-NET, and
  a year matters more at 5 than at 50), out-of-fold predictions pooled, R^2 against the
  overall mean (sklearn's r2_score). Chance level: 0 (a probe that learnt nothing predicts
  the training mean; slightly below 0 out of fold).
- Folds are split by identity (GroupKFold): a person's photos are never on both sides, so a
  probe cannot score by recognising the person and recalling their ages. The regularisation
  strength is chosen inside each training fold by a second identity-grouped split (the
  ridge fits every penalty from one SVD; the logistic fits warm-start along the C grid).
- For factorized models, the InfoNCE lower bound on I(x_id; x_age) (and the CLUB upper
  bound beside it) from freshly trained estimators, `models.mi_bounds.mi_interval`.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from mtmim_cli.eval.agebins import FGNET_AGE_EDGES, assign_bins, bin_labels

LOGISTIC_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
ALPHAS = tuple(float(a) for a in np.logspace(-2, 5, 15))
AGE_TARGET = "log(1+age)"
PROBE = ("multinomial logistic (groups) and ridge (log age) on standardised features; "
         "penalty chosen on identity-grouped inner folds")


def _group_splits(groups: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold

    k = min(folds, len(np.unique(groups)))
    return list(GroupKFold(n_splits=k).split(np.zeros(len(groups)), groups=groups))


def _standardised(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0
    return (x_train - mean) / std, (x_test - mean) / std


def ridge_path(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
               alphas: Sequence[float]) -> np.ndarray:
    """Predictions on x_test of ridge regressions (features standardised on the training
    rows, intercept unpenalised) for every alpha at once from one SVD: shape (alphas,
    test rows, targets). The same figures as sklearn's StandardScaler + Ridge(alpha)."""
    xt, xs = _standardised(x_train, x_test)
    y_mean = y_train.mean(0)
    u, s, vt = np.linalg.svd(xt, full_matrices=False)
    uty = u.T @ (y_train - y_mean)                  # (r, targets)
    proj = xs @ vt.T                                # (test, r)
    a = np.asarray(alphas, np.float64)[:, None]
    shrink = s[None, :] / (s[None, :] ** 2 + a)     # (alphas, r)
    return np.einsum("tr,ar,rk->atk", proj, shrink, uty) + y_mean


def _softmax_objective(theta: np.ndarray, x: np.ndarray, onehot: np.ndarray, c: float,
                       ) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of a multinomial logistic model plus ||W||^2 / (2 C n) (intercept
    unpenalised; sklearn's objective for LogisticRegression(C)) and its gradient."""
    n, d = x.shape
    k = onehot.shape[1]
    w, b = theta[: d * k].reshape(d, k), theta[d * k:]
    z = x @ w + b
    z -= z.max(1, keepdims=True)
    lse = np.log(np.exp(z).sum(1, keepdims=True))
    g = (np.exp(z - lse) - onehot) / n
    loss = float((lse[:, 0] - (z * onehot).sum(1)).mean() + (w * w).sum() / (2 * c * n))
    return loss, np.concatenate([(x.T @ g + w / (c * n)).ravel(), g.sum(0)])


def logistic_path(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  c_values: Sequence[float], tol: float = 1e-4) -> np.ndarray:
    """Predicted classes on x_test of multinomial logistic regressions (features
    standardised on the training rows) for every C: shape (C values, test rows). The
    model and objective of sklearn's LogisticRegression(C) (lbfgs); fitted here with scipy's
    L-BFGS directly because the probe makes hundreds of small fits and sklearn's checks
    cost more than the fits (3 s of a 60-face, four-model evaluate)."""
    from scipy.optimize import minimize

    classes, y = np.unique(y_train, return_inverse=True)
    if len(classes) == 1:
        return np.full((len(c_values), len(x_test)), y_train[0])
    xt, xs = _standardised(x_train, x_test)
    if xt.shape[1] > xt.shape[0]:
        # With an L2 penalty the weights lie in the span of the training rows (the part of w
        # outside it changes no training score and only adds penalty), so fitting in the
        # coordinates of that span gives the same predictions with far fewer features.
        _, _, vt = np.linalg.svd(xt, full_matrices=False)
        xt, xs = xt @ vt.T, xs @ vt.T
    onehot = np.eye(len(classes))[y]
    theta = np.zeros((xt.shape[1] + 1) * len(classes))
    out = np.empty((len(c_values), len(x_test)), classes.dtype)
    for k in np.argsort(c_values):  # small C first: each fit starts from the more regularised one
        res = minimize(_softmax_objective, theta, args=(xt, onehot, float(c_values[k])),
                       jac=True, method="L-BFGS-B", options={"maxiter": 500, "gtol": tol,
                                                           "ftol": 64 * np.finfo(float).eps})
        theta = res.x
        w = theta[: xt.shape[1] * len(classes)].reshape(xt.shape[1], -1)
        out[k] = classes[np.argmax(xs @ w + theta[w.size:], axis=1)]
    return out


def _r2(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """R^2 per alpha of predictions (alphas, rows, 1) of y (rows, 1)."""
    resid = ((pred - y[None]) ** 2).sum(axis=(1, 2))
    total = ((y - y.mean(0)) ** 2).sum()
    return 1 - resid / total if total > 0 else -resid


def _inner_choice(x: np.ndarray, y: np.ndarray, identity: np.ndarray, inner: int,
                  grid: Sequence[float], classify: bool) -> float:
    """The grid value (C or alpha) best on identity-grouped folds of these rows."""
    if inner < 2 or len(np.unique(identity)) < 2:
        return grid[len(grid) // 2]
    score = np.zeros(len(grid))
    for tr, va in _group_splits(identity, inner):
        if classify:
            score += np.mean(logistic_path(x[tr], y[tr], x[va], grid) == y[va][None], axis=1)
        else:
            score += _r2(ridge_path(x[tr], y[tr], x[va], grid), y[va])
    return grid[int(np.argmax(score))]


_PROBED: dict[bytes, dict] = {}   # age_probe results by content of their inputs


def _probe_key(x: np.ndarray, age: np.ndarray, identity: np.ndarray, *settings: object) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    for a in (x, age, identity.astype(str)):
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(repr(settings).encode())
    return h.digest()


def age_probe(features: np.ndarray, age: np.ndarray, identity: np.ndarray, *,
              edges: Sequence[int] = FGNET_AGE_EDGES, folds: int = 5, inner_folds: int = 3,
              ) -> dict:
    """Cross-validated linear probes of age from `features` (one row per image; images with
    an unknown age are left out). Returns accuracy and R^2 with their chance levels, and the
    images, identities and folds used. Needs at least two identities with dated images.
    The probe is deterministic, so the same inputs in one process (e.g. the demo's two
    evaluations of the same models on the same faces) are probed once."""
    x = np.asarray(features, np.float64)
    age = np.asarray(age, np.float64)
    identity = np.asarray(identity)
    key = _probe_key(x, age, identity, tuple(edges), folds, inner_folds)
    if key not in _PROBED:
        if len(_PROBED) >= 64:
            _PROBED.pop(next(iter(_PROBED)))
        _PROBED[key] = _age_probe(x, age, identity, edges, folds, inner_folds)
    return copy.deepcopy(_PROBED[key])


def _age_probe(x: np.ndarray, age: np.ndarray, identity: np.ndarray, edges: Sequence[int],
               folds: int, inner_folds: int) -> dict:
    known = np.isfinite(age) & (assign_bins(age, edges) >= 0)
    x, age, identity = x[known], age[known], identity[known]
    n_ids = len(np.unique(identity))
    if n_ids < 2:
        raise ValueError("age probe: needs dated images of at least two identities")
    group = assign_bins(age, edges)
    target = np.log1p(age)[:, None]
    splits = _group_splits(identity, folds)
    pred_group = np.empty(len(x), np.int64)
    majority = np.empty(len(x), np.int64)
    pred_age = np.empty(len(x))
    for train, test in splits:
        majority[test] = int(np.argmax(np.bincount(group[train], minlength=len(edges))))
        c = _inner_choice(x[train], group[train], identity[train], inner_folds, LOGISTIC_C, True)
        pred_group[test] = logistic_path(x[train], group[train], x[test], [c])[0]
        a = _inner_choice(x[train], target[train], identity[train], inner_folds, ALPHAS, False)
        pred_age[test] = ridge_path(x[train], target[train], x[test], [a])[0, :, 0]
    resid = np.sum((target[:, 0] - pred_age) ** 2)
    total = np.sum((target[:, 0] - target.mean()) ** 2)
    return {"age_group_accuracy": float(np.mean(pred_group == group)),
            "age_group_chance": float(np.mean(majority == group)),
            "age_groups": bin_labels(edges),
            "age_r2": float(1 - resid / total) if total > 0 else float("nan"),
            "age_r2_chance": 0.0, "age_target": AGE_TARGET, "images": int(len(x)),
            "identities": int(n_ids), "folds": len(splits), "probe": PROBE,
            "split": "GroupKFold by identity"}


def factor_mi(x_id: np.ndarray, x_age: np.ndarray, *, steps: int = 2000, seed: int = 0) -> dict:
    """InfoNCE lower bound (and CLUB upper bound) on I(x_id; x_age) in nats, cross-fitted on
    two halves; the lower bound cannot exceed log(half the images), given as its cap."""
    from mtmim_cli.models.mi_bounds import mi_interval

    lower, upper = mi_interval(np.asarray(x_id), np.asarray(x_age), steps=steps, seed=seed)
    return {"infonce_lower": lower, "club_upper": upper,
            "infonce_cap": math.log(len(x_id) // 2), "mi_steps": steps}
