"""IST-DASLab Marlin output (targets.md §1.9): `B` int32 [K/16, 2N] in the Marlin tile layout, `s`
fp16 [G, N] permuted; 4-bit symmetric, w = (u - 8) * scale.

The tile layout is undone from the closed form of §1.2 (which word and nibble hold which code),
not from the permutation table the writer builds, so the two derivations check each other; the
scale permutation is the shared table (facts.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ct_convert import bitpack
from ct_convert.errors import InputError
from ct_convert.targets.marlin.facts import QUANT_METHOD, ZERO, scale_order
from ct_convert.targets.reader_base import GroupCodes, HFOutputReader, quant_method


def unpack_marlin(b: torch.Tensor) -> torch.Tensor:
    """B int32 [K/16, 2N] -> codes uint8 [K, N] (a view of a contiguous [N, K]).

    Within a 16x64 tile, nibble j = 4e + 2f + h (LSB first) of word 4t + w, t = 4a + c, holds the
    code at row 2c + 8h + e, column 16w + 8f + a (targets.md §1.2). Words are first put in output
    order [tile column, w, a, tile row, c]; nibble j sits in byte 2e + f, high half when h = 1.
    """
    kt, words = b.shape
    nt = words // 128
    wp = torch.empty(nt, 4, 8, kt, 4, dtype=torch.int32, device=b.device)  # [nt, w, a, kt, c]; fresh: viewable as bytes
    wp.copy_(b.reshape(kt, nt, 8, 4, 4).permute(1, 4, 2, 0, 3))
    by = wp.view(torch.uint8).reshape(nt, 4, 8, kt, 4, 2, 2)  # [nt, w, a, kt, c, e, f]
    out = torch.empty(nt, 4, 2, 8, kt, 2, 4, 2, dtype=torch.uint8, device=b.device)  # [nt, w, f, a, kt, h, c, e]
    for f in range(2):
        torch.bitwise_and(by[..., f], 0xF, out=out[:, :, f, :, :, 0])
        torch.bitwise_right_shift(by[..., f], 4, out=out[:, :, f, :, :, 1])
    return out.reshape(64 * nt, 16 * kt).t()


def marlin_stream(b: torch.Tensor) -> torch.Tensor:
    """B int32 [K/16, 2N] -> int32 [N, K/8]: each column's codes as an LSB-first 4-bit stream along K
    (code k in nibble k % 8 of word k // 8), what verification compares with the source's packed
    words instead of unpacking both.

    From the same closed form as `unpack_marlin`: stream word 2kt + h of column 16w + 8f + a holds,
    in nibble 2c + e, nibble 4e + 2f + h of tile word (a, c, w). The tile words are first put in
    [nt, w, a, kt, c] order, so that words c = 0..3 are two int64s (c0|c1, c2|c3). Two delta swaps
    inside each word put nibbles e = 0, 1 side by side in byte 2f + h; a 4 x 4 byte transpose across
    the words c (two delta swaps: between the int64s, then inside each) leaves byte c in word 2f + h,
    and one last copy moves f out of the innermost pair.
    """
    kt, words = b.shape
    nt = words // 128
    tiles = b.reshape(kt, nt, 128)
    out = torch.empty(64 * nt, 2 * kt, dtype=torch.int32, device=b.device)
    step = max(1, bitpack.BAND_BYTES // (kt * 512))  # bands of 64-column tiles, run in cache
    for t in range(0, nt, step):
        out[64 * t:64 * (t + step)] = _tile_streams(tiles[:, t:t + step])
    return out


def _tile_streams(tiles: torch.Tensor) -> torch.Tensor:
    """`marlin_stream` of the tiles int32 [K/16, nt, 128] of nt 64-column tiles -> int32 [64 nt, K/8]."""
    kt, nt = tiles.shape[:2]
    x = torch.empty(nt, 4, 8, kt, 4, dtype=torch.int32, device=tiles.device)  # [nt, w, a, kt, c]
    x.copy_(tiles.reshape(kt, nt, 8, 4, 4).permute(1, 4, 2, 0, 3))
    q = x.view(torch.int64)  # [nt, w, a, kt, 2]
    out = torch.empty(nt, 4, 2, 8, kt, dtype=torch.int64, device=tiles.device)  # [nt, w, f, a, kt] of (h = 0 | h = 1); scratch until then
    bitpack.shuffle(bitpack.shuffle(q, 8, 0x0000FF000000FF00, out), 4, 0x00F000F000F000F0, out)  # nibble 4e + fh -> 2fh + e
    bitpack.exchange(q[..., 0], q[..., 1], 16, 0x0000FFFF0000FFFF, out)  # half words: c0 <-> c2, c1 <-> c3
    bitpack.shuffle(q, 24, 0xFF00FF00, out)  # bytes: c0 <-> c1, c2 <-> c3
    out.copy_(q.view(nt, 4, 8, kt, 2).permute(0, 1, 4, 2, 3))
    return out.view(torch.int32).view(64 * nt, 2 * kt)


class MarlinOutput(HFOutputReader):
    working_bytes_per_weight = 4  # one byte per code on each side, then a few temporaries

    def decode(self, module: str) -> GroupCodes | None:
        if f"{module}.B" not in self.store:
            return None
        b = self.store.get(f"{module}.B")
        s = self.store.get(f"{module}.s")
        if b.dim() != 2 or b.shape[1] % 128:
            raise InputError(f"{module}: B {list(b.shape)} is not a whole number of 16x64 Marlin tiles")
        k, n = 16 * b.shape[0], b.shape[1] // 2
        g = s.shape[0]
        if s.shape[1] != n or k % g:
            raise InputError(f"{module}: s {list(s.shape)} does not fit B {list(b.shape)}")
        src = torch.argsort(scale_order(g))  # the stored column of each original column
        s = s.reshape(-1, src.numel()).index_select(1, src).reshape(g, n)
        return GroupCodes(lambda: unpack_marlin(b).t(), ZERO, s, stream=marlin_stream(b))


def detect(folder: Path, config) -> bool:
    return quant_method(config) == QUANT_METHOD


def open(folder: Path, source_architecture: str | None = None) -> MarlinOutput:
    return MarlinOutput(folder)
