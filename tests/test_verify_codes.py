"""Verification in the code domain: taken for faithful integer outputs, and never blind to a change
that alters a dequantized weight (each such change falls through to the float comparison)."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, equal_bits
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.targets import open_output
from ct_convert.source import resolve
from ct_convert.verify import bitwise_equal, compare, same_codes

CASES = [
    ("w4a16-g128", "gptq"),
    ("w8a16-g128", "gptq"),
    ("w4a16-asym-g128", "gptq"),
    ("legacy-0.8.1-actorder-group", "gptq"),
    ("w4a16-asym-channel", "gptq"),
    ("w4a16-asym-g128", "awq"),
    ("marlin-ok-w4a16", "marlin"),
    ("w4a16-g128", "gguf"),  # llama: Q/K rows in rope order, Q4_0 blocks of 32 under groups of 128
    ("w8a16-g128", "gguf"),  # Q8_0
    ("gguf/qwen3moe-w4a16", "gguf"),  # stacked experts, one expert a module
    ("w4a16-g128", "trtllm-legacy"),  # W4A16_AWQ: fused q/k/v rows
    ("w3a16-g128", "mlx"),  # affine words: the stream itself
    ("legacy-0.14-w3a16", "mlx"),  # codes-per-word source: compared through the unpacked codes
    ("w4a16-channel", "mlx"),  # one source group becomes K/128 MLX groups
    ("moe-w4a16", "mlx"),  # stacked switch_mlp experts, one expert a module
    ("w4a16-g128", "trtllm"),  # W4A16_AWQ: nibble pairs along N
    ("moe-w4a16", "trtllm"),
]


def _repack(cli, tmp_path, fixture, target, *opts):
    out = tmp_path / f"{fixture.replace('/', '-')}-{target}"
    assert cli("repack", FIXTURES / fixture, out, "--target", target, "--no-verify", "-q", *opts).code == 0
    return open_checkpoint(resolve(str(FIXTURES / fixture), None)), out


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_faithful_outputs_match_in_the_code_domain(cli, tmp_path, case):
    reader, out = _repack(cli, tmp_path, *case)
    out_reader = open_output(out)
    quantized = [m for m, info in reader.modules.items() if info.is_quantized]
    assert quantized
    for name in quantized:
        decoded = out_reader.decode(name)
        assert decoded is not None, name
        assert same_codes(reader.read(name), decoded), name
        # the decoded integer form means what the layout's reference dequantizer says it means
        assert equal_bits(out_reader.decode(name).dequantize(), out_reader.dequantize(name).to(torch.float32)), name


def test_trtllm_ranks_are_put_back_together_in_the_code_domain(cli, tmp_path):
    """--tp-size 2: column-parallel ranks split rows, row-parallel ranks split K (and its groups)."""
    from test_trtllm_tp import make_checkpoint

    src = make_checkpoint(tmp_path / "src", "sym-g128", "LlamaForCausalLM")
    out = tmp_path / "out"
    assert cli("repack", src, out, "--target", "trtllm-legacy", "--tp-size", "2", "--no-verify", "-q").code == 0
    reader, out_reader = open_checkpoint(resolve(str(src), None)), open_output(out)
    assert out_reader.tp == 2 and out_reader.algo == "W4A16_AWQ"
    for name, info in reader.modules.items():
        if info.is_quantized and name != "lm_head":
            assert same_codes(reader.read(name), out_reader.decode(name)), name
            # both ranks' streams, put back together, are the source's packed words
            assert bitwise_equal(out_reader.decode(name).stream, reader.read(name).packed_stream), name
            assert equal_bits(out_reader.decode(name).dequantize(), out_reader.dequantize(name)), name


@pytest.mark.parametrize("tensor,xor", [("weight", 0x08), ("weights_scaling_factor", 0x1)])
def test_a_changed_trtllm_code_or_scale_is_found(cli, tmp_path, tensor, xor):
    reader, out = _repack(cli, tmp_path, "w4a16-g128", "trtllm-legacy")
    _flip(out / "rank0.safetensors", f"transformer.layers.0.mlp.proj.{tensor}", 7, xor)
    out_reader = open_output(out)
    module = "model.layers.0.mlp.down_proj"
    assert not same_codes(reader.read(module), out_reader.decode(module))
    assert [r.module for r in compare(reader, out_reader) if not r.ok] == [module]


def _flip(path, tensor, index, xor):
    tensors = load_file(path)
    t = tensors[tensor]
    (t.view(torch.int16) if t.dtype in (torch.float16, torch.bfloat16) else t).view(-1)[index] ^= xor
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "fixture,target,suffix,xor",
    [
        ("w4a16-asym-g128", "gptq", "qweight", 0x10),  # one code of one column
        ("w4a16-asym-g128", "gptq", "qzeros", 0x1),  # one zero point
        ("w4a16-asym-g128", "awq", "qweight", 0x100),
        ("w4a16-asym-g128", "awq", "scales", 0x1),  # one ulp of one scale
        ("marlin-ok-w4a16", "marlin", "B", 0x1000),
        ("w3a16-g128", "mlx", "weight", 0x40),  # one bit of a 3-bit code
        ("w4a16-g128", "trtllm", "weight", 0x10),  # the high nibble: a code of an odd row
        ("w4a16-g128", "trtllm", "weight_scale", 0x1),
    ],
)
def test_a_changed_code_zero_or_scale_is_found(cli, tmp_path, fixture, target, suffix, xor):
    reader, out = _repack(cli, tmp_path, fixture, target)
    module = "model.layers.0.mlp.down_proj"
    name = f"{module}.{suffix}"
    shard = next(p for p in out.glob("*.safetensors") if name in load_file(p))
    _flip(shard, name, 5, xor)
    out_reader = open_output(out)
    assert not same_codes(reader.read(module), out_reader.decode(module))
    bad = [r for r in compare(reader, out_reader) if not r.ok]
    assert [r.module for r in bad] == [module]
    assert bad[0].max_abs_error > 0


@pytest.mark.parametrize("byte", [3, 0])  # a code nibble (qs[1]); the low byte of the fp16 scale d
def test_a_changed_gguf_block_is_found(cli, tmp_path, byte):
    import gguf
    import numpy as np

    reader, out = _repack(cli, tmp_path, "w4a16-g128", "gguf")
    module = "model.layers.0.mlp.down_proj"
    path = out / "model.gguf"
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down.weight")
    assert gguf.GGMLQuantizationType(t.tensor_type).name == "Q4_0"
    with open(path, "r+b") as f:
        f.seek(int(t.data_offset) + 18 * 5 + byte)
        old = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([old ^ (0x10 if byte > 1 else 0x01)]))
    out_reader = open_output(out)
    assert not same_codes(reader.read(module), out_reader.decode(module))
    bad = [r for r in compare(reader, out_reader) if not r.ok]
    assert [r.module for r in bad] == [module]
    assert np.isfinite(bad[0].max_abs_error) and bad[0].max_abs_error > 0


def test_a_permuted_group_index_is_found(cli, tmp_path):
    reader, out = _repack(cli, tmp_path, "legacy-0.8.1-actorder-group", "gptq")
    out_reader = open_output(out)
    module = next(m for m, i in reader.modules.items() if i.is_quantized)
    decoded = out_reader.decode(module)
    assert decoded.cols is not None
    decoded.cols = decoded.cols.roll(1)
    assert not same_codes(reader.read(module), decoded)


def test_bitwise_equal():
    a = torch.randn(3, 5).to(torch.bfloat16)  # 30 bytes: not a whole number of 8-byte words
    assert bitwise_equal(a, a.clone())
    assert not bitwise_equal(a, a.to(torch.float16))
    b = a.clone()
    b.view(torch.int16)[2, 4] ^= 1
    assert not bitwise_equal(a, b)
    big = torch.arange(64, dtype=torch.int16)
    assert bitwise_equal(big[1:33], big.clone()[1:33])  # an unaligned offset
    assert not bitwise_equal(torch.zeros(8), -torch.zeros(8))  # the float path rules on signed zeros
    nan = torch.full((8,), float("nan"))
    assert bitwise_equal(nan, nan.clone())


_FLIP_CASES = {"gptq": ("w4a16-asym-g128", ("qweight", "qzeros", "scales")),
               "awq": ("w4a16-asym-g128", ("qweight", "qzeros", "scales")),
               "marlin": ("marlin-ok-w4a16", ("B", "s")),
               "trtllm": ("w4a16-g128", ("weight", "weight_scale", "pre_quant_scale"))}
@pytest.fixture(scope="module")
def flip_outputs(tmp_path_factory):
    """One repacked output per target, shared by the hypothesis examples (built on first use)."""
    from ct_convert.targets import writer_for
    from ct_convert.targets.writer_base import RepackOptions

    cache = {}

    def get(target: str):
        if target not in cache:
            fixture, _ = _FLIP_CASES[target]
            out = tmp_path_factory.mktemp(f"flip-{target}")
            reader = open_checkpoint(resolve(str(FIXTURES / fixture), None))
            writer, opts = writer_for(target), RepackOptions(target=target, device="cpu", workers=1)
            writer.write(writer.plan(reader, opts), reader, out, opts, lambda n: None)
            cache[target] = (reader, out)
        return cache[target]

    return get


@given(target=st.sampled_from(sorted(_FLIP_CASES)), pick=st.integers(0, 10**9), bit=st.integers(0, 7))
@settings(max_examples=int(os.environ.get("CT_FUZZ_EXAMPLES", "150")) // 3, deadline=None, derandomize=True)
def test_no_single_bit_flip_in_a_quantized_tensor_goes_unseen(flip_outputs, target, pick, bit):
    """Whatever code, zero point or scale bit of whichever module changes, verification names that module."""
    from ct_convert.targets.reader_base import open_store

    reader, out = flip_outputs(target)
    store = open_store(out)
    names = sorted(n for n in store.names if n.rsplit(".", 1)[1] in _FLIP_CASES[target][1] and n.rsplit(".", 1)[0] in reader.modules)
    name = names[pick % len(names)]
    meta = store.meta(name)
    store.close()
    where = meta.data_start + meta.offsets[0] + (pick // len(names)) % meta.nbytes
    with open(meta.file, "r+b") as f:
        f.seek(where)
        old = f.read(1)[0]
        f.seek(where)
        f.write(bytes([old ^ (1 << bit)]))
        f.flush()
        try:
            bad = [r.module for r in compare(reader, open_output(out)) if not r.ok]
        finally:
            f.seek(where)
            f.write(bytes([old]))
    assert bad == [name.rsplit(".", 1)[0]]


@pytest.mark.parametrize(
    "fixture,target",
    [("w4a16-g128", "gguf"), ("gguf/qwen3moe-w4a16", "gguf"), ("w4a16-asym-g128", "awq"),
     ("marlin-ok-w4a16", "marlin"), ("w4a16-g128", "trtllm"), ("moe-w4a16", "trtllm"),
     ("w4a16-g128", "trtllm-legacy")],
)
def test_reader_streams_are_the_codes_packed_lsb_first(cli, tmp_path, fixture, target):
    """A reader's 4-bit stream (compared with the source's packed words instead of unpacking both) is
    its own unpacked codes packed as an LSB-first 4-bit stream, and equals the source's."""
    from ct_convert import bitpack

    reader, out = _repack(cli, tmp_path, fixture, target)
    out_reader = open_output(out)
    checked = 0
    for name in reader.modules:
        decoded = out_reader.decode(name)
        if decoded is None or decoded.stream is None:
            continue
        assert bitwise_equal(decoded.stream, bitpack.pack(decoded.unpack(), 4)), name
        assert bitwise_equal(decoded.stream, reader.read(name).packed_stream), name
        checked += 1
    assert checked
    if target != "gguf":  # every module of these all-4-bit sources is compared through its stream
        assert checked == sum(i.is_quantized for i in reader.modules.values())


