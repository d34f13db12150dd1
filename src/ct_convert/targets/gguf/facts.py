"""What the GGUF writer and reader share: the ggml types ct-convert writes, with block sizes and
type ids from gguf-py (GGML_QUANT_SIZES, GGMLQuantizationType), never re-declared here."""

from __future__ import annotations

import math

import gguf
import torch

MMPROJ_STEM = "mmproj-model"  # the vision tower's file beside model.gguf (mmproj.py)
MMPROJ_FILE = f"{MMPROJ_STEM}.gguf"
QUANTIZED = ("Q4_0", "Q5_0", "Q8_0", "MXFP4", "NVFP4")  # the block types ct-convert writes
DENSE_TYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
TORCH_OF = {v: k for k, v in DENSE_TYPES.items()}


def block_size(ggml: str) -> int:
    """Elements per block (1 for F32/F16/BF16)."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml]][0]


def block_bytes(ggml: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml]][1]


QK = block_size("Q4_0")  # elements per Q4_0 / Q5_0 / Q8_0 / MXFP4 block (32)
QK_NVFP4 = block_size("NVFP4")  # 64
NVFP4_SUB = QK_NVFP4 // (block_bytes("NVFP4") - QK_NVFP4 // 2)  # elements per NVFP4 scale byte (16)
Q4_0_ZERO = 8  # Q4_0 stores nibble q + 8


def row_bytes(ggml: str, k: int) -> int:
    """Bytes of one row of `k` elements."""
    return k // block_size(ggml) * block_bytes(ggml)


def nbytes(ggml: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor (numpy order: rows last) of this type."""
    return math.prod(shape[:-1]) * row_bytes(ggml, shape[-1])
