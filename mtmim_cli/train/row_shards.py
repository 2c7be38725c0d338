"""Parameters split by rows over the ranks (Partial FC's class centres) around DDP and
checkpoints.

A parameter with a `row_shard = (start, stop, total)` attribute holds rows [start, stop) of a
(total, ...) tensor. DDP must neither broadcast nor average it (each rank's rows differ), so
modules name such tensors in `ddp_ignore`. Checkpoints hold the whole tensor, gathered on
rank 0, and the optimiser state of those rows likewise, so a checkpoint looks the same
whatever the number of ranks, and loading takes each rank's rows back out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtmim_cli.train import distributed as D


def ddp_ignore_names(module: nn.Module) -> list[str]:
    """Qualified names of the parameters and buffers that sub-modules keep out of DDP."""
    out = []
    for prefix, m in module.named_modules():
        for name in getattr(m, "ddp_ignore", ()):
            out.append(f"{prefix}.{name}" if prefix else name)
    return out


def _sharded(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if hasattr(p, "row_shard")]


def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """id(param) -> its key in optimizer.state_dict()["state"] (order over the groups)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {id(p): i for i, p in enumerate(params)}


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None
               ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """`module.state_dict()` and `optimizer.state_dict()` with row-sharded tensors whole.

    A collective: every rank calls it; only rank 0's result holds the gathered tensors."""
    state = module.state_dict()
    opt = optimizer.state_dict() if optimizer is not None else None
    shards = _sharded(module)
    if not shards:
        return state, opt
    index = _param_index(optimizer) if optimizer is not None else {}
    for name, p in shards:
        total = p.row_shard[2]
        state[name] = D.gather_rows(p.detach(), total)
        if opt is None or index.get(id(p)) not in opt["state"]:
            continue
        key = index[id(p)]
        entry = dict(opt["state"][key])   # state_dict shares the live state's dicts: copy
        for k in sorted(entry):
            v = entry[k]
            if torch.is_tensor(v) and v.shape == p.shape:
                entry[k] = D.gather_rows(v, total)
        opt["state"][key] = entry
    return state, opt


def load_state(module: nn.Module, optimizer: torch.optim.Optimizer | None,
               state: dict[str, Any], opt: dict[str, Any] | None) -> None:
    """Load `full_state`'s output, each rank taking its own rows of the sharded tensors."""
    shards = _sharded(module)
    state = dict(state)
    for name, p in shards:
        a, b, total = p.row_shard
        if name in state and state[name].shape[0] == total:
            state[name] = state[name][a:b]
    module.load_state_dict(state)
    if optimizer is None or opt is None:
        return
    if shards:
        index = _param_index(optimizer)
        opt = {**opt, "state": dict(opt["state"])}
        for _, p in shards:
            a, b, total = p.row_shard
            key = index[id(p)]
            if key in opt["state"]:
                opt["state"][key] = {k: (v[a:b] if torch.is_tensor(v) and v.dim()
                                         and v.shape[0] == total and v.shape[1:] == p.shape[1:]
                                         else v)
                                     for k, v in opt["state"][key].items()}
    optimizer.load_state_dict(opt)
