"""Exact ggml block encoders (gguf.md §2): normalized codes and per-block scales in, block bytes out.

Every encoder takes codes `[..., N, K]` and per-32-column (NVFP4: per-16) scales `[..., N, K/32]`
and returns the uint8 rows `[..., N, row_bytes]` that ggml reads for a tensor of `ne = {K, N, ...}`.
All multi-byte fields are little-endian (torch views on a little-endian host).

ggml puts element j of a 32-element block in the low nibble and element j+16 in the high nibble of
byte j (NVFP4: j / j+8 inside each 16-element sub-block), unlike compressed-tensors' 2i / 2i+1
packing, so codes are always re-paired here; a byte copy of CT's packed words would scramble them.
"""

from __future__ import annotations

import sys

import torch

from ct_convert.targets.gguf.facts import NVFP4_SUB, Q4_0_ZERO, QK, QK_NVFP4, block_bytes

if sys.byteorder != "little":  # torch views below read ggml's little-endian fields in host order
    raise ImportError("ct_convert.targets.gguf.blocks needs a little-endian host")


def _blocks(t: torch.Tensor, size: int) -> torch.Tensor:
    """[..., K] -> [..., K/size, size]."""
    return t.reshape(*t.shape[:-1], t.shape[-1] // size, size)


def _pair_halves(nibbles: torch.Tensor, half: int) -> torch.Tensor:
    """uint8 4-bit values [..., 2*half] -> bytes [..., half]: low nibble = element j, high = j + half."""
    b = nibbles.reshape(*nibbles.shape[:-1], 2, half)
    return b[..., 0, :] | (b[..., 1, :] << 4)


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """Scales [..., nb] (already checked to be fp16-exact) -> [..., nb, 2]."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(*d.shape, 2)


def _rows(blocks: torch.Tensor) -> torch.Tensor:
    """[..., N, nb, bytes] -> [..., N, nb*bytes]."""
    return blocks.reshape(*blocks.shape[:-2], -1)


def q4_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Signed int codes in [-8, 7] -> Q4_0; value (nibble - 8)·d."""
    u = (codes.to(torch.int16) + Q4_0_ZERO).to(torch.uint8)
    qs = _pair_halves(_blocks(u, QK), QK // 2)
    return _rows(torch.cat([_fp16_bytes(d), qs], dim=-1))


def q4_0_from_stream(stream: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Q4_0 straight from compressed-tensors 4-bit row streams int32 [..., N, K/8] (u = q + 8, two
    codes per byte, element 2i low): the same bytes as `q4_0(q, d)` without a byte per code.

    Everything is 16-bit lanes, the fp16 scale and the 8 byte pairs of a block: stream byte m of a
    block's first half (elements 2m, 2m + 1) widened to a lane and spread by (b | b << 4) & 0x0F0F
    holds element 2m in its low byte and 2m + 1 in its high one; the same lane of the second half
    holds 2m + 16 and 2m + 17; ggml's bytes 2m and 2m + 1 are the first lane | the second << 4.
    (Byte-wise stores into every other byte of the blocks ran ~25 % slower.)
    """
    *lead, n, width = stream.shape
    nb = width // 4
    halves = stream.contiguous().view(torch.uint8).reshape(*lead, n, nb, 2, 8).to(torch.int16)
    lanes = torch.bitwise_left_shift(halves, 4).bitwise_or_(halves).bitwise_and_(0x0F0F)
    out = torch.empty(*lead, n, nb, block_bytes("Q4_0") // 2, dtype=torch.int16, device=stream.device)
    out[..., 0] = d.to(torch.float16).view(torch.int16)
    torch.bitwise_left_shift(lanes[..., 1, :], 4, out=out[..., 1:]).bitwise_or_(lanes[..., 0, :])
    return _rows(out).view(torch.uint8)


def q5_0(diff: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """q − zp in [-16, 15] -> Q5_0; value (q5 − 16)·d with q5 split in 4 low bits and a bit-plane."""
    q5 = _blocks((diff.to(torch.int16) + 16).to(torch.uint8), QK)
    qs = _pair_halves(q5 & 15, QK // 2)
    high = ((q5 >> 4) & 1).reshape(*q5.shape[:-1], 4, 8)  # bit j of the u32 = element j's 5th bit
    weights = (1 << torch.arange(8, dtype=torch.int16)).to(torch.uint8)
    qh = (high * weights).sum(dim=-1, dtype=torch.int16).to(torch.uint8)
    return _rows(torch.cat([_fp16_bytes(d), qh, qs], dim=-1))


def q8_0(values: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Integers in [-128, 127] -> Q8_0; value q·d (ggml's -128 is legal on load)."""
    qs = _blocks(values.to(torch.int8).contiguous().view(torch.uint8), QK)
    return _rows(torch.cat([_fp16_bytes(d), qs], dim=-1))


def mxfp4(codes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (bit 3 = sign) and E8M0 exponent bytes -> MXFP4; the exponent byte is copied."""
    qs = _pair_halves(_blocks(codes.to(torch.uint8), QK), QK // 2)
    return _rows(torch.cat([exponents.to(torch.uint8).unsqueeze(-1), qs], dim=-1))


def nvfp4(codes: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes and positive F8_E4M3 scale bytes (one per 16 elements) -> NVFP4 (4 scales + 32 code bytes)."""
    d = _blocks(scale_bytes.to(torch.uint8) & 0x7F, QK_NVFP4 // NVFP4_SUB)
    sub = _blocks(codes.to(torch.uint8), NVFP4_SUB)  # [..., K/16, 16]
    qs = _pair_halves(sub, NVFP4_SUB // 2)  # [..., K/16, 8]
    qs = _blocks(qs.reshape(*qs.shape[:-2], -1), QK_NVFP4 // 2)
    return _rows(torch.cat([d, qs], dim=-1))
