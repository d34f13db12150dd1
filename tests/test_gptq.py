"""GPTQ writer and reader (targets.md §3) against AutoGPTQ's packing re-derived here, the
compressed-tensors library's own `pack_to_int32` (§0.2 identities) and hand-computed zero words."""

from __future__ import annotations

import pytest
import torch

from conftest import equal_bits
from ct_convert.errors import UnsupportedConversion
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight, WeightScheme
from ct_convert.targets import writer_for
from ct_convert.targets.writer_base import RepackOptions

pack_lib = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def module(codes: torch.Tensor, scale: torch.Tensor, bits: int, gs: int | None, zp=None, g_idx=None) -> QuantizedWeight:
    n, k = codes.shape
    scheme = WeightScheme(bits, "int", zp is None, "group" if gs else "channel", gs, actorder="group" if g_idx is not None else None)
    tensors = {"weight_g_idx": "x"} if g_idx is not None else {}
    info = ModuleInfo("m", "pack-quantized", (n, k), scale.dtype, Encoding.INT, scheme, tensors=tensors, layout="stream")
    return QuantizedWeight(info=info, scale=scale, zero_point=zp, g_idx=g_idx, _codes=codes)


def autogptq_pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ QuantLinear.pack for 2/4/8 bits: [K, N] codes -> [K*b/32, N], row by row."""
    k, n = u.shape
    pf = 32 // bits
    q = torch.zeros(k // pf, n, dtype=torch.int64)
    for row in range(k // pf):
        for j in range(pf):
            q[row] |= u[row * pf + j].to(torch.int64) << (bits * j)
    return q


def stream_pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """A dense LSB-first stream along dim 0 (AutoGPTQ's 3-bit loop), via Python integers."""
    k, n = u.shape
    words = k * bits // 32
    out = torch.zeros(words, n, dtype=torch.int64)
    for col in range(n):
        acc = sum(int(u[i, col]) << (bits * i) for i in range(k))
        for r in range(words):
            out[r, col] = (acc >> (32 * r)) & 0xFFFFFFFF
    return out


def u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


def random_module(n, k, bits, gs, seed, asym=False, scale_dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (n, k), generator=gen, dtype=torch.int8)
    g = k // gs if gs else 1
    scale = (torch.rand(n, g, generator=gen) * 0.01 + 0.001).to(scale_dtype)
    zp = torch.randint(-half, half, (n, g), generator=gen, dtype=torch.int8) if asym else None
    return module(codes, scale, bits, gs, zp)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,gs", [(64, 128, 32), (32, 256, 128), (96, 64, None)])
def test_qweight_is_weight_packed_transposed_and_autogptq(bits, n, k, gs):
    qw = random_module(n, k, bits, gs, seed=bits * 100 + n + k)
    out = writer_for("gptq").convert(qw, RepackOptions("gptq"))
    weight_packed = pack_lib.pack_to_int32(qw.codes, bits)  # the library's own packing, [N, K*b/32]
    assert equal_bits(out["qweight"], weight_packed.t().contiguous())
    u = qw.codes.to(torch.int64).t() + (1 << (bits - 1))
    ref = stream_pack(u, bits) if bits == 3 else autogptq_pack(u, bits)
    assert equal_bits(u32(out["qweight"]), ref)
    assert out["qweight"].shape == (k * bits // 32, n)
    assert equal_bits(out["g_idx"], (torch.arange(k) // (gs or k)).to(torch.int32))
    assert out["scales"].dtype == torch.float16 and equal_bits(out["scales"].to(torch.bfloat16), qw.scale.t())


@pytest.mark.parametrize("bits,word", [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_v1_qzeros_words(bits, word):
    out = writer_for("gptq").convert(random_module(64, 128, bits, 64, seed=1), RepackOptions("gptq"))
    assert out["qzeros"].shape == (2, 64 * bits // 32)
    assert bool((u32(out["qzeros"]) == word).all())


def test_symmetric_v1_qzeros_3bit_stream():
    out = writer_for("gptq").convert(random_module(32, 64, 3, 32, seed=2), RepackOptions("gptq"))
    # zero - 1 = 3 = 0b011 repeated every 3 bits over 96 bits: 0xDB6DB6DB, 0x6DB6DB6D, 0xB6DB6DB6
    assert u32(out["qzeros"]).tolist() == [[0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D]] * 2


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_v2_qzeros_are_library_zero_points_transposed(bits):
    qw = random_module(64, 128, bits, 32, seed=bits, asym=True)
    out = writer_for("gptq").convert(qw, RepackOptions("gptq", gptq_format="v2"))
    weight_zero_point = pack_lib.pack_to_int32(qw.zero_point, bits, packed_dim=0)  # [N*b/32, G]
    assert equal_bits(out["qzeros"], weight_zero_point.t().contiguous())


def test_v1_subtracts_one_and_refuses_unsigned_zero():
    qw = random_module(64, 128, 4, 64, seed=4, asym=True)
    qw.zero_point.clamp_(min=-7)
    v1 = writer_for("gptq").convert(qw, RepackOptions("gptq"))
    v2 = writer_for("gptq").convert(qw, RepackOptions("gptq", gptq_format="v2"))
    assert equal_bits(u32(v2["qzeros"]) - u32(v1["qzeros"]), torch.full_like(u32(v1["qzeros"]), 0x11111111))
    qw.zero_point[3, 1] = -8
    with pytest.raises(UnsupportedConversion, match="gptq-format v2|GPTQ v1"):
        writer_for("gptq").convert(qw, RepackOptions("gptq"))
    writer_for("gptq").convert(qw, RepackOptions("gptq", gptq_format="v2"))


def test_act_order_g_idx_is_kept():
    qw = random_module(32, 256, 4, 128, seed=6)
    g_idx = (torch.randperm(256, generator=torch.Generator().manual_seed(1)) // 128).to(torch.int32)
    qw = module(qw.codes, qw.scale, 4, 128, g_idx=g_idx)
    out = writer_for("gptq").convert(qw, RepackOptions("gptq"))
    assert equal_bits(out["g_idx"], g_idx)


def test_scale_not_exact_in_fp16_is_refused():
    qw = random_module(32, 64, 4, 32, seed=7)
    qw.scale[0, 0] = 2.0**-30  # a bf16 value below fp16's smallest subnormal
    with pytest.raises(UnsupportedConversion, match="fp16"):
        writer_for("gptq").convert(qw, RepackOptions("gptq"))


def test_header_refusals():
    w = writer_for("gptq")
    opts = RepackOptions("gptq")
    ok = ModuleInfo("m", "pack-quantized", (64, 128), torch.bfloat16, Encoding.INT, WeightScheme(4, "int", True, "group", 32))
    assert w.refusal(ok, opts) is None
    fp = ModuleInfo("m", "float-quantized", (64, 128), torch.bfloat16, Encoding.FP8, WeightScheme(8, "float", True, "channel"))
    assert "integer" in w.refusal(fp, opts)
    odd = ModuleInfo("m", "pack-quantized", (64, 100), torch.bfloat16, Encoding.INT, WeightScheme(3, "int", True, "channel"))
    assert "K=100" in w.refusal(odd, opts)
    six = ModuleInfo("m", "pack-quantized", (64, 128), torch.bfloat16, Encoding.INT, WeightScheme(6, "int", True, "channel"))
    assert "6-bit" in w.refusal(six, opts)
