"""IST-DASLab Marlin output (targets.md §1.9): `B` int32 [K/16, 2N] in the Marlin tile layout, `s`
fp16 [G, N] permuted; 4-bit symmetric, w = (u - 8) * scale.

The tile layout is undone from the closed form of §1.2 (which word and nibble hold which code),
not from the permutation table the writer builds, so the two derivations check each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ct_convert.errors import InputError
from ct_convert.readers.targets.base import HFOutputReader, dequantize_groups, nibbles, quant_method, register

# nibble j (LSB first) of word 4*t + w holds the code at (k0 + dk, n0 + dn)
NIBBLE_OFFSETS = ((0, 0), (8, 0), (0, 8), (8, 8), (1, 0), (9, 0), (1, 8), (9, 8))


def _tile_source() -> torch.Tensor:
    """For each of the 16x64 codes of a Marlin tile (row-major), its position among the tile's 1024 nibbles."""
    src = torch.empty(1024, dtype=torch.int64)
    for t in range(32):
        for w in range(4):
            for j, (dk, dn) in enumerate(NIBBLE_OFFSETS):
                r = 2 * (t % 4) + dk
                c = 16 * w + t // 4 + dn
                src[64 * r + c] = 8 * (4 * t + w) + j
    return src


def _scale_source(groups: int) -> torch.Tensor:
    """Column of the stored `s` that holds original column c, within one permutation block."""
    if groups > 1:
        p = torch.arange(64)
        old = p // 8 + 8 * (p % 8)
    else:
        p = torch.arange(32)
        m = p % 8
        old = 2 * (p // 8) + m % 2 + 8 * (m // 2)
    return torch.argsort(old)


def unpack_marlin(b: torch.Tensor) -> torch.Tensor:
    """B int32 [K/16, 2N] -> codes uint8 [K, N]."""
    kt, words = b.shape
    n = words // 2
    tiles = nibbles(b).reshape(kt, n // 64, 1024).index_select(2, _tile_source()).reshape(kt, n // 64, 16, 64)
    return tiles.permute(0, 2, 1, 3).reshape(16 * kt, n)


class MarlinOutput(HFOutputReader):
    kind = "marlin"

    def dequantize_quantized(self, module: str) -> torch.Tensor | None:
        if f"{module}.B" not in self.store:
            return None
        b = self.store.get(f"{module}.B")
        s = self.store.get(f"{module}.s")
        u = unpack_marlin(b)  # [K, N]
        k, n = u.shape
        g = s.shape[0]
        if s.shape[1] != n or k % g:
            raise InputError(f"{module}: s {list(s.shape)} does not fit B {list(b.shape)}")
        src = _scale_source(g)
        s = s.reshape(-1, src.numel()).index_select(1, src).reshape(g, n)
        return dequantize_groups(u.t(), torch.full((g, n), 8, dtype=torch.int16), s)


@register("marlin")
class MarlinKind:
    def detect(self, folder: Path) -> bool:
        return quant_method(folder) == "marlin"

    def open(self, folder: Path) -> MarlinOutput:
        return MarlinOutput(folder)
