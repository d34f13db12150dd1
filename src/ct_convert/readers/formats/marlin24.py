"""`marlin-24` (legacy, <= 0.14): 2:4-sparse INT codes in Marlin tiles with CUTLASS metadata (§5.12).

The library only ever had an encoder (`Marlin24Compressor`); this is its inverse. Per module:

* `weight_packed` I32 `[K/32, 16N/pf]`: the kept half of the codes (`[K/2, N]`, unsigned), cut into
  16x16 tiles, each run of 1024 values (one 32x64 Marlin 2:4 tile) permuted, `pf = 32/b` per word;
* `meta` I16 `[K/32, 2N]`: CUTLASS 2:4 metadata `[N, K/16]`, reordered for the sparse tensor cores,
  then reinterpreted in place (a raw resize, not a transpose);
* `scale_packed` F16 `[G, N]`: transposed scales, grouped ones permuted per 64 columns.

Verified on 4-bit group-128 checkpoints; the 8-bit path (pf 4, interleave `[0,2,1,3]`) follows the
same algorithm but is UNCONFIRMED against a real file.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ct_convert import bitpack
from ct_convert.errors import InputError
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.readers.formats.base import ModuleTensors, load_scale, register

TILE = 16  # Marlin tile edge
CHUNK = 1024  # values permuted together: one 2:4 Marlin tile of the compressed matrix
SCALE_ROW = 64  # scales are permuted in runs of 64 output columns
_SCALE_PERM = tuple(8 * i + j for i in range(8) for j in (0, 4, 1, 5, 2, 6, 3, 7))


@lru_cache(maxsize=None)
def weight_perm_24(bits: int) -> torch.Tensor:
    """The writer's 1024-entry permutation (targets.md §1.10 step 4): `new[i] = old[perm[i]]`.

    Per warp lane i: rows 2(i%4)+{0,1} and 2(i%4+4)+{0,1} of the 16-row tile, at column i//4 of an
    8-column group; half `blk` of the 16-column n-tile pair adds 4, the four j-copies add j.
    """
    base: list[int] = []
    for i in range(32):
        col = i // 4
        block = []
        for blk in (0, 1):
            r = 2 * (i % 4)
            for row in (r, r + 1, r + 8, r + 9):
                block.append(16 * row + 256 * (col // 2) + 8 * (col % 2) + 4 * blk)
        for j in range(4):
            base.extend(p + j for p in block)
    il = bitpack.INTERLEAVE[bits]
    n = len(il)
    perm = [base[g * n + il[t]] for g in range(CHUNK // n) for t in range(n)]
    out = torch.tensor(perm, dtype=torch.int64)
    assert sorted(perm) == list(range(CHUNK))
    return out


@lru_cache(maxsize=None)
def _inverse_weight_perm(bits: int) -> torch.Tensor:
    return torch.argsort(weight_perm_24(bits))


@lru_cache(maxsize=None)
def _inverse_scale_perm() -> torch.Tensor:
    return torch.argsort(torch.tensor(_SCALE_PERM, dtype=torch.int64))


def meta_offsets(rows: int, cols: int) -> torch.Tensor:
    """int64 [rows*cols]: where CUTLASS's reordering put element (r, c) of the int16 `[rows, cols]`
    metadata matrix in the flat reordered buffer (ColumnMajorInterleaved<2>, 64-row groups,
    2x2 top-right / bottom-left swap). Gathering the buffer at these offsets undoes the reordering."""
    r = torch.arange(rows, dtype=torch.int64)[:, None].expand(rows, cols)
    c = torch.arange(cols, dtype=torch.int64)[None, :].expand(rows, cols)
    group_x, group_y = 64, 32  # group_y is 32 for int16 metadata
    r = r // group_x * group_x + (r % 2) * 2 + (r % 8) // 4 + ((r % group_y) % 4) // 2 * 32 + ((r % group_x) // 8) * 4
    swap = ((r % 2 == 0) & (c % 2 == 1)).to(torch.int64) - ((r % 2 == 1) & (c % 2 == 0)).to(torch.int64)
    r = r + swap
    c = c - swap
    return ((c // 2) * rows * 2 + r * 2 + c % 2).reshape(-1)


def _expected_groups(mt: ModuleTensors, k: int) -> int:
    args = mt.weights
    return 1 if args.strategy == "channel" else math.ceil(k / args.group_size)


def grouped_scale_perm(strategy: str, group_size: int | None, k: int) -> bool:
    """Whether the writer permuted scales with the grouped permutation.

    `pack_scales_24` tests `group_size < size_k` with size_k the row count of the *compressed,
    transposed* weight, K/2 (§5.12 step 7): K = 256 with group 128 keeps the identity.
    """
    return strategy == "group" and group_size is not None and group_size < k // 2


@register
class Marlin24Decoder:
    formats = ("marlin-24",)

    def describe(self, mt: ModuleTensors, fmt: str) -> ModuleInfo:
        args = mt.weights
        if args.type != "int" or args.num_bits not in (4, 8):
            raise InputError(f"{mt.name}: marlin-24 stores 4- or 8-bit int weights, the config says {args.num_bits}-bit {args.type}")
        if not args.symmetric:
            raise InputError(f"{mt.name}: marlin-24 stores symmetric weights only, the config says asymmetric")
        if args.strategy not in ("group", "channel"):
            raise InputError(f"{mt.name}: marlin-24 stores group or channel scales, the config says {args.strategy}")
        if mt.has("weight_g_idx"):
            raise InputError(f"tensor {mt.tensors['weight_g_idx']}: marlin-24 has no activation-order support")
        b = args.num_bits
        pf = 32 // b
        wp = mt.expect_dtype("weight_packed", "I32")
        sp = mt.expect_dtype("scale_packed", "F16")
        me = mt.expect_dtype("meta", "I16")
        wname, sname, mname = (mt.tensors[s] for s in ("weight_packed", "scale_packed", "meta"))
        if len(wp.shape) != 2 or wp.shape[0] == 0:
            raise InputError(f"tensor {wname}: expected a 2-D [K/32, {16 // pf}N] tensor, got {list(wp.shape)}")
        if len(sp.shape) != 2 or sp.shape[1] == 0:
            raise InputError(f"tensor {sname}: expected a 2-D [groups, N] tensor, got {list(sp.shape)}")
        k = 32 * wp.shape[0]
        n = sp.shape[1]
        if n % 64:
            raise InputError(f"tensor {sname}: N = {n} output features is not a multiple of 64, as marlin-24 requires")
        if wp.shape[1] * pf != 16 * n:
            raise InputError(
                f"tensor {wname}: shape {list(wp.shape)} does not fit N = {n} from {sname} "
                f"(expected [{k // 32}, {16 * n // pf}] for {b}-bit codes)"
            )
        if tuple(me.shape) != (k // 32, 2 * n):
            raise InputError(f"tensor {mname}: shape {list(me.shape)}, expected [{k // 32}, {2 * n}] for weight [{n}, {k}]")
        g = _expected_groups(mt, k)
        if sp.shape[0] != g:
            raise InputError(
                f"tensor {sname}: shape {list(sp.shape)} does not fit a {args.strategy} scheme "
                f"for a weight of shape [{n}, {k}] (expected [{g}, {n}])"
            )
        return ModuleInfo(
            name=mt.name,
            format=fmt,
            shape=(n, k),
            dtype=torch.float16,
            encoding=Encoding.INT,
            scheme=args.weight_scheme(),
            tensors=dict(mt.tensors),
            sparsity="2:4",
        )

    def decode(self, mt: ModuleTensors, info: ModuleInfo) -> QuantizedWeight:
        n, k = info.out_features, info.in_features
        b = info.scheme.num_bits

        def codes() -> torch.Tensor:
            kept = unpack_kept(mt.get("weight_packed"), b, n, k)
            meta = mt.get("meta")
            try:
                return expand_24(kept, meta, n, k)
            except ValueError as e:
                raise InputError(f"tensor {mt.tensors['meta']}: {e}") from None

        raw = load_scale(mt, "scale_packed")
        scale = unpermute_scales(raw, info.scheme.strategy, info.scheme.group_size, n, k)
        return QuantizedWeight(info=info, scale=scale, _codes=codes)


def unpack_kept(words: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """int32 `weight_packed` -> int8 `[N, K/2]`: the kept signed codes, in CUTLASS order along K."""
    rows = k // 32
    u = bitpack.unpack(words, bits, 16 * n, bitpack.WORDS)  # uint8 [K/32, 16N]
    u = u.reshape(rows, -1, CHUNK).index_select(-1, _inverse_weight_perm(bits))
    u = u.reshape(rows, n // TILE, TILE, TILE).transpose(1, 2).reshape(k // 2, n)
    return (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8).t()


def expand_24(kept: torch.Tensor, meta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(kept int8 [N, K/2], reordered int16 meta buffer) -> dense int8 [N, K], pruned codes 0."""
    cols = k // 16
    m = meta.reshape(-1).index_select(0, meta_offsets(n, cols)).reshape(n, cols).to(torch.int32)
    shifts = torch.arange(0, 16, 2, dtype=torch.int32)
    idx = ((m.unsqueeze(-1) >> shifts) & 3).to(torch.int64).reshape(n, k // 4, 2)
    if bool((idx[..., 0] == idx[..., 1]).any()):
        r, gq = (int(v) for v in torch.nonzero(idx[..., 0] == idx[..., 1])[0])
        raise ValueError(f"invalid 2:4 metadata: both kept values of row {r}, columns {4 * gq}..{4 * gq + 3} name one position")
    dense = torch.zeros(n, k // 4, 4, dtype=torch.int8)
    dense.scatter_(-1, idx, kept.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


def unpermute_scales(raw: torch.Tensor, strategy: str, group_size: int | None, n: int, k: int) -> torch.Tensor:
    """`scale_packed` [G, N] -> natural-order scales [N, G]."""
    g = raw.shape[0]
    if grouped_scale_perm(strategy, group_size, k):
        raw = raw.reshape(-1, SCALE_ROW).index_select(-1, _inverse_scale_perm()).reshape(g, n)
    return raw.t().contiguous()
