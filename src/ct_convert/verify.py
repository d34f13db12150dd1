"""Module-by-module comparison of a source checkpoint and a written output, both dequantized.

Integer modules are compared in the code domain first: when the output's unsigned codes, zero
points, scales and column groups equal the source's, (u - z) * s is the same number everywhere, so
the dequantized weights are equal without materializing either in float32 (4x the bytes, the
dominant cost of verification). Anything else, or any difference, is compared dequantized.
"""

from __future__ import annotations

import math
import threading
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from ct_convert.bands import Bands, pieces
from ct_convert.parallel import ordered_map
from ct_convert.qweight import Encoding, QuantizedWeight
from ct_convert.targets.reader_base import GroupCodes


@dataclass
class ModuleResult:
    module: str
    max_abs_error: float
    rel_error: float
    exact: bool
    ok: bool
    note: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def compare(reader, out_reader, atol: float | None = None, progress=lambda n: None, workers: int = 1) -> list[ModuleResult]:
    """Compare every source module with its output counterpart, `workers` modules at a time;
    exact unless `atol` is given.

    Each item is budgeted the working memory of the comparison it is expected to take: a reader may
    expect codes for some modules, a fraction of the float32 values of both sides; a carried tensor,
    itself and its output. An item compared further than that (codes that differ, compared as whole
    float weights; the error figures of any difference) goes beyond its budget, so such comparisons
    run one at a time. Carried tensors are compared beside the modules, not after them."""
    per_weight = getattr(out_reader, "bytes_per_weight", lambda module: out_reader.working_bytes_per_weight)
    beyond_budget = threading.Lock()

    def module(name: str) -> ModuleResult:
        source = reader.read(name)
        decoded = out_reader.decode(name)
        if decoded is not None and same_codes(source, decoded):
            return ModuleResult(name, 0.0, 0.0, True, True)
        del decoded
        budgeted = per_weight(name) >= out_reader.working_bytes_per_weight
        return _compare_dequantized(name, source, out_reader, atol, nullcontext() if budgeted else beyond_budget)

    def item(it: tuple[bool, str]) -> list[ModuleResult]:
        is_module, name = it
        return [module(name)] if is_module else _compare_carried(reader, out_reader, name, atol, beyond_budget)

    def cost(it: tuple[bool, str]) -> int:
        is_module, name = it
        if is_module:
            return per_weight(name) * math.prod(reader.modules[name].shape)
        return 2 * reader.tensor_meta(name).nbytes

    omits = getattr(out_reader, "omits", None)  # targets that leave modules out by design say which
    items = [(True, m) for m in reader.modules if omits is None or not omits(m)]
    items += [(False, t) for t in reader.passthrough() if not reader.is_quantization_param(t)]
    results = []
    for (is_module, name), found in zip(items, ordered_map(item, items, workers, cost=cost)):
        results.extend(found)
        if is_module:
            progress(reader.source_bytes(name))
    return results


def _compare_carried(reader, out_reader, name: str, atol: float | None, beyond_budget) -> list[ModuleResult]:
    """A carried tensor against its output, both read a band of rows at a time where the output
    reader can (a 1 GB embedding is never held twice); nothing when the target dropped or renamed it
    (targets may; their readers map the ones they keep). A target that stores a changed value
    (Gemma-3's 1 + w norms, a cut embedding) says which through `as_stored`, applied to the source.
    The error figures of a difference are computed inside `beyond_budget`."""
    banded = getattr(out_reader, "tensor_bands", None)
    got = banded(name) if banded is not None else out_reader.tensor(name)
    if got is None:
        return []
    stored = getattr(out_reader, "as_stored", None) or (lambda _, value: value)
    same_shape = tuple(reader.tensor_meta(name).shape) == tuple(got.shape)
    if same_shape and _banded_equal(reader, name, got, stored):
        return [ModuleResult(name, 0.0, 0.0, True, True)]
    ref, got = stored(name, reader.get(name)), torch.cat(list(pieces(got))) if isinstance(got, Bands) else got
    if not same_shape and _widened_equal(ref, got):  # rows the target keeps (a cut embedding), compared whole
        return [ModuleResult(name, 0.0, 0.0, True, True)]
    with beyond_budget:
        return [_diff(name, ref.to(got.dtype) if ref.is_floating_point() else ref, got, atol)]


def _banded_equal(reader, name: str, got: "torch.Tensor | Bands", stored) -> bool:
    """`got`, of the source tensor's shape, holds exactly source tensor `name` as the target stores
    it, converted to got's float dtype. Equal shapes mean no rows were cut, so `stored` is
    elementwise and applies band by band."""
    if not got.shape:
        return _widened_equal(stored(name, reader.get(name)), next(pieces(got)))
    return all(_widened_equal(stored(name, a), b) for a, b in _zip_rows(reader.bands(name), pieces(got)))


