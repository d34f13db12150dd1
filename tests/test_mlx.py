"""--target mlx (NOTES-h4.md): every fixture through the CLI (accepted ones verify exactly, refused
ones exit 2 and leave nothing), MLX's packing re-derived here as a big-integer bit stream and
unpacked with numpy's little-endian bit order (a third implementation beside the writer's and the
reader's), the identity scales*q + biases == (q - z)*s in float64 element by element, and MLX's
own `mx.dequantize` against the compressed-tensors library's decompression bit for bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors.torch import load_file, save_file

import mlx_models
from conftest import FIXTURE_NAMES, FIXTURES, fixture_entry
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight, WeightScheme
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve
from ct_convert.targets.mlx.encode import Params, choose, e2m3_to_e4m3_bytes, encode
from ct_convert.targets import open_output, writer_for
from ct_convert.targets.mlx.reader import MLXOutput, unpack_codes
from ct_convert.targets.writer_base import RepackOptions

ACCEPTED = {
    "w4a16-g128", "w4a16-sharded", "marlin-ok-w4a16", "moe-w4a16", "legacy-0.14-marlin24", "legacy-0.8.1-marlin24",
    "w4a16-channel", "w2a16-g128", "w3a16-g128", "legacy-0.14-w3a16", "legacy-0.17-w3a16", "w8a16-g128",
    "w8a16-naive", "mxfp4a16", "mxfp6a16", "mxfp8a16",
}  # fmt: skip
REFUSED = {  # the words the one-line refusal must contain
    "fp8-block": "FP8 weights with block scales", "fp8-dynamic": "FP8 weights with channel scales",
    "fp8-static": "FP8 weights with tensor scales", "w8a8-int": "input activations are quantized",
    "nvfp4": "input activations are quantized", "nvfp4a16": "global scale does not fold",
    "w4a16-asym-g128": "-z*s of", "w4a16-asym-channel": "-z*s of", "legacy-0.8.1-w4a16-asym": "-z*s of",
    "legacy-0.9.4-w4a16-asym": "-z*s of", "legacy-0.12.2-w4a16-asym": "-z*s of",
    "legacy-0.8.1-actorder-group": "act-order", "legacy-0.8.1-dense-fakequant": "stored unquantized",
    "legacy-0.8.1-sparse-bitmask": "stored unquantized", "legacy-0.14-sparse-bitmask": "stored unquantized",
    "legacy-0.14-sparse24-bf16": "stored unquantized", "legacy-0.14-sparse24-fp8-dynamic": "FP8 weights",
    "mixed-fp8-w4a16": "FP8 weights", "transform-online": "online transform",
}  # fmt: skip


def stream_words(codes: list[int], bits: int) -> list[int]:
    """The LSB-first bit stream of `codes` as one Python integer, cut into 32-bit words."""
    stream = sum(c << (bits * j) for j, c in enumerate(codes))
    return [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(len(codes) * bits // 32)]


def np_unpack(words: torch.Tensor, bits: int) -> np.ndarray:
    """uint32 [..., W] -> int64 [..., 32W/b] codes, with numpy's little-endian bit order."""
    by = words.contiguous().view(torch.uint8).numpy()
    stream = np.unpackbits(by, axis=-1, bitorder="little")
    return (stream.reshape(*by.shape[:-1], -1, bits).astype(np.int64) << np.arange(bits)).sum(-1)


def repack(cli, src, out, *args):
    r = cli("repack", src, out, "--target", "mlx", "--json", *args)
    assert r.code == 0, r.err
    return r.json()


