"""Block encoders: bytes checked by hand (nibble order of gguf.md §2.1) and values read back with
gguf-py's dequantizers against exact values computed in float64 from the codes."""

import gguf
import numpy as np
import pytest
import torch

from conftest import equal_bits, positive_zeros
from ct_convert import floatcodes
from ct_convert.targets.gguf import blocks

T = gguf.GGMLQuantizationType


def deq(rows: torch.Tensor, qtype) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(rows.numpy(), qtype))


def test_q4_0_bytes_by_hand():
    # one block, codes -8..7 twice: element j low nibble, j+16 high nibble of byte j
    codes = torch.tensor([list(range(-8, 8)) * 2], dtype=torch.int8)
    codes[0, 16:] = torch.arange(7, -9, -1)
    out = blocks.q4_0(codes, torch.tensor([[0.5]]))
    assert out.shape == (1, 18)
    assert bytes(out[0, :2].tolist()) == np.float16(0.5).tobytes()
    for j in range(16):
        lo, hi = int(codes[0, j]) + 8, int(codes[0, j + 16]) + 8
        assert int(out[0, 2 + j]) == lo | (hi << 4)
    assert int(out[0, 2]) == 0xF0  # -8 (nibble 0) low, 7 (nibble 15) high


def test_a_byte_copy_of_ct_packing_is_caught():
    """compressed-tensors packs element 2i low / 2i+1 high; copying its bytes into Q4_0 scrambles."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (4, 64), generator=g, dtype=torch.int8)
    d = torch.full((4, 2), 0.25)
    ours = blocks.q4_0(codes, d)
    ct_bytes = pack_to_int32(codes, 4).contiguous().view(torch.uint8).reshape(4, 2, 16)
    copied = torch.cat([ours.reshape(4, 2, 18)[..., :2], ct_bytes], -1).reshape(4, 36)
    exact = codes.double() * 0.25
    assert equal_bits(deq(ours, T.Q4_0).double(), exact)
    assert not torch.equal(deq(copied, T.Q4_0).double(), exact)


def _case(seed, n, k, lo, hi):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int16)
    codes[0, :3] = lo  # the most negative code always occurs
    scales = torch.randn(n, k // 32, generator=g).to(torch.bfloat16).abs() + 0.01
    return codes, scales


@pytest.mark.parametrize("n,k", [(1, 32), (3, 96), (17, 256), (64, 128)])
def test_q4_0_random_exact(n, k):
    codes, d = _case(n * k, n, k, -8, 7)
    got = deq(blocks.q4_0(codes.to(torch.int8), d), T.Q4_0)
    exact = codes.double() * d.double().repeat_interleave(32, dim=1)
    assert equal_bits(got.double(), exact)


@pytest.mark.parametrize("n,k", [(1, 32), (3, 96), (17, 256), (64, 128)])
def test_q4_0_from_packed_streams(n, k):
    """The writer's path from compressed-tensors `weight_packed` (the library packs) to Q4_0 bytes."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes, d = _case(n * k + 1, n, k, -8, 7)
    stream = pack_to_int32(codes.to(torch.int8), 4)
    got = blocks.q4_0_from_stream(stream, d)
    assert equal_bits(got, blocks.q4_0(codes.to(torch.int8), d))
    exact = codes.double() * d.double().repeat_interleave(32, dim=1)
    assert equal_bits(deq(got, T.Q4_0).double(), exact)
    stacked = blocks.q4_0_from_stream(stream.reshape(1, n, -1), d.reshape(1, n, -1))
    assert equal_bits(stacked.reshape(n, -1), got)


@pytest.mark.parametrize("n,k", [(1, 32), (5, 160), (32, 256)])
def test_q5_0_asymmetric_exact(n, k):
    g = torch.Generator().manual_seed(k)
    u = torch.randint(0, 16, (n, k), generator=g)
    z = torch.randint(0, 16, (n, k // 32), generator=g)
    z[0, 0], u[0, :32] = 15, 0  # q - zp = -15 and, below, +15
    z[-1, -1], u[-1, -32:] = 0, 15
    diff = u - z.repeat_interleave(32, dim=1)
    d = (torch.rand(n, k // 32, generator=g) + 0.001).to(torch.bfloat16)
    got = deq(blocks.q5_0(diff, d), T.Q5_0)
    assert equal_bits(got.double(), diff.double() * d.double().repeat_interleave(32, dim=1))


@pytest.mark.parametrize("n,k", [(2, 32), (9, 320)])
def test_q8_0_exact_including_minus_128(n, k):
    codes, d = _case(k, n, k, -128, 127)
    got = deq(blocks.q8_0(codes, d), T.Q8_0)
    assert (codes == -128).any()
    assert equal_bits(got.double(), codes.double() * d.double().repeat_interleave(32, dim=1))


def test_q8_0_holds_asymmetric_int4():
    g = torch.Generator().manual_seed(3)
    diff = torch.randint(-15, 16, (4, 64), generator=g)
    d = torch.full((4, 2), 0.125)
    assert equal_bits(deq(blocks.q8_0(diff, d), T.Q8_0).double(), diff.double() * 0.125)


@pytest.mark.parametrize("n,k", [(1, 32), (6, 192)])
def test_mxfp4_exact(n, k):
    g = torch.Generator().manual_seed(n)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    e = torch.randint(110, 140, (n, k // 32), generator=g, dtype=torch.uint8)
    rows = blocks.mxfp4(codes, e)
    assert rows.shape == (n, k // 32 * 17)
    assert equal_bits(rows.reshape(n, -1, 17)[..., 0], e)
    value = floatcodes.fp4_to_float(codes).double() * torch.pow(2.0, e.double() - 127).repeat_interleave(32, dim=1)
    assert equal_bits(deq(rows, T.MXFP4).double(), positive_zeros(value))  # ggml's E2M1 table has no -0


def test_nvfp4_block_part_exact():
    g = torch.Generator().manual_seed(5)
    n, k = 3, 128
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s = (torch.rand(n, k // 16, generator=g) * 400 + 0.01).to(torch.float8_e4m3fn)
    rows = blocks.nvfp4(codes, s.view(torch.uint8))
    assert rows.shape == (n, k // 64 * 36)
    # sub-block s uses bytes 8s..8s+7 with element 16s+j low and 16s+j+8 high
    b = rows.reshape(n, -1, 36)
    assert int(b[0, 0, 4]) == int(codes[0, 0]) | (int(codes[0, 8]) << 4)
    assert int(b[0, 0, 4 + 8]) == int(codes[0, 16]) | (int(codes[0, 24]) << 4)
    value = floatcodes.fp4_to_float(codes).double() * s.double().repeat_interleave(16, dim=1)
    assert equal_bits(deq(rows, T.NVFP4).double(), positive_zeros(value))  # ggml's E2M1 table has no -0


def test_leading_expert_dimension():
    codes, d = _case(1, 8, 64, -8, 7)
    stacked = blocks.q4_0(codes.reshape(2, 4, 64).to(torch.int8), d.reshape(2, 4, 2))
    assert equal_bits(stacked.reshape(8, -1), blocks.q4_0(codes.to(torch.int8), d))
