"""`repack --target trtllm` on fixtures and synthetic checkpoints: tensors against expectations built
from the source with the compressed-tensors library and the scalar §4.7 derivation, tensor-parallel
shards against the tp-size-1 tensors, and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, equal_bits
from test_trtllm_layout import reference_bytes
from ct_convert.targets import open_output

helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

QKV = ("q_proj", "k_proj", "v_proj")
LINEARS = {  # TensorRT-LLM linear -> HF projections fused into it
    "attention.qkv": [f"self_attn.{p}" for p in QKV],
    "attention.dense": ["self_attn.o_proj"],
    "mlp.fc": ["mlp.gate_proj"],
    "mlp.gate": ["mlp.up_proj"],
    "mlp.proj": ["mlp.down_proj"],
}
ROW = {"attention.dense", "mlp.proj"}


def repack(cli, src, out, *args):
    r = cli("repack", src, out, "--target", "trtllm-legacy", "--json", *args)
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    return json.loads((out / "config.json").read_text()), [load_file(p) for p in sorted(out.glob("rank*.safetensors"))]


def source_codes(src: dict, module: str) -> torch.Tensor:
    shape = torch.Size(src[f"{module}.weight_shape"].tolist())
    return helpers.unpack_from_int32(src[f"{module}.weight_packed"], 4 if shape[1] // src[f"{module}.weight_packed"].shape[1] == 8 else 8, shape)


def source_zero(src: dict, module: str, n: int) -> torch.Tensor:
    zp = src[f"{module}.weight_zero_point"]
    return helpers.unpack_from_int32(zp, 4, torch.Size([n, zp.shape[1]]), packed_dim=0)


def fused(src: dict, layer_linear: str, get) -> torch.Tensor:
    return torch.cat([get(f"model.layers.0.{p}") for p in LINEARS[layer_linear]], dim=0)


# -- fixtures: tensors against independent expectations -----------------------------------------


def test_w4a16_g128_to_w4a16_awq(cli, tmp_path):
    cfg, (rank,) = repack(cli, FIXTURES / "w4a16-g128", tmp_path / "o")
    q = cfg["quantization"]
    assert q["quant_algo"] == "W4A16_AWQ" and q["group_size"] == 128
    assert q["has_zero_point"] is False and q["pre_quant_scale"] is True and q["kv_cache_quant_algo"] is None
    src = load_file(FIXTURES / "w4a16-g128" / "model.safetensors")
    for trt in LINEARS:
        s = fused(src, trt, lambda m: source_codes(src, m))
        n, k = s.shape
        u = (s.to(torch.int32) & 0xF)
        want = (u[0::2] | (u[1::2] << 4)).to(torch.uint8).view(torch.int8)
        name = f"transformer.layers.0.{trt}"
        assert equal_bits(rank[f"{name}.weight"], want), trt
        assert equal_bits(rank[f"{name}.weights_scaling_factor"], fused(src, trt, lambda m: src[f"{m}.weight_scale"]))
        assert equal_bits(rank[f"{name}.prequant_scaling_factor"], torch.ones(k, dtype=torch.bfloat16))
    assert equal_bits(rank["transformer.vocab_embedding.weight"], src["model.embed_tokens.weight"])
    assert equal_bits(rank["transformer.layers.0.post_layernorm.weight"], src["model.layers.0.post_attention_layernorm.weight"])
    assert equal_bits(rank["transformer.ln_f.weight"], src["model.norm.weight"])
    assert equal_bits(rank["lm_head.weight"], src["lm_head.weight"])
    assert (tmp_path / "o" / "generation_config.json").read_bytes() == (FIXTURES / "w4a16-g128" / "generation_config.json").read_bytes()
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["num_key_value_heads"] == 2 and cfg["head_size"] == 64
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1} and cfg["rotary_base"] == 10000.0


@pytest.mark.parametrize("sm", [80, 90])
def test_w4a16_asym_g128_to_w4a16_gptq(cli, tmp_path, sm):
    cfg, (rank,) = repack(cli, FIXTURES / "w4a16-asym-g128", tmp_path / "o", "--sm", sm)
    q = cfg["quantization"]
    assert (q["quant_algo"], q["group_size"], q["has_zero_point"], q["pre_quant_scale"]) == ("W4A16_GPTQ", 128, True, False)
    src = load_file(FIXTURES / "w4a16-asym-g128" / "model.safetensors")
    for trt in LINEARS:
        s = fused(src, trt, lambda m: source_codes(src, m))
        n, k = s.shape
        scale = fused(src, trt, lambda m: src[f"{m}.weight_scale"])
        z_unsigned = fused(src, trt, lambda m: source_zero(src, m, src[f"{m}.weight_shape"][0].item())).to(torch.int32) + 8
        name = f"transformer.layers.0.{trt}"
        w = rank[f"{name}.weight"]
        assert w.dtype == torch.bfloat16 and w.shape == (k, n // 4)
        assert w.contiguous().view(torch.uint8).numpy().tobytes() == reference_bytes(s.t().contiguous(), 4, sm), trt
        assert equal_bits(rank[f"{name}.weights_scaling_factor"], scale.t())
        # TensorRT-LLM's converters: zero = (8 - z) * scale, an int x bfloat16 torch product (+0.0 where z = 8)
        assert equal_bits(rank[f"{name}.zero"], ((8 - z_unsigned) * scale).t())


def test_gptq_output_dequantizes_to_the_library_reference(cli, tmp_path):
    """The output reader recovers 8 - z from the stored zero and gives exact float32 values; rounded
    to bf16 they are the library's own decompression."""
    out = tmp_path / "o"
    repack(cli, FIXTURES / "w4a16-asym-g128", out, "--sm", "80")
    ref = load_file(FIXTURES / "w4a16-asym-g128" / "reference.safetensors")
    rd = open_output(out)
    for module, want in ref.items():
        got = rd.dequantize(module.removesuffix(".weight"))
        assert got.dtype == torch.float32 and equal_bits(got.to(torch.bfloat16), want), module