def _zip_rows(a: Iterator[torch.Tensor], b: Iterator[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of equally long row slices of two band sequences of the same tensor shape."""
    x = y = None
    while True:
        if x is None or not x.shape[0]:
            x = next(a, None)
        if y is None or not y.shape[0]:
            y = next(b, None)
        if x is None or y is None:
            return
        n = min(x.shape[0], y.shape[0])
        yield x[:n], y[:n]
        x, y = x[n:], y[n:]


def _widened_equal(ref: torch.Tensor, got: torch.Tensor) -> bool:
    """`got` holds exactly `ref`, converted to got's float dtype (bit for bit where dtypes match)."""
    if ref.dtype != got.dtype and ref.is_floating_point() and got.is_floating_point():
        ref = ref.to(got.dtype)
    return bitwise_equal(ref, got)


def _compare_dequantized(name: str, source: QuantizedWeight, out_reader, atol: float | None, whole) -> ModuleResult:
    """`whole`: entered around comparing the two weights whole (a lock where that is beyond budget)."""
    stored = getattr(out_reader, "stored_dense", None)
    bands = stored(name) if stored is not None else None
    if bands is not None and tuple(bands.shape) == tuple(source.shape):
        # a dense output, band by band against the source's bands: neither weight is held whole
        ref = source.dequantized_bands(bands.dtype)
        if all(bitwise_equal(a, b) for a, b in _zip_rows(pieces(ref), pieces(bands))):
            return ModuleResult(name, 0.0, 0.0, True, True)
    with whole:
        got = out_reader.dequantize(name)
        if got is None:
            return ModuleResult(name, float("inf"), float("inf"), False, False, "missing in output")
        return _diff(name, source.dequantize(got.dtype), got, atol)


def same_codes(source: QuantizedWeight, out: GroupCodes) -> bool:
    """True when an output holds exactly the source's integer weight; False when they differ or the
    source is not an integer weight of this shape (then compare dequantized)."""
    scheme = source.scheme
    if source.encoding is not Encoding.INT or len(source.shape) != 2 or scheme.strategy not in ("tensor", "channel", "group"):
        return False
    n, k = source.shape
    offset = 1 << (scheme.num_bits - 1)
    scales = source.group_scales()  # [N, G]
    zp = source.group_zero_points()
    zeros = None if zp is None else zp.to(torch.int16) + offset  # [N, G] unsigned; None: `offset` for all
    groups = out.scales.shape[0]
    if out.cols is None and groups != scales.shape[1]:
        # finer output groups (GGUF blocks of 32) over contiguous source groups: repeat the source's
        r = groups // scales.shape[1]
        uniform = source.num_groups * source.effective_group_size == k and source.has_trivial_g_idx()
        if r * scales.shape[1] != groups or k % groups or not uniform:
            return False
        scales = scales.repeat_interleave(r, dim=1)
        zeros = None if zeros is None else zeros.repeat_interleave(r, dim=1)
    elif groups > 1:
        cols = out.cols if out.cols is not None else torch.arange(k) // max(1, k // groups)
        if not torch.equal(cols.to(torch.int64), source.column_groups()):
            return False
    if tuple(out.scales.shape) != (scales.shape[1], n):
        return False
    if not torch.equal(out.scales.to(torch.float32), scales.t().to(torch.float32)):
        return False
    if not _same_zeros(out.zeros, zeros, offset, tuple(out.scales.shape)):
        return False
    packed = source.packed_stream if out.stream is not None else None
    if packed is not None and bitwise_equal(out.stream, packed):
        return True  # both are the same LSB-first b-bit stream of u along each row
    u = out.unpack()
    # u - 2^(b-1) modulo 256 is the signed code's two's-complement byte
    return tuple(u.shape) == (n, k) and bitwise_equal(u.sub_(offset), source.codes.view(torch.uint8))


def _same_zeros(out: torch.Tensor | int, source: torch.Tensor | None, offset: int, shape: tuple[int, int]) -> bool:
    """The output's zero points ([G, N], or one for all) equal the source's ([N, G], or None for
    `offset` everywhere)."""
    if isinstance(out, int):
        return out == offset if source is None else bool((source == out).all())
    if tuple(out.shape) != shape:
        return False
    if source is None:
        return bool((out == offset).all())
    return torch.equal(out.to(torch.int16), source.t())


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes; compared eight bytes at a time where the layout allows."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.contiguous(), b.contiguous()
    if a.numel() * a.element_size() % 8 == 0 and a.numel():
        try:
            return bool(torch.equal(a.reshape(-1).view(torch.int64), b.reshape(-1).view(torch.int64)))
        except RuntimeError:  # an unaligned storage offset: compare element by element
            pass
    return bool(torch.equal(a, b))


def _diff(name: str, ref: torch.Tensor, got: torch.Tensor, atol: float | None) -> ModuleResult:
    if tuple(ref.shape) != tuple(got.shape):
        return ModuleResult(name, float("inf"), float("inf"), False, False, f"shape {list(got.shape)} != {list(ref.shape)}")
    if bitwise_equal(ref, got):  # the common case, at memory speed
        return ModuleResult(name, 0.0, 0.0, True, True)
    if not ref.is_floating_point():
        exact = bool(torch.equal(ref, got))
        return ModuleResult(name, 0.0 if exact else float("inf"), 0.0 if exact else float("inf"), exact, exact)
    a = ref.to(torch.float32)
    b = got.to(torch.float32)
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = torch.where(both_nan, torch.zeros_like(a), (a - b).abs())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    exact = bool(((a == b) | both_nan).all())
    ok = exact if atol is None else max_abs <= atol
    return ModuleResult(name, max_abs, rel, exact, ok)
