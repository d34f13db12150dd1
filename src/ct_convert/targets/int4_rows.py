"""Signed int4 codes two rows to a byte: row 2j in the low nibble, row 2j + 1 in the high one.

The W4A16_AWQ weight layout of ModelOpt checkpoints (its `pack_int4_in_uint8`) and of TensorRT-LLM's
legacy ones: the writers' packing and the readers' decoding side by side, shared by both targets.
"""

from __future__ import annotations

import torch

from ct_convert import bitpack

_SIGN_FLIP = 0x8888888888888888 - (1 << 64)  # every nibble's top bit, as a signed int64


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes int8 [.., N, K] -> uint8 [.., N/2, K]."""
    b = codes.view(torch.uint8)  # two's-complement bytes: the low nibble is the int4 code
    return (b[..., 0::2, :] & 0xF) | (b[..., 1::2, :] << 4)


def from_stream(words: torch.Tensor) -> torch.Tensor:
    """int32 [.., N, K/8] LSB-first 4-bit streams of unsigned codes -> uint8 [.., N/2, K] as `pack` lays
    out their signed codes, without unpacking: `stream`'s steps undone (the nibble swap is its own
    inverse)."""
    *lead, n, width = words.shape
    if n % 2:
        raise ValueError(f"two rows to a byte needs an even row count, got {n}")
    pairs = words.contiguous().view(torch.uint8).reshape(-1, 2, 4 * width)
    return bitpack.by_rows(_from_row_pairs, pairs).reshape(*lead, n // 2, 8 * width)


def _from_row_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """uint8 [R, 2, K/2] (the streams of rows 2j and 2j + 1) -> uint8 [R, K]: byte k of both rows as
    one 16-bit lane (row 2j + 1's byte high), built by widening whole rows: interleaving the bytes
    by a strided copy cost twice the rest."""
    half, _, k2 = pairs.shape
    lanes = pairs[:, 1].to(torch.int16)
    lanes.bitwise_left_shift_(8).bitwise_or_(pairs[:, 0])
    scratch = torch.empty(half * k2 // 4, dtype=torch.int64, device=pairs.device)
    words = bitpack.shuffle(lanes.view(-1).view(torch.int64), 4, 0x00F000F000F000F0, scratch)
    return words.bitwise_xor_(_SIGN_FLIP).view(torch.uint8).view(half, 2 * k2)


def unsigned_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [.., N/2, K] -> unsigned codes uint8 [.., N, K] (a signed nibble plus 8 is the nibble with
    its top bit flipped)."""
    b = packed.view(torch.uint8) ^ 0x88
    return torch.stack((b & 0xF, b >> 4), -2).flatten(-3, -2)


def stream(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N/2, K] -> int32 [N, K/8]: each row's unsigned codes as an LSB-first 4-bit stream along K,
    what verification compares with the source's packed words instead of unpacking both. K must be a
    multiple of 8.

    Read as 16-bit lanes (bytes k, k + 1), swapping the high nibble of byte k with the low nibble of
    byte k + 1 puts row 2j's stream byte in the lane's low byte and row 2j + 1's in its high byte;
    narrowing whole rows of lanes (the high byte shifted down first) splits them.
    """
    half, k = packed.shape
    return bitpack.by_rows(_row_pairs, packed.view(torch.uint8)).view(2 * half, k // 8)


def _row_pairs(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K] -> int32 [R, K/4]: the streams of rows 2j and 2j + 1 side by side in row j (the
    low and the high bytes of the lanes, each narrowed from whole rows of lanes)."""
    half, k = packed.shape
    out = torch.empty(half, 2, k // 2, dtype=torch.uint8, device=packed.device)  # scratch until filled
    lanes = bitpack.shuffle((packed ^ 0x88).view(torch.int64), 4, 0x00F000F000F000F0, out.view(-1).view(torch.int64))
    lanes = lanes.view(torch.int16).view(half, k // 2)
    out[:, 0].copy_(lanes)  # a narrowing copy keeps the low byte
    out[:, 1].copy_(lanes.bitwise_right_shift_(8))
    return out.view(torch.int32).view(half, k // 4)


def codes_of_stream(words: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] LSB-first 4-bit stream -> unsigned codes uint8 [N, K]."""
    return bitpack.split_nibbles(words.contiguous().view(torch.uint8))
