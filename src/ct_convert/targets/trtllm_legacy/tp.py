"""Tensor-parallel shards in TensorRT-LLM's convention (targets.md §4.2).

Column-parallel linears split N: a fused linear splits each of its parts separately and concatenates
the rank's slices (q_r, k_r, v_r), which is not a slice of the fused matrix. Row-parallel linears split
K; their bias is added after the all-reduce, so every rank holds it whole.
"""

from __future__ import annotations

import torch


def column_shard(parts: list[torch.Tensor], tp: int, rank: int) -> torch.Tensor:
    """Rows `rank` of `tp` of every part ([N_p, ...] each), concatenated in part order."""
    slices = []
    for p in parts:
        n = p.shape[0] // tp
        slices.append(p.narrow(0, rank * n, n))
    return torch.cat(slices, dim=0) if len(slices) > 1 else slices[0]


def row_shard(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Columns (last dimension) `rank` of `tp`."""
    k = t.shape[-1] // tp
    return t.narrow(-1, rank * k, k)
