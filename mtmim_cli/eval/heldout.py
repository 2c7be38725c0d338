"""Were the test images held out? The images a protocol scores, their digests, and each
model's recorded training images (`mtmim_cli.data.provenance`).

`evaluate` refuses a model that trained on any test image unless `--allow-trained-on` is
given: a results.md outlives the console, so a warning would scroll by while the table
stood as a held-out figure. With the flag the table says, in its title and per model, how
many test images each model trained on, and the paper's rows move under "not comparable".
A model from `mtmim remove-age` counts as trained on the faces its age subspace was fitted on
(the projection was chosen to fit them). FG-NET with `--refit head|full` trains each round without its held-out photo, which is
the protocol, not a violation; the check is on the weights the rounds start from (a model
fine-tuned on the whole cache has seen every probe, re-fit or not).
"""

from __future__ import annotations

import numpy as np

from mtmim_cli.data import provenance as PV
from mtmim_cli.errors import MtmimError
from mtmim_cli.eval.inputs import EvalInputs
from mtmim_cli.eval.runners import cacd_indices, morph_indices


def scored_indices(protocol: str, inputs: EvalInputs) -> np.ndarray | None:
    """Cache record indices of the images the protocol scores; None when they are the
    images inside a .bin pair list, not the cache's."""
    cache = inputs.cache
    if inputs.pairs is not None:
        if inputs.pairs.source is not cache:
            return None
        return np.unique(np.r_[inputs.pairs.i, inputs.pairs.j])
    if protocol == "fgnet-loo":
        return np.flatnonzero(cache.usable)
    if inputs.split is not None:
        return morph_indices(cache, inputs.split)
    return cacd_indices(inputs.cacd_year, inputs.cacd_test)


def scored_image_digests(protocol: str, inputs: EvalInputs) -> tuple[np.ndarray, list[str]]:
    """(digest, name) of every image the protocol scores; names are cache paths, or
    'pair image k' for the images inside a .bin pair list."""
    idx = scored_indices(protocol, inputs)
    if idx is None:
        used = np.unique(np.r_[inputs.pairs.i, inputs.pairs.j])
        return (PV.image_digests(np.asarray(inputs.pairs.source)[used]),
                [f"pair image {k}" for k in used])
    cache = inputs.cache
    return PV.cache_digests(cache)[idx], [cache.paths[k] for k in idx]


def check_model(meta: dict | None, model_path, digests: np.ndarray, names: list[str],
                allow: bool) -> PV.Overlap:
    """The model's overlap with the test images; refuses one that trained on any of them
    unless `allow`."""
    ov = PV.overlap(meta, digests, source=str(model_path))
    if ov.trained_on and not allow:
        first = names[int(np.flatnonzero(ov.mask)[0])]
        what = (f"trained on {ov.trained_on}" if not ov.subspace_fitted_on else
                f"trained on {ov.trained_on} (its age subspace fitted on {ov.subspace_fitted_on})")
        raise MtmimError(f"{model_path}: {what} of the {ov.test_images} "
                         f"test images (e.g. {first}); its figures would not be held-out "
                         "ones. Test on other faces, or pass --allow-trained-on to measure "
                         "training fit on purpose")
    return ov


def section_words(overlaps: dict[str, dict]) -> str:
    """What a table title may say about its test faces, given each model's overlap record
    (`Overlap.to_dict()`): 'held-out faces' only when every model's whole lineage is
    recorded and none trained on them."""
    statuses = {o["status"] for o in overlaps.values()}
    if "trained-on" in statuses:
        return "includes faces seen in training"
    if statuses == {"held-out"}:
        return "held-out faces"
    return "faces outside the recorded training data"


def model_notes(overlaps: dict[str, dict]) -> list[str]:
    """One line per model whose test faces are not plainly held out."""
    notes = []
    for label, o in overlaps.items():
        if o["status"] == "trained-on":
            sub = o.get("subspace_fitted_on")
            notes.append(f"{label}: trained on {o['trained_on']} of the {o['test_images']} "
                         "test images" + (f" (its age subspace fitted on {sub})" if sub else "")
                         + " (run with --allow-trained-on)")
        elif o["status"] == "unrecorded":
            notes.append(f"{label}: no test image in its recorded training data; no training "
                         f"record for {', '.join(o['unrecorded'])}")
    return notes
