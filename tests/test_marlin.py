"""Marlin tile layout (targets.md §1.2–§1.5): the library functions against the spec's test vectors,
the closed-form index formulas and the engines' semantics re-derived here; and the format (b) reader."""

from __future__ import annotations

import pytest
import torch

from conftest import equal_bits
from ct_convert import marlin_layout as ml
from ct_convert.targets.marlin.reader import unpack_marlin

pack_lib = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

SHAPES = [(16, 64), (32, 128), (128, 256), (48, 192), (256, 64), (64, 320)]


def hexwords(t: torch.Tensor) -> list[str]:
    return [f"{v & 0xFFFFFFFF:08x}" for v in t.tolist()]


def spec_pattern(k: int, n: int, mod: int) -> torch.Tensor:
    kk = torch.arange(k)[:, None]
    nn = torch.arange(n)[None, :]
    return (37 * kk + 11 * nn + (kk * nn) % 13) % mod


def closed_form(u: torch.Tensor, bits: int) -> torch.Tensor:
    """§1.2 closed form, word by word: int64 words [K/16, N*bits/2]."""
    k, n = u.shape
    u = u.to(torch.int64)
    out = torch.zeros(k // 16, n * bits // 2, dtype=torch.int64)
    for kt in range(k // 16):
        for nt in range(n // 64):
            for w in range(4):
                for t in range(32):
                    k0, n0 = 16 * kt + 2 * (t % 4), 64 * nt + 16 * w + t // 4
                    if bits == 4:
                        cells = [(0, 0), (8, 0), (0, 8), (8, 8), (1, 0), (9, 0), (1, 8), (9, 8)]
                        word = sum(int(u[k0 + dk, n0 + dn]) << (4 * i) for i, (dk, dn) in enumerate(cells))
                        out[kt, 128 * nt + 4 * t + w] = word
                    else:
                        rows = (0, 8, 1, 9)
                        a = sum(int(u[k0 + dk, n0]) << (8 * i) for i, dk in enumerate(rows))
                        b = sum(int(u[k0 + dk, n0 + 8]) << (8 * i) for i, dk in enumerate(rows))
                        out[kt, 256 * nt + 8 * t + 2 * w] = a
                        out[kt, 256 * nt + 8 * t + 2 * w + 1] = b
    return out


def as_u32(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


def test_spec_test_vectors():
    w4 = ml.marlin_weights(spec_pattern(16, 64, 16), 4)
    assert w4.shape == (1, 128) and w4.dtype == torch.int32
    assert hexwords(w4[0, :8]) == "c5d5c880 d8e8a830 eefb8810 f10e68f0 927fc52a 3ee80b60 aa8444a6 43f0baef".split()
    assert hexwords(w4[0, 124:]) == "499adfae a1f507d3 3c803c3b 94e86460".split()
    w8 = ml.marlin_weights(spec_pattern(16, 64, 256), 8)
    assert w8.shape == (1, 256)
    assert hexwords(w8[0, :4]) == "4d252800 ac858c58 fed8e3b0 5d383a08".split()


def test_perm_sanity_values():
    assert ml.weight_perm(4)[:16].tolist() == [0, 128, 8, 136, 16, 144, 24, 152, 256, 384, 264, 392, 272, 400, 280, 408]
    assert ml.weight_perm(8)[:16].tolist() == [0, 128, 16, 144, 8, 136, 24, 152, 256, 384, 272, 400, 264, 392, 280, 408]
    for bits in (4, 8):
        assert sorted(ml.weight_perm(bits).tolist()) == list(range(1024))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_tile_construction_matches_closed_form(bits, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000 + bits)
    u = torch.randint(0, 1 << bits, shape, generator=gen)
    assert equal_bits(as_u32(ml.marlin_weights(u, bits)), closed_form(u, bits))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_gptq_marlin_repack_from_library_packing(bits, shape):
    """Input = compressed-tensors `weight_packed` transposed (the GPTQ qweight, §0.2)."""
    k, n = shape
    gen = torch.Generator().manual_seed(k * 7 + n + bits)
    signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=gen, dtype=torch.int8)
    qweight = pack_lib.pack_to_int32(signed, bits).t().contiguous()
    got = ml.gptq_marlin_repack(qweight, None, k, n, bits)
    u = signed.to(torch.int64).t() + (1 << (bits - 1))
    assert equal_bits(got, ml.marlin_weights(u, bits))
    if k * n <= 128 * 256:
        assert equal_bits(as_u32(got), closed_form(u, bits))


@pytest.mark.parametrize("shape", SHAPES)
def test_from_stream_equals_the_tile_construction(shape):
    """The writer's path from compressed-tensors `weight_packed` (row streams) to Marlin words."""
    k, n = shape
    gen = torch.Generator().manual_seed(k * 3 + n)
    signed = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    got = ml.marlin_weights_from_stream(pack_lib.pack_to_int32(signed, 4))
    u = signed.to(torch.int64).t() + 8
    assert equal_bits(got, ml.marlin_weights(u, 4))
    if k * n <= 128 * 256:
        assert equal_bits(as_u32(got), closed_form(u, 4))


def test_from_stream_in_bands_equals_the_closed_form(monkeypatch):
    """Five 64-row tiles in bands of two (the last band short) give the closed form's words."""
    from ct_convert import bitpack

    monkeypatch.setattr(bitpack, "BAND_BYTES", 2 * 64 * 8 * 4)
    signed = torch.randint(-8, 8, (320, 64), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    got = ml.marlin_weights_from_stream(pack_lib.pack_to_int32(signed, 4))
    assert equal_bits(as_u32(got), closed_form(signed.to(torch.int64).t() + 8, 4))


@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_repack_equals_reference_on_permuted_rows(bits):
    k, n, gs = 256, 128, 64
    gen = torch.Generator().manual_seed(3)
    u = torch.randint(0, 1 << bits, (k, n), generator=gen)
    g_idx = (torch.randperm(k, generator=gen) // gs).to(torch.int32)
    g_sorted, sort_idx = ml.sort_g_idx(g_idx)
    assert equal_bits(g_sorted, torch.sort(g_idx).values)
    assert equal_bits(g_idx[sort_idx.long()], g_sorted)
    qweight = pack_lib.pack_to_int32((u - (1 << (bits - 1))).t().to(torch.int8), bits).t().contiguous()
    got = ml.gptq_marlin_repack(qweight, sort_idx, k, n, bits)
    assert equal_bits(as_u32(got), closed_form(u[sort_idx.long()], bits))


def test_awq_marlin_repack_equals_gptq_marlin_repack():
    k, n = 128, 192
    gen = torch.Generator().manual_seed(5)
    u = torch.randint(0, 16, (k, n), generator=gen)
    # AutoAWQ GEMM packing, written out: nibble i of word c holds column 8c + [0,2,4,6,1,3,5,7][i]
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    awq = torch.zeros(k, n // 8, dtype=torch.int64)
    for c in range(n // 8):
        for i in range(8):
            awq[:, c] |= u[:, 8 * c + order[i]] << (4 * i)
    awq = torch.where(awq >= 2**31, awq - 2**32, awq).to(torch.int32)
    assert equal_bits(ml.awq_marlin_repack(awq, k, n, 4), ml.marlin_weights(u, 4))


def test_scale_permutations_match_spec_lists():
    assert ml.scale_perm().tolist() == [i + 8 * j for i in range(8) for j in range(8)]
    assert ml.scale_perm_single().tolist() == [
        0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27,
        4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31,
    ]  # fmt: skip


def test_marlin_permute_scales_grouped_single_and_gs_equal_k():
    n = 128
    s = torch.arange(3 * n, dtype=torch.float32).reshape(3, n)
    got = ml.marlin_permute_scales(s, 384, n, 128)
    for p in range(n):  # grouped: new 8i+j of each 64-block takes old i+8j
        blk, q = divmod(p, 64)
        assert equal_bits(got[:, p], s[:, 64 * blk + q // 8 + 8 * (q % 8)])
    one = s[:1]
    single = [0, 1, 8, 9, 16, 17, 24, 25]
    expect = torch.stack([one[0, 32 * (p // 32) + 2 * ((p % 32) // 8) + single[p % 8]] for p in range(n)])
    assert equal_bits(ml.marlin_permute_scales(one, 128, n, -1)[0], expect)
    assert equal_bits(ml.marlin_permute_scales(one, 128, n, 128)[0], expect)  # gs == K: channel-wise


@pytest.mark.parametrize("g,n", [(1, 64), (3, 128), (2, 256)])
def test_marlin_zero_points_closed_form(g, n):
    gen = torch.Generator().manual_seed(g * n)
    z = torch.randint(0, 16, (g, n), generator=gen)
    got = as_u32(ml.marlin_zero_points(z, 4))
    il = [0, 2, 4, 6, 1, 3, 5, 7]

    def src(p):
        return 64 * (p // 64) + (p % 64) // 8 + 8 * (p % 8)

    for row in range(g):
        for j in range(n // 8):
            word = sum(int(z[row, src(8 * j + il[t])]) << (4 * t) for t in range(8))
            assert int(got[row, j]) == word
    # AWQ qzeros of the same zeros, re-packed through awq_to_marlin_zero_points
    awq = torch.zeros(g, n // 8, dtype=torch.int64)
    for c in range(n // 8):
        for i in range(8):
            awq[:, c] |= z[:, 8 * c + il[i]] << (4 * i)
    awq = torch.where(awq >= 2**31, awq - 2**32, awq).to(torch.int32)
    assert equal_bits(as_u32(ml.awq_to_marlin_zero_points(awq, 128, n, 4)), got)


@pytest.mark.parametrize("shape", [(128, 256), (256, 512), (16, 64)])
def test_reader_inverts_layout(shape):
    gen = torch.Generator().manual_seed(shape[0])
    u = torch.randint(0, 16, shape, generator=gen)
    assert equal_bits(unpack_marlin(ml.marlin_weights(u, 4)), u.to(torch.uint8))


def test_pack_lsb_matches_library_packing():
    gen = torch.Generator().manual_seed(9)
    for bits in (2, 4, 8):
        signed = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, 64), generator=gen, dtype=torch.int8)
        u = (signed.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        assert equal_bits(ml.pack_lsb(u, bits), pack_lib.pack_to_int32(signed, bits))


def test_shape_errors():
    with pytest.raises(ValueError):
        ml.marlin_weights(torch.zeros(16, 32, dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        ml.marlin_weights(torch.zeros(8, 64, dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        ml.weight_perm(3)
    with pytest.raises(ValueError):
        ml.marlin_weights_from_stream(torch.zeros(64, 3, dtype=torch.int32))


def test_pack_lsb_on_a_transposed_single_row():
    """[N, 1] zero points transposed to [1, N] have odd strides; the packed words must not care."""
    z = torch.arange(16, dtype=torch.uint8).reshape(16, 1) % 16
    assert ml.pack_lsb(z.t(), 4).tolist() == [[0x76543210, -0x01234568]]