@pytest.mark.parametrize("sm", [80, 90])
def test_w4a16_channel_to_w4a16(cli, tmp_path, sm):
    cfg, (rank,) = repack(cli, FIXTURES / "w4a16-channel", tmp_path / "o", "--sm", sm)
    assert cfg["quantization"]["quant_algo"] == "W4A16"
    src = load_file(FIXTURES / "w4a16-channel" / "model.safetensors")
    for trt in LINEARS:
        s = fused(src, trt, lambda m: source_codes(src, m))
        name = f"transformer.layers.0.{trt}"
        assert rank[f"{name}.weight"].dtype == torch.int8
        assert rank[f"{name}.weight"].numpy().tobytes() == reference_bytes(s.t().contiguous(), 4, sm), trt
        assert equal_bits(rank[f"{name}.per_channel_scale"], fused(src, trt, lambda m: src[f"{m}.weight_scale"]).reshape(-1))


def _edit_fixture(tmp_path: Path, name: str, edit_config=None, edit_tensors=None) -> Path:
    dst = tmp_path / f"src-{name}"
    shutil.copytree(FIXTURES / name, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        t = load_file(dst / "model.safetensors")
        edit_tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_int8_channel_weight_only_to_w8a16(cli, tmp_path):
    # the W8A8 fixture's int8 channel weights, with the activation quantization removed from its config
    def weight_only(qc):
        qc["config_groups"]["group_0"]["input_activations"] = None

    src_dir = _edit_fixture(tmp_path, "w8a8-int", edit_config=weight_only)
    cfg, (rank,) = repack(cli, src_dir, tmp_path / "o", "--sm", "80")
    assert cfg["quantization"]["quant_algo"] == "W8A16"
    src = load_file(src_dir / "model.safetensors")
    for trt in LINEARS:
        s = fused(src, trt, lambda m: src[f"{m}.weight"])
        name = f"transformer.layers.0.{trt}"
        assert rank[f"{name}.weight"].numpy().tobytes() == reference_bytes(s.t().contiguous(), 8, 80), trt
        assert equal_bits(rank[f"{name}.per_channel_scale"], fused(src, trt, lambda m: src[f"{m}.weight_scale"]).reshape(-1))


def test_w8a8_dynamic_activations_are_refused(cli, tmp_path):
    out = tmp_path / "o"
    r = cli("repack", FIXTURES / "w8a8-int", out, "--target", "trtllm-legacy", "--sm", "80")
    assert r.code == 2 and "activations are quantized" in r.err and not out.exists()


def _equal_fp8_scales(t):
    for a, b in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
        grp = "self_attn" if a.endswith("v_proj") or a.endswith("k_proj") else "mlp"
        t[f"model.layers.0.{grp}.{a}.weight_scale"] = t[f"model.layers.0.{grp}.{b}.weight_scale"].clone()


def test_fp8_static_with_equal_fused_scales_to_fp8(cli, tmp_path):
    src_dir = _edit_fixture(tmp_path, "fp8-static", edit_tensors=_equal_fp8_scales)
    cfg, (rank,) = repack(cli, src_dir, tmp_path / "o")
    q = cfg["quantization"]
    assert q["quant_algo"] == "FP8" and q["kv_cache_quant_algo"] == "FP8"
    assert "transformer.layers.0.attention.qkv" not in q["exclude_modules"]
    src = load_file(src_dir / "model.safetensors")
    for trt, parts in LINEARS.items():
        name = f"transformer.layers.0.{trt}"
        w = rank[f"{name}.weight"]
        assert w.dtype == torch.float8_e4m3fn
        assert equal_bits(w.view(torch.uint8), fused(src, trt, lambda m: src[f"{m}.weight"]).view(torch.uint8))
        first = f"model.layers.0.{parts[0]}"
        assert rank[f"{name}.weights_scaling_factor"].dtype == torch.float32
        assert equal_bits(rank[f"{name}.weights_scaling_factor"], src[f"{first}.weight_scale"].float().reshape(1))
        assert equal_bits(rank[f"{name}.activation_scaling_factor"], src[f"{first}.input_scale"].float().reshape(1))
    kv = torch.maximum(src["model.layers.0.self_attn.k_scale"].float(), src["model.layers.0.self_attn.v_scale"].float())
    assert equal_bits(rank["transformer.layers.0.attention.kv_cache_scaling_factor"], kv.reshape(1))
    notes = json.loads((tmp_path / "o" / "ct-convert.json").read_text())["notes"]
    assert any("fused q/k/v" in n for n in notes) and any("kv_cache_scaling_factor" in n for n in notes)


def test_fp8_static_different_qkv_scales_refused_or_kept_dense(cli, tmp_path):
    out = tmp_path / "o"
    r = cli("repack", FIXTURES / "fp8-static", out, "--target", "trtllm-legacy")
    assert r.code == 2 and "different weight_scales" in r.err and not out.exists()
    cfg, (rank,) = repack(cli, FIXTURES / "fp8-static", out, "--keep-unsupported", "dense")
    assert "transformer.layers.0.attention.qkv" in cfg["quantization"]["exclude_modules"]
    assert rank["transformer.layers.0.attention.qkv.weight"].dtype == torch.bfloat16
    assert rank["transformer.layers.0.mlp.proj.weight"].dtype == torch.float8_e4m3fn
    ref = load_file(FIXTURES / "fp8-static" / "reference.safetensors")
    q = torch.cat([ref[f"model.layers.0.self_attn.{p}.weight"] for p in QKV])
    assert equal_bits(rank["transformer.layers.0.attention.qkv.weight"], q)


@pytest.mark.parametrize(
    "name, args, words",
    [
        ("moe-w4a16", [], "architecture Qwen3MoeForCausalLM"),
        ("w4a16-asym-g128", [], "--sm"),
        ("nvfp4", [], "fp4 weights"),
        ("mixed-fp8-w4a16", [], "cannot be written as trtllm"),
        ("w4a16-channel", ["--sm", "80", "--tp-size", "2"], "num_attention_heads 1"),
        ("w8a16-g128", [], "int8 group"),
    ],
)
def test_refusals_exit_2_without_output(cli, tmp_path, name, args, words):
    out = tmp_path / "o"
    r = cli("repack", FIXTURES / name, out, "--target", "trtllm-legacy", *args)
    assert r.code == 2, r.err
    first = r.err.strip().splitlines()[0]
    assert first.startswith("error:") and words in first, r.err
    assert not out.exists() and not list(tmp_path.glob(".o*"))


def test_keep_unsupported_dense_writes_a_float_checkpoint(cli, tmp_path):
    cfg, (rank,) = repack(cli, FIXTURES / "nvfp4a16", tmp_path / "o", "--keep-unsupported", "dense")
    assert cfg["quantization"]["quant_algo"] is None and cfg["quantization"]["exclude_modules"] is None
    ref = load_file(FIXTURES / "nvfp4a16" / "reference.safetensors")
    assert equal_bits(rank["transformer.layers.0.mlp.fc.weight"], ref["model.layers.0.mlp.gate_proj.weight"])
    assert equal_bits(rank["transformer.layers.0.mlp.gate.weight"], ref["model.layers.0.mlp.up_proj.weight"])


def test_verify_command_reads_the_output(cli, tmp_path):
    out = tmp_path / "o"
    repack(cli, FIXTURES / "w4a16-asym-g128", out, "--sm", "90")
    r = cli("verify", FIXTURES / "w4a16-asym-g128", out, "--json")
    assert r.code == 0, r.err
    # one flipped nibble of the qkv weight is caught
    path = out / "rank0.safetensors"
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:8 + header_len])["transformer.layers.0.attention.qkv.weight"]["data_offsets"][0]
    data[8 + header_len + begin + 100] ^= 0x10
    path.write_bytes(bytes(data))
    assert cli("verify", FIXTURES / "w4a16-asym-g128", out).code == 1
