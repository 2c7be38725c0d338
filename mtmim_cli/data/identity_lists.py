"""Lists of identity names given on the command line: comma-separated names, '@FILE' (one
name per line), or '@FILE.json:key.sub' (the list at that key path of a JSON file, such as
the fixed open-set splits). Used by `finetune --train-identities`, `--replay-identities` and
`mtmim subset --identities`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtmim_cli.errors import MtmimError


def read_identity_list(spec: str) -> list[str]:
    """Identity names from `spec`: comma-separated names; '@FILE', one name per line; or
    '@FILE.json:key.sub', the list at that key path of a JSON file (e.g. a fixed split:
    '@open-set.json:fgnet.train_subjects')."""
    if not spec.startswith("@"):
        return [p.strip() for p in spec.split(",") if p.strip()]
    body = spec[1:]
    is_json = ".json" in body
    path, _, key = body.partition(".json:") if ".json:" in body else (body, "", "")
    path = path + ".json" if ".json:" in body else path
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MtmimError(f"{path}: cannot read the identity list ({exc.strerror})") from None
    if not is_json:
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    try:
        node = json.loads(text)
        for part in [k for k in key.split(".") if k]:
            node = node[part]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MtmimError(f"{path}: no identity list at {key or 'the top'} ({exc})") from None
    if not isinstance(node, list):
        raise MtmimError(f"{path}: {key or 'the top'} is not a list of identities")
    return [str(v) for v in node]


def name_key(name: object) -> str | int:
    """How names are compared: whole numbers by value ('001' is 1), others as written."""
    text = str(name)
    return int(text) if text.isdigit() else text


def name_matcher(names: list[str]):
    """A predicate on identity names: in `names` as written or, when both are whole numbers,
    by value ('001' is 1)."""
    wanted = {name_key(n) for n in names}
    return lambda n: name_key(n) in wanted


def listed_labels(identity_names: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Per identity label of a cache (indexing its `identity_names`), whether that identity is
    in `names` (matched as `name_matcher` does); index it with a cache's `identity` for a
    per-record mask."""
    wanted = name_matcher(list(names))
    return np.array([wanted(n) for n in identity_names], bool)
