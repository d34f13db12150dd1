"""TensorRT-LLM's CUTLASS mixed-GEMM weight layout (targets.md §4.7), as whole-tensor ops.

`preprocess_weights_for_mixed_gemm` is what TensorRT-LLM applies to int8 / int4 weights before its
fpA_intB kernels read them; checkpoints of W4A16_GPTQ, W8A16 and W4A16 must already hold these bytes.
Only 16-bit activations are covered (W4A8 tables differ).
"""

from __future__ import annotations

import torch

from ct_convert.targets.trtllm_legacy.facts import K_TILE, REGISTER_ORDER, ROW_PERMUTATION


def layout_arch(sm: int) -> int:
    """The SM whose layout 2-D weights use: Hopper keeps its own, every other arch uses Ampere's."""
    return 90 if sm == 90 else 80


def columns_interleaved(bits: int, sm: int) -> int:
    return 1 if layout_arch(sm) == 90 else 16 // bits


def check_shape(k: int, n: int, bits: int) -> str | None:
    """Why a [K, N] weight cannot take this layout, or None."""
    if k % K_TILE:
        return f"in_features {k} is not a multiple of {K_TILE}"
    if n % (16 // bits):
        return f"out_features {n} is not a multiple of {16 // bits}"
    return None


def preprocess_weights_for_mixed_gemm(codes: torch.Tensor, bits: int, sm: int) -> torch.Tensor:
    """Signed codes int8 [K, N] (row-major, K = in_features) -> int8 [K, N*bits/8] kernel bytes."""
    if bits not in (4, 8):
        raise ValueError(f"mixed-GEMM layout exists for 4 and 8 bits, not {bits}")
    k, n = codes.shape
    why = check_shape(k, n, bits)
    if why:
        raise ValueError(why)
    perm = torch.tensor(ROW_PERMUTATION[bits], dtype=torch.int64, device=codes.device)
    rows = perm.numel()
    rows_index = (torch.arange(k, device=codes.device).reshape(-1, rows) // rows * rows + perm).reshape(-1)
    x = codes.index_select(0, rows_index)
    stream = x.t()  # column-major: for each n, its K permuted rows
    il = columns_interleaved(bits, sm)
    if il > 1:
        stream = stream.reshape(n // il, il, k // K_TILE, K_TILE).permute(0, 2, 1, 3)
    stream = stream.reshape(-1).to(torch.int16)
    group = len(REGISTER_ORDER[bits])
    order = torch.tensor(REGISTER_ORDER[bits], dtype=torch.int64, device=codes.device)
    if bits == 8:
        unsigned = (stream + 128).reshape(-1, group).index_select(1, order)
        out = unsigned.to(torch.uint8)
    else:
        unsigned = ((stream + 8) & 0xF).reshape(-1, group).index_select(1, order).reshape(-1, 2)
        out = (unsigned[:, 0] | (unsigned[:, 1] << 4)).to(torch.uint8)
    return out.reshape(k, n * bits // 8).view(torch.int8)

