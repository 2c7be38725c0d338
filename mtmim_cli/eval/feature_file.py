"""The features file `evaluate --features` writes beside results.md (`<stem>.features.npz`,
named after --out's stem and listed in the manifest `<stem>.json`): for each model, the
identity part x_id (what the model outputs) and, for a model with a factorization unit,
the age part x_age of every face the protocol scored, with the faces' identity, age and
cache path. `mtmim report` draws its x_id / x_age projections and
disentanglement scores from this file instead of running models itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtmim_cli.atomic import atomic_write
from mtmim_cli.errors import MtmimError


def factor_parts(model, cache, indices: np.ndarray, batch_size: int | None = None,
                 device: str = "cpu") -> dict[str, np.ndarray | None]:
    """{'x_id', 'x_age'} of the cache's images at `indices` (one view, no mirror); x_age is
    None for a model without a factorization unit (its output is x_id). The same pass the
    protocols take (`FeatureOptions.extract_parts`), so `evaluate` can hand over the parts
    its scoring already has instead of calling this."""
    from mtmim_cli.eval.runners import FeatureOptions

    return FeatureOptions("none", batch_size, device).extract_parts(model, cache, indices)[1]


def write_feature_file(path: Path, cache, indices: np.ndarray,
                       parts: dict[str, dict[str, np.ndarray | None]]) -> Path:
    """`parts`: model label -> factor_parts(...) on the same `indices`."""
    labels = list(parts)
    arrays: dict[str, np.ndarray] = {
        "labels": np.array(labels, dtype=str), "identity": cache.identity[indices],
        "age": cache.age[indices], "paths": np.array([cache.paths[k] for k in indices], dtype=str),
    }
    for k, label in enumerate(labels):
        arrays[f"x_id_{k}"] = parts[label]["x_id"]
        if parts[label]["x_age"] is not None:
            arrays[f"x_age_{k}"] = parts[label]["x_age"]
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def read_feature_file(path: Path) -> dict[str, dict]:
    """Model label -> {'x_id', 'x_age' (or None), 'identity', 'age', 'paths'}."""
    try:
        with np.load(path, allow_pickle=False) as z:
            shared = {k: z[k] for k in ("identity", "age", "paths")}
            return {str(label): {"x_id": z[f"x_id_{k}"],
                                 "x_age": z[f"x_age_{k}"] if f"x_age_{k}" in z.files else None,
                                 **shared}
                    for k, label in enumerate(z["labels"])}
    except (OSError, ValueError, KeyError) as exc:
        raise MtmimError(f"{path}: not a features file of `mtmim evaluate --features` ({exc})") from None
