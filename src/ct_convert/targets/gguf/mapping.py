"""Which ggml type holds a compressed-tensors module exactly (gguf.md §0.1, §2.7), the data checks that
can still force a fallback, and the encoding of one module's rows.

Header facts pick a type (`choose`); the scale scan (`data_reason`, no weight codes read) confirms it
before any tensor info is written; `encode` produces the bytes.
"""

from __future__ import annotations

import math

import torch

from ct_convert import bitpack, floatcodes
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.targets.gguf import blocks
from ct_convert.targets.gguf.facts import DENSE_TYPES, QK, QK_NVFP4, QUANTIZED, TORCH_OF



def dense_type(dtype: torch.dtype) -> str:
    return DENSE_TYPES.get(dtype, "F32")


def choose(info: ModuleInfo, slot: str, model, nvfp4: bool) -> tuple[str, str | None]:
    """(ggml type, why it is a fallback or None) from header facts; `model` the architecture."""
    fallback = "F32" if slot in model.f32_slots else dense_type(info.dtype)
    if slot in model.f32_slots:
        return fallback, "llama.cpp keeps the MoE router in F32"
    quantized, why = _quantized_type(info, slot, model, nvfp4)
    return (quantized, None) if quantized else (fallback, why)


def _quantized_type(info: ModuleInfo, slot: str, model, nvfp4: bool) -> tuple[str | None, str | None]:
    s, k, e = info.scheme, info.in_features, info.encoding
    if e is Encoding.DENSE:
        return None, "stored unquantized in the source"
    if e is Encoding.FP8:
        return None, "FP8 weights have no GGUF type (Q8_0 would re-quantize)"
    if info.format == "nvfp4-pack-quantized":
        if not nvfp4:
            return None, "NVFP4 is written only with --nvfp4 (needs llama.cpp with NVFP4; ollama cannot read it)"
        if slot not in model.nvfp4_slots:
            return None, f"llama.cpp has no global-scale slot for NVFP4 in {slot}"
        if k % QK_NVFP4:
            return None, f"in_features {k} is not a multiple of {QK_NVFP4}"
        return "NVFP4", None
    if k % QK:
        return None, f"in_features {k} is not a multiple of {QK}"
    if e is Encoding.FP4:
        return ("MXFP4", None) if info.format == "mxfp4-pack-quantized" else (None, f"{info.format} has no GGUF type")
    if e is Encoding.FP6:
        return "Q8_0", None
    if s.strategy not in ("tensor", "channel", "group"):
        return None, f"strategy {s.strategy} has no ggml block type"
    if s.strategy == "group" and s.group_size % QK:
        return None, f"group size {s.group_size} is not a multiple of {QK}"
    if s.num_bits <= 4:
        return ("Q4_0", None) if s.symmetric else ("Q5_0", None)
    if s.num_bits <= 7 or s.symmetric:
        return "Q8_0", None
    return None, "asymmetric int8: no ggml 8-bit type holds q - zero_point in [-255, 255]"


def at_repack(info: ModuleInfo, ggml: str) -> str | None:
    """For `inspect`: what the scale scan (`data_reason`) decides for a module headers map to `ggml`."""
    checks = []
    if ggml in ("Q4_0", "Q5_0", "Q8_0"):
        if info.has_g_idx:
            checks.append("its g_idx must be constant on each aligned 32-column block")
        if info.encoding is Encoding.FP6 or info.dtype != torch.float16:
            checks.append("every block scale must be exact in fp16 (ggml's block scale)")
    elif ggml == "NVFP4":
        checks.append("the global scale's fp32 reciprocal must give every bf16 weight, and no scale be negative")
    return "; ".join(checks) + " (else written unquantized)" if checks else None


def block_columns(qw: QuantizedWeight) -> torch.Tensor:
    """Scale column of every 32-element block (its first column's group)."""
    return qw.column_groups()[:: QK]


def block_scales(qw: QuantizedWeight) -> torch.Tensor:
    """float [..., N, K/32]: the multiplier `d` of every Q4_0/Q5_0/Q8_0 block."""
    s = qw.group_scales()
    if qw.encoding is Encoding.FP6:
        # E2M3 values are multiples of 1/8: store 8·v as int8 and 2^(E-127)/8 as d (gguf.md §2.4)
        s = s.to(torch.float32) / 8
    if qw.g_idx is None and qw.effective_group_size % QK == 0:
        # groups in column order, whole blocks each: every scale repeated per block (a gather along a
        # short last dimension is ~10x slower)
        per, blocks = qw.effective_group_size // QK, math.ceil(qw.in_features / QK)
        return s.unsqueeze(-1).expand(*s.shape, per).reshape(*s.shape[:-1], -1)[..., :blocks]
    return s.index_select(-1, block_columns(qw))


