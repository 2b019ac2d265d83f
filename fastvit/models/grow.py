"""Progressive growth of a LocalityViT's depth (MoGrow, Li et al., CVPR 2022), in place.

The model is built at its full depth and always holds all its blocks (state dicts, checkpoints and the
optimizer keep one shape for the whole run); `model.active_blocks` says which of them a forward runs.
A model "at depth d" runs blocks 0..d-1. Growing d -> n rewrites blocks 0..n-1 from the old ones by a
*block map* (new position i takes the weights of old block map[i]) and then runs the first n.

    grow_map(6, 8)   -> [0, 1, 2, 3, 4, 4, 5, 5]     # the last blocks are duplicated, in place
    grow_map(6, 12)  -> [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    remap_blocks_(model, grow_map(6, 8)); set_depth(model, 8)

The elastic supernet of AutoProg is the model grown to the largest candidate depth; a shallower
candidate runs a subset of its blocks (the duplicates it does not need act as identity):
`supernet_blocks(cur, cand, top)` -> the positions it runs, which compute exactly the model grown
cur -> cand (the copies are equal at the growth; training then moves them apart).
"""
from __future__ import annotations

import copy
import re

import torch
import torch.nn as nn

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def grow_map(old: int, new: int) -> list[int]:
    """Source block of each of `new` blocks grown from `old` by in-place duplication: every old block
    gets new // old copies and the last new % old blocks one more (the authors' `new_idx` rule:
    6->8 [0,1,2,3,4,4,5,5], 6->12 [0,0,1,1,...], 4->6 [0,1,2,2,3,3]). old == new is the identity."""
    if old < 1 or new < old:
        raise ValueError(f"growth needs 1 <= old <= new, got {old} -> {new}")
    q, r = divmod(new, old)
    out: list[int] = []
    for j in range(old):
        out += [j] * (q + (1 if j >= old - r else 0))
    return out


def supernet_blocks(cur: int, cand: int, top: int) -> list[int]:
    """Positions of the supernet (the model grown cur -> top by grow_map) that candidate depth `cand`
    runs: of the copies of each old block j, the first as many as grow_map(cur, cand) gives j. Those
    positions, in order, hold exactly the blocks of the model grown cur -> cand."""
    if not cur <= cand <= top:
        raise ValueError(f"candidate depth {cand} must be in [{cur}, {top}]")
    full, want = grow_map(cur, top), grow_map(cur, cand)
    out: list[int] = []
    for j in range(cur):
        pos = [i for i, src in enumerate(full) if src == j]
        out += pos[:want.count(j)]
    return out


def model_depth(model: nn.Module) -> int:
    return len(model.blocks)


def active_depth(model: nn.Module) -> int:
    blocks = getattr(model, "active_blocks", None)
    return model_depth(model) if blocks is None else len(blocks)


def set_blocks(model: nn.Module, blocks) -> None:
    """Run these block positions (None or all of them in order: the plain full model)."""
    blocks = None if blocks is None else tuple(int(b) for b in blocks)
    if blocks is not None and blocks == tuple(range(model_depth(model))):
        blocks = None
    if blocks is not None and (not blocks or max(blocks) >= model_depth(model) or min(blocks) < 0):
        raise ValueError(f"block positions {blocks} outside the model's {model_depth(model)} blocks")
    model.active_blocks = blocks


def set_depth(model: nn.Module, depth: int | None) -> None:
    """Run the first `depth` blocks (None: all)."""
    set_blocks(model, None if depth is None else range(depth))


def remap_state(state: dict, block_map: list[int]) -> dict:
    """A state dict whose blocks.i.* are the old blocks.{block_map[i]}.* (copies) for i < len(map);
    every other entry (later blocks, embedding, head) as it was."""
    out = dict(state)
    for key, val in state.items():
        m = _BLOCK.match(key)
        if m and int(m.group(1)) < len(block_map):
            src = f"blocks.{block_map[int(m.group(1))]}.{m.group(2)}"
            out[key] = state[src].detach().clone()
    return out


@torch.no_grad()
def remap_blocks_(model: nn.Module, block_map: list[int]) -> None:
    """Rewrite the model's blocks in place by `block_map` (the same parameter objects keep their place:
    an optimizer holding them stays valid)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(remap_state(state, block_map))


def remap_optimizer_state_(opt: torch.optim.Optimizer, model: nn.Module, block_map: list[int]) -> None:
    """The optimizer's per-parameter state (AdamW moments, step) moved with the blocks: block i's
    parameters get copies of the state of block map[i]'s; blocks past the map lose theirs."""
    named = dict(model.named_parameters())
    by_name = {n: opt.state[p] for n, p in named.items() if p in opt.state}
    snap = {n: {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in s.items()}
            for n, s in by_name.items()}
    for name, p in named.items():
        m = _BLOCK.match(name)
        if not m:
            continue
        i = int(m.group(1))
        src = f"blocks.{block_map[i]}.{m.group(2)}" if i < len(block_map) else None
        if src is not None and src in snap:
            opt.state[p] = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in snap[src].items()}
        else:
            opt.state.pop(p, None)


def compact(model: nn.Module) -> nn.Module:
    """The model as a plain LocalityViT of its active depth (blocks renumbered 0..d-1, config depth d):
    what export_timm / safetensors write. The model itself when it runs all its blocks."""
    from .vit import LocalityViT

    model = getattr(model, "_orig_mod", model)
    if getattr(model, "active_blocks", None) is None:
        return model
    blocks = list(model.active_blocks)
    state = remap_state(model.state_dict(), blocks)
    state = {k: v for k, v in state.items() if not (_BLOCK.match(k) and int(_BLOCK.match(k).group(1)) >= len(blocks))}
    cfg = copy.deepcopy(model.cfg)
    cfg.depth = len(blocks)
    out = LocalityViT(cfg).to(next(model.parameters()).device)
    out.load_state_dict(state)
    return out.train(model.training)
