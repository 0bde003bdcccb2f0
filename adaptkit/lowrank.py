"""Arithmetic on low-rank updates (imports torch): whole-layer stacking and combinations.

A method that is a low-rank update of layers (LoRA) describes itself as
:class:`~adaptkit.method.LowRankUpdate` objects, one per layer or row range. These
helpers turn the updates of one layer into a single whole-layer pair (A, B), and
combine the updates of several adapters:

- ``cat``: concatenation, exact: A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
  (rank = the sum of the ranks), so B A = sum_i w_i s_i B_i A_i;
- ``svd``: the exact weighted sum sum_i w_i s_i B_i A_i, truncated to ``rank`` by SVD
  (exact while ``rank`` reaches the sum's rank);
- ``linear``: factor-wise, at one shared rank: A = sum_i sqrt(s_i) A_i,
  B = sum_i w_i sqrt(s_i) B_i. Cheap and the same size as one adapter, but the cross
  terms B_i A_j make it inexact for more than one adapter (as PEFT's ``linear``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

COMBINATIONS = ("linear", "cat", "svd")


def stack_updates(updates: Sequence[Any], out_rows: int, rank: int | None = None, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One layer's updates as one whole-layer (A, B, scale): ``scale * B @ A`` = their sum.

    A is stacked, B is block-structured (each update's B on its own rows and columns,
    zeros elsewhere). Scales that differ from ``scale`` (default: the first update's) are
    folded into B. ``rank`` pads with zeros (which change nothing) up to that rank.
    """
    scale = updates[0].scale if scale is None else scale
    total = sum(u.rank for u in updates)
    rank = max(rank or 0, total)
    first = updates[0].a
    a = torch.zeros(rank, *first.shape[1:], dtype=first.dtype)
    b = torch.zeros(out_rows, rank, dtype=first.dtype)
    column = 0
    for u in updates:
        start, stop = u.row_range
        a[column : column + u.rank] = u.a.detach().cpu()
        factor = u.b.detach().cpu()
        if u.scale != scale:
            factor = factor * (u.scale / scale)
        b[start:stop, column : column + u.rank] = factor
        column += u.rank
    return a, b, scale


def combine_layer(terms: Sequence[tuple[float, torch.Tensor, torch.Tensor, float]], how: str, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine whole-layer terms ``(weight, A, B, scale)`` of one layer into (A, B) with scale 1.

    ``how`` is ``cat``, ``svd`` or ``linear`` (see the module docstring). ``rank`` is
    the SVD's rank (default: the largest input rank).
    """
    if how not in COMBINATIONS:
        raise ValueError(f"unknown combination '{how}'; choose one of {', '.join(COMBINATIONS)}")
    kernel = terms[0][1].shape[1:]
    if how == "cat":
        a = torch.cat([t[1] for t in terms])
        b = torch.cat([w * s * t_b for w, _, t_b, s in terms], dim=1)
        return a, b
    if how == "linear":
        ranks = {t[1].shape[0] for t in terms}
        if len(ranks) > 1:
            raise ValueError(f"linear combination needs one rank for every adapter of a layer, got ranks {sorted(ranks)}; use cat or svd")
        a = sum(math.sqrt(s) * t_a for _, t_a, _, s in terms)  # scales are positive (alpha > 0)
        b = sum(w * math.sqrt(s) * t_b for w, _, t_b, s in terms)
        return a, b
    delta = sum(w * s * (t_b @ t_a.flatten(1)) for w, t_a, t_b, s in terms)
    k = min(rank or max(t[1].shape[0] for t in terms), *delta.shape)
    u, sigma, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = sigma[:k].sqrt()
    b = (u[:, :k] * root).to(delta.dtype)
    a = (root[:, None] * vh[:k]).to(delta.dtype).reshape(k, *kernel)
    return a, b