def data_reason(qw: QuantizedWeight, ggml: str) -> str | None:
    """Why the stored scales keep `ggml` from being exact (fallback), or None. Reads no codes."""
    if ggml in ("Q4_0", "Q5_0", "Q8_0"):
        g = qw.column_groups()
        if g.numel() % QK or not bool((g.reshape(-1, QK) == g[:: QK, None]).all()):
            return "g_idx is not constant on each aligned 32-column block"
        if qw.encoding is Encoding.FP6:
            d = block_scales(qw)
        else:  # each block's d is its group's scale: checked once per group that some block reads
            d = qw.group_scales()
            if qw.g_idx is not None:
                d = d.index_select(-1, block_columns(qw).unique())
        # d is finite (the reader refuses NaN/Inf scales): one beyond fp16's range becomes inf, unequal
        if d.dtype != torch.float16 and not torch.equal(d.to(torch.float16).to(d.dtype), d):
            return "a scale is not exactly representable in fp16 (ggml's block scale)"
        return None
    if ggml == "NVFP4":
        return _nvfp4_reason(qw)
    return None


def nvfp4_multiplier(qw: QuantizedWeight) -> torch.Tensor:
    """float32 per-tensor (per-expert) factor llama.cpp multiplies the NVFP4 matmul by: 1/global_scale."""
    return (1.0 / qw.global_scale.to(torch.float32)).reshape(-1)


def _nvfp4_reason(qw: QuantizedWeight) -> str | None:
    if qw.scale.dtype != torch.float8_e4m3fn:
        return f"NVFP4 scales stored as {qw.scale.dtype}, not F8_E4M3"
    raw = qw.scale.view(torch.uint8)
    if bool(((raw & 0x80) != 0).any()):
        return "a negative NVFP4 scale (ggml ignores the sign bit)"
    # ggml: E2M1(code)·s·c, with c = fp32(1/g); CT: E2M1(code)·fp32(s/g). Every product the tensor
    # can contain is checked (all 16 codes × every scale present), rounded to bf16 (gguf.md §0.1).
    values = floatcodes.fp4_to_float(torch.arange(16, dtype=torch.uint8))
    s = torch.unique(qw.scale.to(torch.float32))
    for g, c in zip(qw.global_scale.to(torch.float32).reshape(-1), nvfp4_multiplier(qw)):
        ours = (values[:, None] * s[None, :]) * c
        ref = values[:, None] * (s[None, :] / g)
        if not torch.equal(ours.to(torch.bfloat16), ref.to(torch.bfloat16)):
            return "the global scale's reciprocal in fp32 changes a bf16 weight"
    return None


def encode(qw: QuantizedWeight, ggml: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [..., N, row_bytes] of a module in `ggml` (a quantized type or the dense fallback);
    `rows` reorders output rows (the llama Q/K rope order) on codes, scales and zero points alike."""

    def r(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t.index_select(-2, rows)

    if ggml not in QUANTIZED:
        return r(qw.dequantize(TORCH_OF[ggml])).contiguous().view(torch.uint8)
    if ggml == "MXFP4":
        return blocks.mxfp4(r(qw.codes), r(qw.extras["weight_scale_e8m0"]))
    if ggml == "NVFP4":
        return blocks.nvfp4(r(qw.codes), r(qw.scale.view(torch.uint8)))
    d = r(block_scales(qw))
    if qw.encoding is Encoding.FP6:
        return blocks.q8_0(r(qw.code_values() * 8).to(torch.int8), d)
    zp = qw.group_zero_points()
    stream = qw.packed_stream if ggml == "Q4_0" and zp is None else None
    if stream is not None and stream.shape[-1] * 8 == qw.in_features:
        s = r(stream)  # [.., N, K/8]: rows of every expert banded together
        rows = bitpack.by_rows(blocks.q4_0_from_stream, s.reshape(-1, s.shape[-1]), d.reshape(-1, d.shape[-1]))
        return rows.reshape(*s.shape[:-1], -1)
    codes = r(qw.codes)
    if zp is not None:
        codes = codes.to(torch.int16) - r(zp).to(torch.int16).index_select(-1, qw.column_groups())
    if ggml == "Q4_0":
        return blocks.q4_0(codes, d)
    if ggml == "Q5_0":
        return blocks.q5_0(codes, d)
    return blocks.q8_0(codes, d)
