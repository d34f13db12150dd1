"""AWQ writer and reader (targets.md §2) against AutoAWQ's packing and `dequantize_gemm` order,
re-derived here, and the codes as the compressed-tensors library unpacks them."""

from __future__ import annotations

import pytest
import torch

from conftest import equal_bits
from ct_convert.errors import UnsupportedConversion
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight, WeightScheme
from ct_convert.targets.awq.reader import unpack_awq
from ct_convert.targets import writer_for
from ct_convert.targets.writer_base import RepackOptions

ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """WQLinear_GEMM.from_linear's loop: [R, N] codes -> [R, N/8] words (unsigned, int64)."""
    r, n = intweight.shape
    q = torch.zeros(r, n // 8, dtype=torch.int64)
    for col in range(n // 8):
        for i in range(8):
            q[:, col] |= intweight[:, col * 8 + ORDER_MAP[i]].to(torch.int64) << (i * 4)
    return q


def autoawq_unpack(q: torch.Tensor) -> torch.Tensor:
    """unpack_awq + reverse_awq_order: shift out nibbles, then gather columns with [0,4,1,5,2,6,3,7]."""
    shifts = torch.arange(0, 32, 4)
    iw = (q.to(torch.int64)[:, :, None] >> shifts[None, None, :]).reshape(q.shape[0], -1)
    rev = torch.arange(iw.shape[-1]).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    return iw[:, rev] & 0xF


def module(n, k, gs, seed, asym):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    g = k // gs
    scale = (torch.rand(n, g, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    zp = torch.randint(-8, 8, (n, g), generator=gen, dtype=torch.int8) if asym else None
    info = ModuleInfo("m", "pack-quantized", (n, k), torch.bfloat16, Encoding.INT, WeightScheme(4, "int", not asym, "group", gs))
    return QuantizedWeight(info=info, scale=scale, zero_point=zp, _codes=codes)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("n,k,gs", [(8, 32, 32), (64, 128, 64), (136, 256, 128), (256, 384, 128)])
def test_matches_autoawq_packing_and_dequant(n, k, gs, asym):
    qw = module(n, k, gs, seed=n + k + asym, asym=asym)
    out = writer_for("awq").convert(qw, RepackOptions("awq"))
    u = qw.codes.to(torch.int64).t() + 8  # [K, N]
    z = (qw.zero_point.to(torch.int64).t() + 8) if asym else torch.full((k // gs, n), 8)
    assert out["qweight"].shape == (k, n // 8) and out["qzeros"].shape == (k // gs, n // 8)
    assert equal_bits(out["qweight"].to(torch.int64) & 0xFFFFFFFF, autoawq_pack(u))
    assert equal_bits(out["qzeros"].to(torch.int64) & 0xFFFFFFFF, autoawq_pack(z))
    assert equal_bits(autoawq_unpack(out["qweight"]), u)
    assert equal_bits(unpack_awq(out["qweight"]), u.to(torch.uint8))  # the output reader's unpacking
    rows = torch.arange(k) // gs
    w = (u - z[rows]).to(torch.float32) * out["scales"].to(torch.float32)[rows]
    assert equal_bits(w.t(), qw.dequantize(torch.float32))


def test_symmetric_zero_words_are_eight():
    out = writer_for("awq").convert(module(64, 128, 128, 1, False), RepackOptions("awq"))
    assert bool((out["qzeros"] == 0x88888888 - 2**32).all())


def test_header_refusals():
    w = writer_for("awq")
    opts = RepackOptions("awq")

    def info(bits=4, strategy="group", gs=128, shape=(64, 256), actorder=None):
        return ModuleInfo("m", "pack-quantized", shape, torch.bfloat16, Encoding.INT,
                          WeightScheme(bits, "int", True, strategy, gs, actorder=actorder))

    assert w.refusal(info(), opts) is None
    assert "8-bit" in w.refusal(info(bits=8), opts)
    assert "act-order" in w.refusal(info(actorder="group"), opts)
    assert "channel" in w.refusal(info(strategy="channel", gs=None), opts)
    assert "multiple of the group size" in w.refusal(info(shape=(64, 192)), opts)
    assert "multiple of 8" in w.refusal(info(shape=(60, 256)), opts)


def test_non_identity_g_idx_is_refused_at_data_level():
    qw = module(64, 256, 128, 3, False)
    qw.g_idx = (torch.randperm(256, generator=torch.Generator().manual_seed(0)) // 128).to(torch.int32)
    with pytest.raises(UnsupportedConversion, match="act-order"):
        writer_for("awq").convert(qw, RepackOptions("awq"))
    qw.g_idx = (torch.arange(256) // 128).to(torch.int32)
    writer_for("awq").convert(qw, RepackOptions("awq"))


@pytest.mark.parametrize("n,k", [(8, 8), (64, 128), (136, 256), (1024, 64)])
def test_nibble_transpose_of_library_packed_words_equals_the_unpacked_path(n, k):
    """The bit-parallel path (no unpacking) against the byte path tested above on AutoAWQ's order."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from ct_convert.targets.awq.writer import pack_awq, transpose_awq

    q = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(n + k), dtype=torch.int8)
    words = pack_to_int32(q, 4)
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    assert equal_bits(transpose_awq(words), pack_awq(u.t()))
