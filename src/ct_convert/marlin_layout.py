"""The Marlin tile layout (targets.md §1.2–§1.5) as whole-tensor torch ops that run on any device.

This is the layout vLLM's Marlin kernels read, built in memory at load time by `gptq_marlin_repack`
(with the act-order `perm`), `awq_marlin_repack`, `marlin_permute_scales` and `marlin_zero_points` /
`awq_to_marlin_zero_points`; the functions here reproduce those results bit for bit. For 4-bit
symmetric weights it is also the IST-DASLab on-disk format (`B`, `s`) that `--target marlin` writes.

Codes are unsigned (`u = s + 2^(b-1)`) and oriented [K, N] like a GPTQ `qweight` before packing.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ct_convert import bitpack
from ct_convert.bitpack import INTERLEAVE

TILE = 16  # rows and columns of one tensor-core tile
CHUNK = 1024  # values per 16x64 Marlin tile: the span of the weight permutation
_LOW_NIBBLES, _HIGH_NIBBLES = 0x0F0F0F0F, 0xF0F0F0F0 - (1 << 32)  # int32 masks


@lru_cache(maxsize=None)
def _weight_perm(bits: int) -> tuple[int, ...]:
    """vLLM `get_weight_perm` (non-W4A8): which value of a 1024-chunk each output position takes."""
    base: list[int] = []
    for lane in range(32):
        col = lane // 4
        r = lane % 4
        rows = (2 * r, 2 * r + 1, 2 * (r + 4), 2 * (r + 4) + 1)
        block = [16 * row + col + 8 * half for half in (0, 1) for row in rows]
        for tile in range(4):
            base.extend(p + 256 * tile for p in block)
    il = INTERLEAVE[bits]
    return tuple(base[g + t] for g in range(0, CHUNK, len(il)) for t in il)


def weight_perm(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    _check_bits(bits)
    return torch.tensor(_weight_perm(bits), dtype=torch.int64, device=device)


def scale_perm(device: torch.device | str = "cpu") -> torch.Tensor:
    """Grouped scales: in each 64-column block, position 8*i + j takes column i + 8*j."""
    return torch.tensor([i + 8 * j for i in range(8) for j in range(8)], dtype=torch.int64, device=device)


def scale_perm_single(device: torch.device | str = "cpu") -> torch.Tensor:
    """One group along K: in each 32-column block, position 8*i + m takes column 2*i + (0,1,8,9,..)[m]."""
    cols = (0, 1, 8, 9, 16, 17, 24, 25)
    return torch.tensor([2 * i + c for i in range(4) for c in cols], dtype=torch.int64, device=device)


def pack_lsb(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., C] (bits in 1, 2, 4, 8) -> int32 words [..., C*bits/32], LSB first.

    Works on bytes, then reinterprets every 4 bytes as one little-endian word: the same words as
    `bitpack.pack`, for the widths that never straddle a byte, at memory speed.
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"pack_lsb packs 1, 2, 4 or 8 bits, not {bits}")
    if (values.shape[-1] * bits) % 32:
        raise ValueError(f"{values.shape[-1]} {bits}-bit values do not fill whole 32-bit words")
    return bitpack.pack(values, bits)


def marlin_weights(codes: torch.Tensor, bits: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """Unsigned codes [K, N] -> Marlin words int32 [K/16, N*16*bits/32] (targets.md §1.2).

    `perm` (act-order `sort_idx`, int [K]) makes output row k read input row perm[k], as
    `gptq_marlin_repack` does with its `perm` argument.
    """
    _check_bits(bits)
    k, n = codes.shape
    if k % TILE or n % 64:
        raise ValueError(f"Marlin needs K % 16 == 0 and N % 64 == 0, got K={k}, N={n}")
    u = codes.to(torch.uint8)
    if perm is not None and perm.numel():
        u = u.index_select(0, perm.to(device=u.device, dtype=torch.int64))
    # The tile permutation factors into axes (the closed form of §1.2): row k = 16kt + 8h + 2b + p and
    # column n = 64nt + 16w + 8c + a; lane t = 4a + b of warp w packs its values in the order
    # (p, c, h) for 4-bit and (c, p, h) for 8-bit, i.e. output axes (kt, nt, a, b, w, p|c, c|p, h).
    # The 8 columns `a` are 8 contiguous bytes: move them as one int64 first, then transpose bytes
    # inside each 1024-value tile; two cache-friendly copies instead of a byte-wise 1024-entry gather.
    words = u.contiguous().reshape(-1).view(torch.int64).reshape(k // TILE, 2, 4, 2, n // 64, 4, 2)  # kt, h, b, p, nt, w, c
    tiles = words.permute(*((0, 4, 2, 5, 3, 6, 1) if bits == 4 else (0, 4, 2, 5, 6, 3, 1))).contiguous()
    values = tiles.view(torch.uint8).reshape(k // TILE, n // 64, CHUNK // 8, 8).transpose(2, 3)
    return pack_lsb(values.reshape(k // TILE, n * TILE), bits)


def marlin_weights_from_stream(stream: torch.Tensor) -> torch.Tensor:
    """4-bit codes as row bit streams, int32 [N, K/8] (8 codes along K per word, LSB first, the
    compressed-tensors packing) -> the same Marlin words as `marlin_weights(codes.t(), 4)`.

    Code (n, k) with k = 16kt + 8h + 2c + e, n = 64nt + 16w + 8f + a sits in nibble e of byte c of
    stream word 2kt + h, and goes to nibble h of byte 2e + f of word 16a + 4c + w of tile (kt, nt).
    The two words h = 0, 1 are one int64 and move as a unit into tile order; then, per (a, w), the
    nibbles of h = 0 and h = 1 are merged into four words y[2e + f] whose byte c belongs to output
    word c: a 4x4 byte transpose (two rounds of masked swaps) finishes the job, all on whole words.
    """
    n, width = stream.shape
    kt, nt = width // 2, n // 64
    if width % 2 or n % 64:
        raise ValueError(f"Marlin needs K % 16 == 0 and N % 64 == 0, got K={8 * width}, N={n}")
    q = stream.contiguous().view(torch.int64).reshape(nt, 4, 2, 8, kt)  # [nt, w, f, a, kt]
    out = torch.empty(kt, nt, 8, 4, 4, dtype=torch.int32, device=stream.device)
    # in bands of 64-row tiles: the dozen whole-tensor steps below then run in cache, and each band's
    # result lands as 512-byte runs of the output
    step = max(1, bitpack.BAND_BYTES // (64 * width * 4))
    for t in range(0, nt, step):
        out[:, t:t + step] = _tile_words(q[t:t + step])
    return out.reshape(kt, -1)


def _tile_words(q: torch.Tensor) -> torch.Tensor:
    """int64 [nt, w, f, a, kt] stream words of 64-row tiles -> int32 [kt, nt, a, c, w] Marlin words."""
    nt, kt = q.shape[0], q.shape[-1]
    words = q.permute(4, 0, 3, 1, 2).contiguous().view(torch.int32).reshape(kt, nt, 8, 4, 2, 2)  # [kt, nt, a, w, f, h]
    y = []
    for e in range(2):
        for f in range(2):
            h0, h1 = words[..., f, 0], words[..., f, 1]
            y.append((h0 & _LOW_NIBBLES) | ((h1 & _LOW_NIBBLES) << 4) if e == 0 else ((h0 >> 4) & _LOW_NIBBLES) | (h1 & _HIGH_NIBBLES))
    for (i, j), shift, mask in (((0, 2), 16, 0xFFFF), ((1, 3), 16, 0xFFFF), ((0, 1), 8, 0x00FF00FF), ((2, 3), 8, 0x00FF00FF)):
        t = ((y[i] >> shift) ^ y[j]) & mask  # arithmetic-shift sign bits fall outside the mask
        y[j] = y[j] ^ t
        y[i] = y[i] ^ (t << shift)
    return torch.stack(y, dim=3)  # [kt, nt, a, c, w]: word 16a + 4c + w of each tile


def gptq_marlin_repack(qweight: torch.Tensor, perm: torch.Tensor | None, size_k: int, size_n: int, bits: int) -> torch.Tensor:
    """vLLM `gptq_marlin_repack`: GPTQ `qweight` int32 [K*bits/32, N] -> Marlin words."""
    codes = bitpack.unpack(qweight.t().contiguous(), bits, size_k)  # [N, K]
    _check_shape(codes, size_n, size_k)
    return marlin_weights(codes.t(), bits, perm)


def awq_marlin_repack(qweight: torch.Tensor, size_k: int, size_n: int, bits: int) -> torch.Tensor:
    """vLLM `awq_marlin_repack`: AWQ `qweight` int32 [K, N*bits/32] (interleaved) -> Marlin words."""
    return marlin_weights(unpack_awq_order(qweight, bits, size_n), bits)


def unpack_awq_order(packed: torch.Tensor, bits: int, size_n: int) -> torch.Tensor:
    """int32 [R, N*bits/32] packed along N in AutoAWQ order -> unsigned codes [R, N] in column order."""
    nib = bitpack.unpack(packed.contiguous(), bits, size_n)
    _check_shape(nib, packed.shape[0], size_n)
    il = INTERLEAVE[bits]
    # word slot i holds column il[i]; column j therefore sits in slot argsort(il)[j]
    undo = torch.tensor(il, dtype=torch.int64, device=nib.device).argsort()
    return nib.reshape(nib.shape[0], -1, len(il)).index_select(2, undo).reshape(nib.shape)


def marlin_permute_scales(scales: torch.Tensor, size_k: int, size_n: int, group_size: int) -> torch.Tensor:
    """vLLM `marlin_permute_scales`: [G, N] -> [G, N]; one group spanning K uses the single permutation."""
    grouped = group_size != -1 and group_size < size_k
    p = scale_perm(scales.device) if grouped else scale_perm_single(scales.device)
    if size_n % p.numel():
        raise ValueError(f"N={size_n} is not a multiple of {p.numel()}")
    return scales.reshape(-1, p.numel()).index_select(1, p).reshape(-1, size_n).contiguous()


def marlin_zero_points(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """vLLM `marlin_zero_points`: unsigned zero points [G, N] -> int32 [G, N*bits/32] (§1.4)."""
    _check_bits(bits)
    g, n = zeros.shape
    z = zeros.to(torch.uint8)
    z = z.reshape(-1, 64).index_select(1, scale_perm(z.device))  # always the grouped permutation
    il = torch.tensor(INTERLEAVE[bits], dtype=torch.int64, device=z.device)
    z = z.reshape(-1, il.numel()).index_select(1, il)
    return pack_lsb(z.reshape(g, n), bits)


def awq_to_marlin_zero_points(qzeros: torch.Tensor, size_k: int, size_n: int, bits: int) -> torch.Tensor:
    """vLLM `awq_to_marlin_zero_points`: AWQ `qzeros` int32 [G, N*bits/32] -> Marlin zero points."""
    return marlin_zero_points(unpack_awq_order(qzeros, bits, size_n), bits)


def sort_g_idx(g_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM `marlin_sort_g_idx`: (g_idx sorted, sort_idx), sort_idx the repack `perm`.

    A stable sort: every grouping permutation gives a valid layout, but only a fixed tie order gives
    reproducible bytes (whether vLLM's unflagged argsort is stable is UNCONFIRMED, targets.md §7.4).
    """
    sort_idx = torch.argsort(g_idx.to(torch.int64), stable=True)
    return g_idx.index_select(0, sort_idx), sort_idx.to(torch.int32)


def _check_bits(bits: int) -> None:
    if bits not in INTERLEAVE:
        raise ValueError(f"Marlin holds 4- or 8-bit codes, not {bits}-bit")


def _check_shape(codes: torch.Tensor, rows: int, cols: int) -> None:
    if tuple(codes.shape) != (rows, cols):
        raise ValueError(f"packed input holds {list(codes.shape)} codes, expected [{rows}, {cols}]")