def weight_module(codes: torch.Tensor, bits: int, gs: int, scale=None, zp=None) -> QuantizedWeight:
    n, k = codes.shape
    scheme = WeightScheme(bits, "int", zp is None, "group", gs)
    info = ModuleInfo("m", "pack-quantized", (n, k), torch.bfloat16, Encoding.INT, scheme)
    scale = torch.ones(n, k // gs, dtype=torch.bfloat16) if scale is None else scale
    return QuantizedWeight(info=info, scale=scale, zero_point=zp, _codes=codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_words_are_the_lsb_first_stream_of_unsigned_codes(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, 128), generator=gen, dtype=torch.int8)
    qw = weight_module(codes, bits, 64)
    p, why = choose(qw.info)
    assert why is None and p == Params("affine", bits, 64)
    out = encode(qw, p, torch.bfloat16)
    u = (codes.to(torch.int64) + (1 << (bits - 1))).tolist()
    assert out["weight"].dtype == torch.uint32 and out["weight"].shape == (3, 128 * bits // 32)
    got = out["weight"].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert got.tolist() == [stream_words(row, bits) for row in u]
    assert (np_unpack(out["weight"], bits) == np.array(u)).all()
    assert torch.equal(unpack_codes(out["weight"], bits).to(torch.int64), torch.tensor(u))  # the output reader's
    # symmetric: the bias is -2^(b-1) * s
    assert torch.equal(out["biases"].float(), -(2.0 ** (bits - 1)) * out["scales"].float())


def test_coarser_source_groups_repeat_their_scales():
    """Channel-wise and group-256 sources become MLX groups of 128 (the largest that divides)."""
    codes = torch.zeros(2, 512, dtype=torch.int8)
    scale = torch.tensor([[0.5, 0.25], [1.0, 2.0]], dtype=torch.bfloat16)
    qw = weight_module(codes, 4, 256, scale=scale)
    p, _ = choose(qw.info)
    assert p.group_size == 128
    out = encode(qw, p, torch.bfloat16)
    assert out["scales"].tolist() == [[0.5, 0.5, 0.25, 0.25], [1.0, 1.0, 2.0, 2.0]]
    info = ModuleInfo("m", "pack-quantized", (2, 96), torch.bfloat16, Encoding.INT, WeightScheme(4, "int", True, "channel"))
    assert choose(info)[0].group_size == 32
    bad = ModuleInfo("m", "pack-quantized", (2, 100), torch.bfloat16, Encoding.INT, WeightScheme(4, "int", True, "channel"))
    assert "no MLX group size" in choose(bad)[1]
    seven = ModuleInfo("m", "pack-quantized", (2, 128), torch.bfloat16, Encoding.INT, WeightScheme(7, "int", True, "group", 128))
    assert "7-bit" in choose(seven)[1]


def test_e2m3_codes_become_the_e4m3_bytes_of_the_same_values():
    from ct_convert.floatcodes import fp6_e2m3_to_float

    codes = torch.arange(64, dtype=torch.uint8)
    e4m3 = e2m3_to_e4m3_bytes(codes).view(torch.float8_e4m3fn).to(torch.float32)
    assert torch.equal(e4m3, fp6_e2m3_to_float(codes))
    assert e2m3_to_e4m3_bytes(torch.tensor([0x20], dtype=torch.uint8)).item() == 0x80  # -0 stays -0


def test_kv_b_proj_is_refused_by_name():
    info = ModuleInfo("model.layers.3.self_attn.kv_b_proj", "pack-quantized", (128, 64), torch.bfloat16, Encoding.INT,
                      WeightScheme(4, "int", True, "group", 32))
    assert "re-quantizes kv_b_proj" in writer_for("mlx").refusal(info, RepackOptions("mlx"))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_repacks_and_verifies_or_is_refused(cli, tmp_path, name):
    out = tmp_path / "out"
    r = cli("repack", FIXTURES / name, out, "--target", "mlx", "-q")
    if name not in ACCEPTED:
        assert r.code == 2, r.err
        lines = r.err.strip().splitlines()
        assert lines[0].startswith("error:") and len(lines) <= 2 and REFUSED[name] in lines[0], r.err
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return
    assert r.code == 0, r.err
    check = cli("verify", FIXTURES / name, out, "--json")
    assert check.code == 0 and all(x["exact"] for x in check.json()["results"]), check.out
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert q == config["quantization_config"] and q["mode"] in ("affine", "mxfp8", "mxfp4") and "quant_method" not in q
    assert q["lm_head"] is False
    assert "compression_config" not in config
    files = {p.name for p in out.iterdir()}
    assert "ct-convert.json" in files and all(f.startswith("model") for f in files if f.endswith(".safetensors"))


def _affine_modules(out):
    """(path, weight, scales, biases, bits, group) of every affine layer, read with safetensors alone."""
    q = json.loads((out / "config.json").read_text())["quantization"]
    t = {}
    for f in sorted(out.glob("model*.safetensors")):
        t.update(load_file(f))
    for name in t:
        if name.endswith(".biases"):
            path = name.removesuffix(".biases")
            entry = q.get(path, q)
            yield path, t[f"{path}.weight"], t[f"{path}.scales"], t[name], entry["bits"], entry["group_size"]


@pytest.mark.parametrize("name", sorted(n for n in ACCEPTED if not n.startswith("mx")))
def test_scales_times_codes_plus_biases_is_the_source_weight_in_float64(cli, tmp_path, name):
    out = tmp_path / "out"
    repack(cli, FIXTURES / name, out, "--no-verify")
    reader = open_checkpoint(resolve(str(FIXTURES / name)))
    seen = 0
    for path, words, scales, biases, bits, g in _affine_modules(out):
        stacked = words.dim() == 3
        for e in range(words.shape[0] if stacked else 1):
            module = path.replace("switch_mlp", f"experts.{e}") if stacked else path
            w, s, b = (x[e] if stacked else x for x in (words, scales, biases))
            q = np_unpack(w, bits).astype(np.float64)
            got = q * np.repeat(s.double().numpy(), g, axis=1) + np.repeat(b.double().numpy(), g, axis=1)
            src = reader.read(module)
            cols = src.column_groups().numpy()
            z = src.group_zero_points()
            z = np.zeros(src.group_scales().shape) if z is None else z.double().numpy()
            want = (src.codes.double().numpy() - z[:, cols]) * src.group_scales().double().numpy()[:, cols]
            assert np.array_equal(got, want), module
            seen += 1
    assert seen == len(reader.modules)


def test_asymmetric_modules_are_exact_where_the_bias_fits(cli, tmp_path):
    src = mlx_models.build(tmp_path / "src", "llama", symmetric=False)
    out = tmp_path / "out"
    summary = repack(cli, src, out)
    assert summary["unconverted"] == [] and summary["converted"] == summary["modules"]
    reader = open_checkpoint(resolve(str(src)))
    for path, words, scales, biases, bits, g in _affine_modules(out):
        z = reader.read(path).group_zero_points().double()
        assert torch.equal(-biases.double() / scales.double(), z + 8)  # the unsigned zero point, exactly
    decoded = open_output(out).decode("model.layers.0.self_attn.q_proj")
    assert decoded is not None and int(decoded.zeros.min()) >= 0


def test_keep_unsupported_dense_writes_float_layers_listed_false(cli, tmp_path):
    src = FIXTURES / "mixed-fp8-w4a16"
    out = tmp_path / "out"
    summary = repack(cli, src, out, "--keep-unsupported", "dense")
    attn = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert sorted(summary["unconverted"]) == sorted(attn)
    q = json.loads((out / "config.json").read_text())["quantization"]
    t = load_file(out / "model.safetensors")
    for m in attn:
        assert q[m] is False and t[f"{m}.weight"].dtype == torch.bfloat16 and f"{m}.scales" not in t
    assert q["bits"] == 4 and q["group_size"] == 128 and "model.layers.0.mlp.down_proj" not in q
    manifest = json.loads((out / "ct-convert.json").read_text())
    assert {f["module"] for f in manifest["fallbacks"]} == set(attn)
    assert manifest["modules"]["model.layers.0.mlp.down_proj"]["mode"] == "affine"
    assert cli("verify", src, out).code == 0


def test_every_module_kept_dense_is_still_read_back_as_mlx(cli, tmp_path):
    out = tmp_path / "out"
    summary = repack(cli, FIXTURES / "w4a16-asym-g128", out, "--keep-unsupported", "dense")
    assert summary["converted"] == 0 and summary["verified"]
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert isinstance(open_output(out), MLXOutput)


def test_mixed_parameters_get_per_layer_entries(cli, tmp_path):
    """Layers whose bits or group size differ from the most common are listed with their own."""
    src = mlx_models.build(tmp_path / "src", "llama")
    t = load_file(src / "model.safetensors")
    m = "model.layers.1.mlp.down_proj"  # K = 128: one 8-bit channel-wise module among 4-bit groups of 32
    n, k = t[f"{m}.weight_shape"].tolist()
    t[f"{m}.weight_packed"] = pack_to_int32(torch.randint(-128, 128, (n, k), dtype=torch.int8), 8)
    t[f"{m}.weight_scale"] = torch.full((n, 1), 0.01, dtype=torch.bfloat16)
    save_file(t, src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    groups["group_1"] = {"targets": [m], "format": "pack-quantized",
                         "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    repack(cli, src, out)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q[m] == {"group_size": 128, "bits": 8, "mode": "affine"}
    assert (q["bits"], q["group_size"]) == (4, 32) and "model.layers.0.mlp.down_proj" not in q


def test_experts_are_stacked_into_switch_mlp(cli, tmp_path):
    out = tmp_path / "out"
    repack(cli, FIXTURES / "moe-w4a16", out)
    t = load_file(out / "model.safetensors")
    src = load_file(FIXTURES / "moe-w4a16" / "model.safetensors")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w = t[f"model.layers.0.mlp.switch_mlp.{proj}.weight"]
        assert w.shape[0] == 2 and not any(f"experts.0.{proj}" in k for k in t)
        for e in range(2):  # the packed words move as they are
            assert torch.equal(w[e].view(torch.int32), src[f"model.layers.0.mlp.experts.{e}.{proj}.weight_packed"])
    manifest = json.loads((out / "ct-convert.json").read_text())
    assert manifest["modules"]["model.layers.0.mlp.experts.1.up_proj"]["expert"] == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_experts"] == 2 and cfg["rope_theta"] == 10000.0
    assert cfg["quantization"]["model.layers.0.mlp.gate"] is False


def test_a_missing_expert_is_refused(cli, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "moe-w4a16", src)
    config = json.loads((src / "config.json").read_text())
    config["num_local_experts"] = 3
    (src / "config.json").write_text(json.dumps(config))
    r = cli("repack", src, tmp_path / "out", "--target", "mlx")
    assert r.code == 2 and "expected 0..2" in r.err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,words", [("gpt2", "not an architecture"), ("gemma3", "not an architecture")])
def test_unsupported_architectures_are_refused_by_name(cli, tmp_path, model_type, words):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "w4a16-g128", src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = model_type
    (src / "config.json").write_text(json.dumps(config))
    r = cli("repack", src, tmp_path / "out", "--target", "mlx")
    assert r.code == 2 and words in r.err and model_type in r.err


def test_nvfp4_folds_a_power_of_two_global_scale(cli, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "nvfp4a16", src, ignore=shutil.ignore_patterns("reference.safetensors"))
    t = load_file(src / "model.safetensors")
    for k in t:
        if k.endswith("weight_global_scale"):
            t[k] = torch.full_like(t[k], 2.0 if "mlp" in k else 1.0)
    save_file(t, src / "model.safetensors")
    out = tmp_path / "out"
    repack(cli, src, out)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["mode"], q["bits"], q["group_size"]) == ("nvfp4", 4, 16)
    got = load_file(out / "model.safetensors")
    m = "model.layers.0.mlp.up_proj"
    want = (t[f"{m}.weight_scale"].float() / 2).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(got[f"{m}.scales"], want)
    assert torch.equal(got[f"{m}.weight"].view(torch.uint8), t[f"{m}.weight_packed"])


@pytest.mark.parametrize("suffix", ["scales", "biases", "weight"])
def test_verify_finds_a_changed_scale_bias_or_code(cli, tmp_path, suffix):
    out = tmp_path / "out"
    repack(cli, FIXTURES / "moe-w4a16", out, "--no-verify")
    t = load_file(out / "model.safetensors")
    name = f"model.layers.0.mlp.switch_mlp.up_proj.{suffix}"
    flat = t[name][1].view(-1)  # expert 1
    (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat.view(torch.int32))[3] ^= 1
    save_file(t, out / "model.safetensors", metadata={"format": "mlx"})
    r = cli("verify", FIXTURES / "moe-w4a16", out, "--json")
    assert r.code == 1
    assert [x["module"] for x in r.json()["results"] if not x["ok"]] == ["model.layers.0.mlp.experts.1.up_proj"]


def test_inspect_shows_the_mlx_column(cli):
    r = cli("inspect", FIXTURES / "fp8-static", "--json")
    mods = r.json()["modules"]
    assert all(m["targets"]["mlx"] is False and "FP8" in m["reasons"]["mlx"] for m in mods)
    r = cli("inspect", FIXTURES / "w3a16-g128", "--json")
    assert all(m["targets"]["mlx"] is True for m in r.json()["modules"])


# -- MLX itself ---------------------------------------------------------------------------------
def _mx(t: torch.Tensor):
    import mlx.core as mx

    if t.dtype == torch.bfloat16:
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    if t.dtype == torch.uint32:
        return mx.array(t.view(torch.int32).numpy()).view(mx.uint32)
    return mx.array(t.numpy())


def _torch(a) -> torch.Tensor:
    import mlx.core as mx

    return torch.from_numpy(np.array(a.astype(mx.float32)))


@pytest.mark.parametrize("name", sorted(ACCEPTED - {"moe-w4a16"}))
def test_mx_dequantize_equals_the_library_decompression(cli, tmp_path, name):
    """mx.dequantize on float32 copies of scales and biases, rounded once to bf16, gives the bits of
    the compressed-tensors library's own decompression (fixtures' reference.safetensors; the marlin-24
    fixtures' references are the fake-quantized weights, equal in value)."""
    mx = pytest.importorskip("mlx.core")
    out = tmp_path / "out"
    repack(cli, FIXTURES / name, out, "--no-verify")
    q = json.loads((out / "config.json").read_text())["quantization"]
    t = {}
    for f in out.glob("model*.safetensors"):
        t.update(load_file(f))
    ref = load_file(FIXTURES / name / "reference.safetensors")
    library = fixture_entry(name)["reference"] == "library-decompress"
    for key, want in ref.items():
        path = key.removesuffix(".weight")
        entry = q.get(path, q)
        w, s = _mx(t[f"{path}.weight"]), t[f"{path}.scales"]
        if entry["mode"] == "affine":
            got = mx.dequantize(w, _mx(s.float()), _mx(t[f"{path}.biases"].float()), entry["group_size"], entry["bits"])
        else:
            got = mx.dequantize(w, _mx(s), None, entry["group_size"], entry["bits"], entry["mode"], dtype=mx.float32)
        got = _torch(got).to(want.dtype)
        if library:
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), key
        else:  # a fake-quantized reference keeps the sign of rounded-away values: -0 where (q - z) * s is +0
            assert torch.equal(got, want), key


def test_mlx_bf16_dequantize_rounds_twice(cli, tmp_path):
    """With bf16 scales and biases, mx.dequantize rounds s*q to bf16 and then rounds the sum with the
    bias again: its result is exactly that double rounding, and differs from the single rounding of
    the exact value (the library's decompression) on about half of the elements of w4a16-g128."""
    mx = pytest.importorskip("mlx.core")
    out = tmp_path / "out"
    repack(cli, FIXTURES / "w4a16-g128", out, "--no-verify")
    ref = load_file(FIXTURES / "w4a16-g128" / "reference.safetensors")
    differ = total = 0
    for path, words, scales, biases, bits, g in _affine_modules(out):
        got = _torch(mx.dequantize(_mx(words), _mx(scales), _mx(biases), g, bits)).to(torch.bfloat16)
        u = unpack_codes(words, bits).to(torch.bfloat16).reshape(words.shape[0], -1, g)
        twice = (u * scales.unsqueeze(-1)).add(biases.unsqueeze(-1)).reshape(got.shape)  # bf16 ops round each step
        assert torch.equal(got.view(torch.int16), twice.view(torch.int16)), path
        want = ref[f"{path}.weight"]
        differ += int((got.view(torch.int16) != want.view(torch.int16)).sum())
        total += want.numel()
    assert 0.4 < differ / total < 0.7


def test_stacked_3d_experts_map_to_switch_mlp_or_are_refused(cli, tmp_path):
    """compressed-tensors §8.5 stacked experts: experts.down_proj [E, N, K] is mlx-lm's switch_mlp
    down_proj as it is; a fused gate_up_proj has no mlx-lm layer and is refused by name."""
    src = tmp_path / "src"
    e, n, k = 2, 64, 128
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(8, n, generator=g).bfloat16()}
    for name, shape in (("down_proj", (e, n, k)), ("gate_up_proj", (e, 2 * k, n))):
        base = f"model.layers.0.mlp.experts.{name}"
        t[f"{base}.weight_packed"] = pack_to_int32(torch.randint(-8, 8, shape, generator=g, dtype=torch.int8), 4)
        t[f"{base}.weight_scale"] = (torch.rand(*shape[:2], shape[2] // 32, generator=g) + 0.5).bfloat16()
        t[f"{base}.weight_shape"] = torch.tensor(shape)
    src.mkdir()
    save_file(t, src / "model.safetensors")
    weights = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "torch_dtype": "bfloat16", "num_experts": e,
              "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0",
                                      "config_groups": {"g": {"targets": ["re:.*experts.*"], "weights": weights}}}}
    (src / "config.json").write_text(json.dumps(config))
    r = cli("repack", src, tmp_path / "out", "--target", "mlx", "--keep-unsupported", "dense")
    assert r.code == 2 and "experts.gate_up_proj" in r.err and "no layer" in r.err
    del t["model.layers.0.mlp.experts.gate_up_proj.weight_packed"]
    for suffix in ("weight_scale", "weight_shape"):
        del t[f"model.layers.0.mlp.experts.gate_up_proj.{suffix}"]
    save_file(t, src / "model.safetensors")
    out = tmp_path / "out"
    repack(cli, src, out)
    got = load_file(out / "model.safetensors")["model.layers.0.mlp.switch_mlp.down_proj.weight"]
    assert got.shape == (e, n, k // 8)
    assert torch.equal(got.view(torch.int32), t["model.layers.0.mlp.experts.down_proj.weight_packed"])


def test_dtype_float16_stores_scales_and_biases_in_float16(cli, tmp_path):
    out = tmp_path / "out"
    repack(cli, mlx_models.build(tmp_path / "src", "llama"), out, "--dtype", "float16")
    t = load_file(out / "model.safetensors")
    m = "model.layers.0.self_attn.q_proj"
    assert t[f"{m}.scales"].dtype == t[f"{m}.biases"].dtype == t["model.norm.weight"].dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def one_inexact_expert(tmp_path):
    """Asymmetric Qwen3-MoE where one scale of expert 2's gate_proj makes -z*s miss bf16."""
    src = mlx_models.build(tmp_path / "src", "qwen3_moe", symmetric=False)
    t = load_file(src / "model.safetensors")
    name = "model.layers.1.mlp.experts.2.gate_proj.weight_scale"
    t[name][0, 0] = 0.0123  # 8 significant bits: times an odd zero point it needs more
    zp = "model.layers.1.mlp.experts.2.gate_proj.weight_zero_point"
    z = torch.zeros(t[name].shape, dtype=torch.int8) - 5  # unsigned zero point 3 everywhere
    t[zp] = pack_to_int32(z, 4, packed_dim=0)
    save_file(t, src / "model.safetensors")
    return src


def test_an_inexact_expert_keeps_its_whole_layer_in_float(cli, tmp_path):
    src = one_inexact_expert(tmp_path)
    r = cli("repack", src, tmp_path / "refused", "--target", "mlx")
    assert r.code == 2 and "experts.2.gate_proj" in r.err and "-z*s of 1 group" in r.err
    out = tmp_path / "out"
    summary = repack(cli, src, out, "--keep-unsupported", "dense")
    layer = "model.layers.1.mlp.switch_mlp.gate_proj"
    assert sorted(summary["unconverted"]) == [f"model.layers.1.mlp.experts.{e}.gate_proj" for e in range(4)]
    t = load_file(out / "model.safetensors")
    assert t[f"{layer}.weight"].dtype == torch.bfloat16 and t[f"{layer}.weight"].shape == (4, 64, 64)
    assert f"{layer}.scales" not in t and "model.layers.1.mlp.switch_mlp.up_proj.scales" in t
    assert json.loads((out / "config.json").read_text())["quantization"][layer] is False