def _stream_by_hand(u):
    """uint8 codes [N, K] -> int32 [N, K/8]: code k in nibble k % 8 of word k // 8, from Python ints."""
    n, k = u.shape
    words = [[sum(int(u[r, 8 * w + i]) << 4 * i for i in range(8)) for w in range(k // 8)] for r in range(n)]
    return _int32(words)


def _int32(values):
    x = torch.tensor(values, dtype=torch.int64)
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def test_awq_stream_by_hand():
    """targets.md §2.2: nibble p of qweight word (k, c) holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][p]."""
    from ct_convert.targets.awq.reader import awq_stream

    order = (0, 2, 4, 6, 1, 3, 5, 7)
    u = torch.randint(0, 16, (24, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)  # [N, K]
    qweight = _int32([[sum(int(u[8 * c + order[p], k]) << 4 * p for p in range(8)) for c in range(3)] for k in range(32)])
    assert bitwise_equal(awq_stream(qweight), _stream_by_hand(u))


def test_marlin_stream_by_hand(monkeypatch):
    """targets.md §1.2's closed form: word 128nt + 4t + w of row kt holds, nibble 0 first, the codes at
    (k0,n0) (k0+8,n0) (k0,n0+8) (k0+8,n0+8) (k0+1,n0) (k0+9,n0) (k0+1,n0+8) (k0+9,n0+8), with
    k0 = 16kt + 2(t % 4), n0 = 64nt + 16w + t // 4; checked against the spec's test vector first."""
    from ct_convert import bitpack
    from ct_convert.targets.marlin.reader import marlin_stream

    def build(u):  # u [K, N]
        kts, nts = u.shape[0] // 16, u.shape[1] // 64
        rows = []
        for kt in range(kts):
            row = [0] * (128 * nts)
            for nt in range(nts):
                for t in range(32):
                    for w in range(4):
                        k0, n0 = 16 * kt + 2 * (t % 4), 64 * nt + 16 * w + t // 4
                        at = [(0, 0), (8, 0), (0, 8), (8, 8), (1, 0), (9, 0), (1, 8), (9, 8)]
                        row[128 * nt + 4 * t + w] = sum(int(u[k0 + dk, n0 + dn]) << 4 * j for j, (dk, dn) in enumerate(at))
            rows.append(row)
        return _int32(rows)

    k, n = torch.meshgrid(torch.arange(16), torch.arange(64), indexing="ij")
    vector = build((37 * k + 11 * n + (k * n) % 13) % 16)
    expect = [0xC5D5C880, 0xD8E8A830, 0xEEFB8810, 0xF10E68F0, 0x927FC52A, 0x3EE80B60, 0xAA8444A6, 0x43F0BAEF]
    assert vector[0, :8].tolist() == _int32([expect]).tolist()[0]
    assert vector[0, 124:].tolist() == _int32([[0x499ADFAE, 0xA1F507D3, 0x3C803C3B, 0x94E86460]]).tolist()[0]
    u = torch.randint(0, 16, (32, 128), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)  # [K, N]
    assert bitwise_equal(marlin_stream(build(u)), _stream_by_hand(u.t()))
    u = torch.randint(0, 16, (32, 320), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    monkeypatch.setattr(bitpack, "BAND_BYTES", 2 * 2 * 512)  # five tiles in bands of two, the last short
    assert bitwise_equal(marlin_stream(build(u)), _stream_by_hand(u.t()))


def test_int4_rows_stream_by_hand():
    """W4A16_AWQ weight byte (j, k): row 2j's signed code (u - 8) in the low nibble, row 2j + 1's in the high."""
    from ct_convert.targets import int4_rows

    u = torch.randint(0, 16, (6, 24), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)  # [N, K]
    w = [[((int(u[2 * j, k]) - 8) & 0xF) | (((int(u[2 * j + 1, k]) - 8) & 0xF) << 4) for k in range(24)] for j in range(3)]
    packed = torch.tensor(w, dtype=torch.uint8)
    assert bitwise_equal(int4_rows.stream(packed), _stream_by_hand(u))
    assert bitwise_equal(int4_rows.unsigned_codes(packed), u)
    assert bitwise_equal(int4_rows.codes_of_stream(int4_rows.stream(packed)), u)
    assert bitwise_equal(int4_rows.from_stream(_stream_by_hand(u)), packed)  # the writers' direction


@pytest.mark.parametrize(
    "fixture,target,tensor,xor",
    [("w4a16-asym-g128", "awq", "qweight", 0x10), ("marlin-ok-w4a16", "marlin", "B", 0x100),
     ("w4a16-g128", "trtllm", "weight", 0x01)],
)
def test_verify_finds_one_changed_code(cli, tmp_path, fixture, target, tensor, xor):
    """One code of one module changed in the output: `verify` exits 1 and names that module alone."""
    _, out = _repack(cli, tmp_path, fixture, target)
    assert cli("verify", FIXTURES / fixture, out).code == 0
    module = "model.layers.0.mlp.down_proj"
    name = f"{module}.{tensor}"
    _flip(next(p for p in out.glob("*.safetensors") if name in load_file(p)), name, 5, xor)
    r = cli("verify", FIXTURES / fixture, out, "--json")
    assert r.code == 1
    assert [m["module"] for m in r.json()["results"] if not m["ok"]] == [module]


class _SlowWholeComparisons:
    """An output reader whose codes never match the source's (one bit of every code flipped) and whose
    whole-weight reads are slow and counted, budgeted as codes (`light`) or as whole weights."""

    working_bytes_per_weight = 12

    def __init__(self, inner, light: bool):
        import threading

        self.inner, self.light = inner, light
        self.active = self.most = 0
        self.lock = threading.Lock()

    def bytes_per_weight(self, module):
        return 3 if self.light else self.working_bytes_per_weight

    def decode(self, module):
        import dataclasses

        d = self.inner.decode(module)
        return None if d is None else dataclasses.replace(d, stream=None, unpack=lambda: d.unpack() ^ 1)

    def dequantize(self, module):
        import time

        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.05)
        try:
            return self.inner.dequantize(module)
        finally:
            with self.lock:
                self.active -= 1

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("light,most", [(True, 1), (False, 2)])
def test_whole_comparisons_beyond_a_modules_budget_run_one_at_a_time(cli, tmp_path, light, most):
    """A module budgeted as codes whose codes differ is compared as whole weights, beyond its budget:
    never two at once; modules budgeted as whole weights are compared side by side. Either way the
    float comparison decides, and these weights are faithful."""
    reader, out = _repack(cli, tmp_path, "w4a16-g128", "gguf")
    spy = _SlowWholeComparisons(open_output(out), light)
    results = compare(reader, spy, workers=2)
    assert results and all(r.ok and r.exact for r in results)
    assert spy.most == most


def test_gguf_budgets_codes_for_whole_integer_tensors_only(cli, tmp_path):
    """A module stored as one Q4_0 tensor is compared as codes (3 bytes a weight); MLA's attn_k_b /
    attn_v_b parts, per-head views, are compared dequantized (12)."""
    reader, out = _repack(cli, tmp_path, "gguf/deepseek-v2-lite-w4a16-g32", "gguf")
    out_reader = open_output(out)
    costs = {m: out_reader.bytes_per_weight(m) for m, info in reader.modules.items() if info.is_quantized}
    assert costs["model.layers.0.self_attn.q_proj"] == 3
    assert costs["model.layers.0.self_attn.kv_b_proj"] == 12
    for m, c in costs.items():
        assert (c == 3) == (out_reader.decode(m) is not None), m


def test_constant_zero_points_mean_what_a_full_tensor_of_them_means():
    from ct_convert.targets.reader_base import dequantize_groups

    u = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    s = torch.rand(2, 6).to(torch.float16)
    full = torch.full((2, 6), 8, dtype=torch.int16)
    assert equal_bits(dequantize_groups(u, 8, s), dequantize_groups(u, full, s))
    cols = torch.arange(64) % 2  # interleaved groups: the gathered form
    assert equal_bits(dequantize_groups(u, 8, s, cols), dequantize_groups(u, full, s, cols))
    assert equal_bits(dequantize_groups(u, 8, s), (u.to(torch.float32) - 8).reshape(6, 2, 32).mul(s.t().to(torch.float32).unsqueeze(-1)).reshape(6, 64))


def test_gguf_reads_views_that_never_write_to_the_file(cli, tmp_path):
    """The reader views the file's blocks without copying them: a write into such a view (none is
    made; this proves none could matter) changes this process's copy of the page, never the file."""
    import hashlib

    reader, out = _repack(cli, tmp_path, "w4a16-g128", "gguf")
    before = hashlib.sha256((out / "model.gguf").read_bytes()).hexdigest()
    out_reader = open_output(out)
    t = out_reader.tensors["blk.0.ffn_down.weight"]
    with open(out / "model.gguf", "rb") as f:
        f.seek(int(t.data_offset))
        stored = torch.frombuffer(bytearray(f.read(64)), dtype=torch.uint8)
    data = torch.from_numpy(t.data).view(-1)[:64]
    data ^= 0xFF  # a read-only mapping would refuse this; a shared one would pass it on
    assert torch.equal(data, stored ^ 0xFF)
    assert hashlib.sha256((out / "model.gguf").read_bytes()).hexdigest() == before
    assert all(r.ok for r in compare(reader, open_output(out)))


@pytest.mark.parametrize("fixture,codes", [("w4a16-g128", True), ("moe-w4a16", True), ("mxfp4a16", False)])
def test_mlx_budgets_codes_for_affine_layers_only(cli, tmp_path, fixture, codes):
    """Affine layers compare their stored words as the code stream (3 bytes a weight); mxfp4/nvfp4
    layers are compared as float values (12)."""
    reader, out = _repack(cli, tmp_path, fixture, "mlx")
    out_reader = open_output(out)
    quantized = [m for m, info in reader.modules.items() if info.is_quantized]
    assert quantized
    for m in quantized:
        assert out_reader.bytes_per_weight(m) == (3 if codes else 12), m
        if codes:
            assert same_codes(reader.read(m), out_reader.decode(m)), m
