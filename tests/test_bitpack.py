import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from conftest import equal_bits
from ct_convert import bitpack


def words(t):
    return [int(w) & 0xFFFFFFFF for w in t.reshape(-1).tolist()]


def test_spec_worked_examples():
    # compressed-tensors.md §5.3, pack_to_int32 0.20
    int4 = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -1, 0]], dtype=torch.int16)
    assert words(bitpack.pack((int4 + 8).to(torch.uint8), 4)) == [0xFEDCBA98, 0x00008710]
    int8 = torch.tensor([[1, 2, -1, -128, 127]], dtype=torch.int16)
    assert words(bitpack.pack((int8 + 128).to(torch.uint8), 8)) == [0x007F8281, 0x000000FF]
    int2 = torch.tensor([[-2, -1, 0, 1]], dtype=torch.int16)
    assert words(bitpack.pack((int2 + 2).to(torch.uint8), 2)) == [0xE4]


def test_three_bit_element_straddles_words():
    codes = torch.arange(11, dtype=torch.uint8).reshape(1, 11) % 8
    packed = bitpack.pack(codes, 3)
    assert packed.shape == (1, 2)
    w0, w1 = words(packed)
    # element 10 occupies stream bits 30..32: two bits at the top of word 0, one at the bottom of word 1
    assert (w0 >> 30) == (2 & 3) and (w1 & 1) == (2 >> 2)
    assert equal_bits(bitpack.unpack(packed, 3, 11), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 7, 31, 32, 33, 100, 257])
def test_stream_matches_library_pack(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, k), generator=g, dtype=torch.int8)
    ref = pack_to_int32(q, bits)
    codes = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    assert equal_bits(bitpack.pack(codes, bits), ref)
    assert equal_bits(bitpack.unpack(ref, bits, k), codes)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_words_layout_is_floor_32_over_b_per_word(bits):
    pf = 32 // bits
    k = 3 * pf + 1
    codes = torch.randint(0, 1 << bits, (2, k), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = bitpack.pack(codes, bits, bitpack.WORDS)
    assert packed.shape == (2, 4)
    for row in range(2):
        for i in range(k):
            word = words(packed[row])[i // pf]
            assert (word >> ((i % pf) * bits)) & ((1 << bits) - 1) == codes[row, i]
    assert equal_bits(bitpack.unpack(packed, bits, k, bitpack.WORDS), codes)
    assert bitpack.packed_width(k, bits, bitpack.WORDS) == 4
    assert bitpack.packed_width(k, bits, bitpack.STREAM) == -(-k * bits // 32)


def test_split_nibbles_every_byte_value_and_strided_input():
    # byte 16h + l -> l then h, for all 256 values, in rows and in a transposed (non-contiguous) view
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)
    expected = [[b % 16, b // 16] for b in range(256)]
    assert bitpack.split_nibbles(values).reshape(-1, 2).tolist() == expected
    columns = bitpack.split_nibbles(values.t())
    assert columns.shape == (16, 32)
    assert columns[3, 10:12].tolist() == [3, 5]  # values.t()[3, 5] is byte 5 * 16 + 3
    assert bitpack.split_nibbles(torch.zeros(3, 0, dtype=torch.uint8)).shape == (3, 0)


def test_four_bit_pack_of_views_matches_library_pack():
    # views at an odd byte offset, transposed, and with size-1 dimensions pack like fresh tensors
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-8, 8, (6, 66), generator=g, dtype=torch.int8)
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    for view, signed in ((u[:, 1:65], q[:, 1:65]), (u[:, :6].t(), q[:, :6].t()), (u[:1].unsqueeze(1), q[:1].unsqueeze(1))):
        assert equal_bits(bitpack.pack(view, 4), pack_to_int32(signed.contiguous(), 4))


def test_unpack_rejects_non_int32():
    with pytest.raises(TypeError):
        bitpack.unpack(torch.zeros(2, 2, dtype=torch.int64), 4, 8)


def test_by_rows_bands_give_the_whole_tensor_result(monkeypatch):
    """Banded transforms (several bands, the last one short) equal the same transform done whole: Q4_0
    from a stream and back, the int4 row-pair stream, AWQ's transposition and its stream."""
    from ct_convert.targets import int4_rows
    from ct_convert.targets.awq.reader import awq_stream
    from ct_convert.targets.awq.writer import pack_awq, transpose_awq
    from ct_convert.targets.gguf.blocks import q4_0_from_stream
    from ct_convert.targets.gguf.reader import _q4_0_stream

    g = torch.Generator().manual_seed(0)
    stream = torch.randint(-2**31, 2**31 - 1, (37, 16), generator=g, dtype=torch.int32)  # 37 rows of K = 128
    d = torch.rand(37, 4, generator=g).to(torch.float16)
    packed = torch.randint(0, 256, (19, 64), generator=g, dtype=torch.uint8)
    words = torch.randint(-2**31, 2**31 - 1, (64, 13), generator=g, dtype=torch.int32)  # [N, K/8]
    whole = (q4_0_from_stream(stream, d), int4_rows.stream(packed), transpose_awq(words), int4_rows.from_stream(words))
    assert equal_bits(awq_stream(whole[2]), words)
    monkeypatch.setattr(bitpack, "BAND_BYTES", 200)  # 3 rows of the stream, 3 of the row pairs per band
    banded = bitpack.by_rows(q4_0_from_stream, stream, d)
    assert equal_bits(banded, whole[0])
    assert equal_bits(bitpack.by_rows(_q4_0_stream, banded.view(torch.int16).view(37, 4, 9)[..., 1:]), stream)
    assert equal_bits(int4_rows.stream(packed), whole[1])
    assert equal_bits(int4_rows.from_stream(words), whole[3])  # bands of 1 row pair (104 bytes)
    assert equal_bits(int4_rows.stream(whole[3]), words)
    assert equal_bits(transpose_awq(words), whole[2])  # bands of 3 words of K
    wide = torch.randint(-2**31, 2**31 - 1, (320, 13), generator=g, dtype=torch.int32)  # 40 words of N
    assert equal_bits(awq_stream(pack_awq(bitpack.unpack(wide, 4, 104).t())), wide)  # bands of 16, 16, 8 words
