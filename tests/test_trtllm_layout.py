"""TensorRT-LLM mixed-GEMM layout (targets.md §4.7): spec test vectors, an element-by-element
re-derivation written as scalar index arithmetic, and the output reader's inverse."""

from __future__ import annotations

import pytest
import torch

from conftest import equal_bits
from ct_convert.targets.trtllm_legacy.reader import undo_mixed_gemm
from ct_convert.targets.int4_rows import pack as pack_int4_rows
from ct_convert.targets.trtllm_legacy.mixed_gemm import preprocess_weights_for_mixed_gemm


def spec_pattern(k: int, n: int) -> torch.Tensor:
    kk = torch.arange(k).reshape(-1, 1)
    nn = torch.arange(n).reshape(1, -1)
    return 37 * kk + 11 * nn + (kk * nn) % 13


def hexbytes(t: torch.Tensor, start: int, stop: int) -> str:
    return " ".join(f"{b:02x}" for b in t.contiguous().view(torch.uint8).reshape(-1)[start:stop].tolist())


def test_spec_vectors_int4():
    s = (spec_pattern(128, 64) % 16 - 8).to(torch.int8)
    sm80 = preprocess_weights_for_mixed_gemm(s, 4, 80)
    sm90 = preprocess_weights_for_mixed_gemm(s, 4, 90)
    assert sm80.shape == (128, 32) and sm80.dtype == torch.int8
    assert hexbytes(sm80, 0, 8) == "80 80 d5 d5 2a 2a 7f 7f"
    assert hexbytes(sm80, 32, 40) == "bb ee 11 44 77 da dd 30"
    assert hexbytes(sm90, 32, 40) == "80 80 d5 d5 2a 2a 7f 7f"
    # first difference between the two layouts is at byte 32
    a, b = sm80.view(torch.uint8).reshape(-1), sm90.view(torch.uint8).reshape(-1)
    assert equal_bits(a[:32], b[:32]) and not torch.equal(a[32:40], b[32:40])


def test_spec_vector_int8():
    s = (spec_pattern(64, 64) % 256 - 128).to(torch.int8)
    out = preprocess_weights_for_mixed_gemm(s, 8, 80)
    assert out.shape == (64, 64)
    assert hexbytes(out, 0, 8) == "00 28 25 4d 4a 72 6f 97"


# -- an independent derivation: for every output element, the (k, n) it holds ------------------
ROWS4 = [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27, 4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31]
ROWS8 = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]


def reference_bytes(s: torch.Tensor, bits: int, sm: int) -> bytes:
    """Scalar re-derivation of §4.7: element p of the output stream, walked back through each step."""
    k, n = s.shape
    vals = s.tolist()
    rows = ROWS4 if bits == 4 else ROWS8
    reg = [0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3]
    interleave = 16 // bits if sm in (80, 89, 100) else 1
    elems = []
    for p in range(k * n):
        q = (p // len(reg)) * len(reg) + reg[p % len(reg)]
        if interleave > 1:
            tiles = k // 64
            a, rest = divmod(q, tiles * interleave * 64)
            c, rest = divmod(rest, interleave * 64)
            i, e = divmod(rest, 64)
            col, row = a * interleave + i, c * 64 + e
        else:
            col, row = divmod(q, k)
        src_row = (row // len(rows)) * len(rows) + rows[row % len(rows)]
        v = vals[src_row][col]
        elems.append((v + 8) % 16 if bits == 4 else (v + 128) % 256)
    if bits == 8:
        return bytes(elems)
    return bytes(elems[j] | (elems[j + 1] << 4) for j in range(0, len(elems), 2))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sm", [80, 89, 90, 100])
@pytest.mark.parametrize("shape", [(64, 16), (128, 64), (192, 40)])
def test_preprocess_matches_scalar_derivation(bits, sm, shape):
    k, n = shape
    if n % (16 // bits):
        pytest.skip("N must be a multiple of the interleave")
    g = torch.Generator().manual_seed(k * 1000 + n + bits + sm)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    s = torch.randint(lo, hi, (k, n), generator=g, dtype=torch.int8)
    got = preprocess_weights_for_mixed_gemm(s, bits, sm)
    assert got.shape == (k, n * bits // 8)
    assert got.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() == reference_bytes(s, bits, sm)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sm", [80, 90])
def test_reader_undoes_the_layout(bits, sm):
    k, n = 256, 96
    g = torch.Generator().manual_seed(bits + sm)
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    s = torch.randint(lo, hi, (k, n), generator=g, dtype=torch.int8)
    assert equal_bits(undo_mixed_gemm(preprocess_weights_for_mixed_gemm(s, bits, sm), k, n, bits, sm), s)


def test_sm_layouts_differ_and_are_not_interchangeable():
    s = torch.randint(-8, 8, (128, 64), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
    b80 = preprocess_weights_for_mixed_gemm(s, 4, 80)
    assert equal_bits(b80, preprocess_weights_for_mixed_gemm(s, 4, 100))  # Blackwell 2-D weights use sm80
    assert equal_bits(b80, preprocess_weights_for_mixed_gemm(s, 4, 89))
    assert not torch.equal(b80, preprocess_weights_for_mixed_gemm(s, 4, 90))
    assert not torch.equal(undo_mixed_gemm(b80, 128, 64, 4, 90), s)


def test_modelopt_int4_packing_two_channels_per_byte():
    s = torch.tensor([[-8, 7, 0], [1, -1, 5], [3, 2, -3], [-4, 6, 4]], dtype=torch.int8)  # [N=4, K=3]
    got = pack_int4_rows(s)
    # byte (j, k) = s[2j, k] & 0xF | s[2j+1, k] << 4, hand-computed
    assert got.tolist() == [[0x18, 0xF7, 0x50], [0xC3, 0x62, 0x4D]]
