"""`repack --target modelopt` (the ModelOpt unified HF checkpoint TensorRT-LLM's PyTorch backend loads)
on the fixtures: tensor names, dtypes and shapes against layout.py's table, bytes against the source
unpacked with the compressed-tensors library, hf_quant_config.json / config.json contents, refusals,
and `verify` reading the output back. NVIDIA's own packing and dequantization: test_modelopt_oracle.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from ct_convert.targets import open_output
from ct_convert.targets.modelopt.reader import ModelOptOutput

helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

L0 = "model.layers.0"
QKV = [f"{L0}.self_attn.{p}_proj" for p in "qkv"]
LINEARS = [*QKV, f"{L0}.self_attn.o_proj", f"{L0}.mlp.gate_proj", f"{L0}.mlp.up_proj", f"{L0}.mlp.down_proj"]


def repack(cli, src: Path, out: Path, *args) -> tuple[dict, dict, dict]:
    r = cli("repack", src, out, "--target", "trtllm", "--json", *args)
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    hf = json.loads((out / "hf_quant_config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return hf, cfg, tensors


def shared_global_scales(src: Path, dst: Path) -> Path:
    """The NVFP4 fixtures calibrated q/k/v and gate/up separately; llm-compressor gives fused projections
    one global scale, which TensorRT-LLM requires. Copy the fixture with the first member's scales shared."""
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    for group in (QKV, [f"{L0}.mlp.gate_proj", f"{L0}.mlp.up_proj"]):
        for suffix in ("weight_global_scale", "input_global_scale"):
            if f"{group[0]}.{suffix}" in t:
                for m in group[1:]:
                    t[f"{m}.{suffix}"] = t[f"{group[0]}.{suffix}"].clone()
    (dst / "reference.safetensors").unlink()
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_w4a16_g128_to_w4a16_awq(cli, tmp_path):
    hf, cfg, out = repack(cli, FIXTURES / "w4a16-g128", tmp_path / "o")
    assert hf["producer"]["name"] == "modelopt"
    assert hf["quantization"] == {
        "quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False, "pre_quant_scale": True,
        "kv_cache_quant_algo": None, "exclude_modules": ["lm_head", "model.embed_tokens"],
    }
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "W4A16_AWQ" and qc["group_size"] == 128
    assert qc["ignore"] == ["lm_head", "model.embed_tokens"] and "config_groups" not in qc
    src = load_file(FIXTURES / "w4a16-g128" / "model.safetensors")
    for m in LINEARS:
        n, k = src[f"{m}.weight_shape"].tolist()
        s = helpers.unpack_from_int32(src[f"{m}.weight_packed"], 4, torch.Size([n, k]))  # signed int8 [N, K]
        nib = s.to(torch.int16) & 0xF
        want = (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8)  # rows 2j / 2j+1 in the low / high nibble
        assert out[f"{m}.weight"].dtype == torch.uint8 and torch.equal(out[f"{m}.weight"], want), m
        assert torch.equal(out[f"{m}.weight_scale"], src[f"{m}.weight_scale"])  # [N, K/128] bf16
        assert torch.equal(out[f"{m}.pre_quant_scale"], torch.ones(k, dtype=torch.bfloat16))
        assert {t for t in out if t.startswith(m + ".")} == {f"{m}.{s}" for s in ("weight", "weight_scale", "pre_quant_scale")}
    for t in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", f"{L0}.input_layernorm.weight"):
        assert torch.equal(out[t], src[t]), t
    assert (tmp_path / "o" / "generation_config.json").read_bytes() == (FIXTURES / "w4a16-g128" / "generation_config.json").read_bytes()
    assert isinstance(open_output(tmp_path / "o"), ModelOptOutput)


def test_fp8_static_to_fp8_with_kv_cache(cli, tmp_path):
    hf, cfg, out = repack(cli, FIXTURES / "fp8-static", tmp_path / "o")
    q = hf["quantization"]
    assert q["quant_algo"] == "FP8" and q["kv_cache_quant_algo"] == "FP8" and "group_size" not in q
    assert cfg["quantization_config"]["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    src = load_file(FIXTURES / "fp8-static" / "model.safetensors")
    for m in LINEARS:
        assert out[f"{m}.weight"].dtype == torch.float8_e4m3fn
        assert torch.equal(out[f"{m}.weight"].view(torch.uint8), src[f"{m}.weight"].view(torch.uint8))
        for s in ("weight_scale", "input_scale"):
            assert out[f"{m}.{s}"].dtype == torch.float32 and out[f"{m}.{s}"].shape == ()  # as ModelOpt writes them
            assert torch.equal(out[f"{m}.{s}"], src[f"{m}.{s}"].to(torch.float32).reshape(()))
    for kv in "kv":
        got = out[f"{L0}.self_attn.{kv}_proj.{kv}_scale"]
        assert got.dtype == torch.float32 and torch.equal(got, src[f"{L0}.self_attn.{kv}_scale"].to(torch.float32))
        assert f"{L0}.self_attn.{kv}_scale" not in out


def test_fp8_dynamic_to_per_channel_per_token(cli, tmp_path):
    hf, _, out = repack(cli, FIXTURES / "fp8-dynamic", tmp_path / "o")
    assert hf["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    src = load_file(FIXTURES / "fp8-dynamic" / "model.safetensors")
    for m in LINEARS:
        n = src[f"{m}.weight"].shape[0]
        assert torch.equal(out[f"{m}.weight"].view(torch.uint8), src[f"{m}.weight"].view(torch.uint8))
        assert out[f"{m}.weight_scale"].shape == (n,) and out[f"{m}.weight_scale"].dtype == torch.float32
        assert torch.equal(out[f"{m}.weight_scale"], src[f"{m}.weight_scale"].to(torch.float32).reshape(n))
        assert f"{m}.input_scale" not in out


def test_fp8_block_to_fp8_block_scales(cli, tmp_path):
    hf, _, out = repack(cli, FIXTURES / "fp8-block", tmp_path / "o")
    assert hf["quantization"]["quant_algo"] == "FP8_BLOCK_SCALES" and hf["quantization"]["group_size"] == 128
    src = load_file(FIXTURES / "fp8-block" / "model.safetensors")
    assert out["model.extra_proj.weight_scale"].shape == (2, 3)  # 200 x 300 in 128 x 128 blocks
    for m in [*LINEARS, "model.extra_proj"]:
        assert torch.equal(out[f"{m}.weight"].view(torch.uint8), src[f"{m}.weight"].view(torch.uint8))
        assert torch.equal(out[f"{m}.weight_scale"], src[f"{m}.weight_scale"].to(torch.float32))


def test_nvfp4_to_nvfp4(cli, tmp_path):
    src_dir = shared_global_scales(FIXTURES / "nvfp4", tmp_path / "src")
    hf, cfg, out = repack(cli, src_dir, tmp_path / "o")
    assert hf["quantization"]["quant_algo"] == "NVFP4" and hf["quantization"]["group_size"] == 16
    assert cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["num_bits"] == 4
    src = load_file(src_dir / "model.safetensors")
    for m in LINEARS:
        assert out[f"{m}.weight"].dtype == torch.uint8 and torch.equal(out[f"{m}.weight"], src[f"{m}.weight_packed"])
        assert out[f"{m}.weight_scale"].dtype == torch.float8_e4m3fn
        assert torch.equal(out[f"{m}.weight_scale"].view(torch.uint8), src[f"{m}.weight_scale"].view(torch.uint8))
        g, w2 = src[f"{m}.weight_global_scale"].item(), out[f"{m}.weight_scale_2"]
        # ModelOpt's weight_scale_2 is compressed-tensors' global divisor inverted
        assert w2.shape == () and w2.dtype == torch.float32 and abs(w2.item() * g - 1) < 2**-22
        gi, x = src[f"{m}.input_global_scale"].item(), out[f"{m}.input_scale"]
        assert x.shape == () and abs(x.item() * gi - 1) < 2**-22
    # fused members share one weight_scale_2 and one input_scale, as TensorRT-LLM's loader asserts
    assert len({out[f"{m}.weight_scale_2"].item() for m in QKV}) == 1


def test_nvfp4_fused_global_scales_differ_refused_or_kept_dense(cli, tmp_path):
    out = tmp_path / "o"
    r = cli("repack", FIXTURES / "nvfp4", out, "--target", "trtllm")
    assert r.code == 2 and "different weight_global_scale values" in r.err and not out.exists()
    hf, _, t = repack(cli, FIXTURES / "nvfp4", out, "--keep-unsupported", "dense")
    dense = [*QKV, f"{L0}.mlp.gate_proj", f"{L0}.mlp.up_proj"]
    assert set(dense) <= set(hf["quantization"]["exclude_modules"])
    ref = load_file(FIXTURES / "nvfp4" / "reference.safetensors")
    for m in dense:
        assert torch.equal(t[f"{m}.weight"], ref[f"{m}.weight"])  # the library's own decompression
    assert t[f"{L0}.mlp.down_proj.weight"].dtype == torch.uint8


def test_nvfp4a16_to_w4a16_nvfp4(cli, tmp_path):
    src_dir = shared_global_scales(FIXTURES / "nvfp4a16", tmp_path / "src")
    hf, _, out = repack(cli, src_dir, tmp_path / "o")
    assert hf["quantization"]["quant_algo"] == "W4A16_NVFP4"
    for m in LINEARS:
        assert f"{m}.input_scale" not in out and out[f"{m}.weight_scale_2"].shape == ()


def test_mxfp4a16_to_w4a16_mxfp4(cli, tmp_path):
    hf, _, out = repack(cli, FIXTURES / "mxfp4a16", tmp_path / "o")
    assert hf["quantization"]["quant_algo"] == "W4A16_MXFP4" and hf["quantization"]["group_size"] == 32
    src = load_file(FIXTURES / "mxfp4a16" / "model.safetensors")
    for m in LINEARS:
        assert torch.equal(out[f"{m}.weight"], src[f"{m}.weight_packed"])
        assert out[f"{m}.weight_scale"].dtype == torch.uint8 and torch.equal(out[f"{m}.weight_scale"], src[f"{m}.weight_scale"])


def test_mixed_precision(cli, tmp_path):
    hf, cfg, out = repack(cli, FIXTURES / "mixed-fp8-w4a16", tmp_path / "o")
    q = hf["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION" and "group_size" not in q
    awq = {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False, "pre_quant_scale": True}
    assert q["quantized_layers"] == {
        **{m: {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"} for m in [*QKV, f"{L0}.self_attn.o_proj"]},
        **{f"{L0}.mlp.{p}_proj": awq for p in ("gate", "up", "down")},
    }
    groups = cfg["quantization_config"]["config_groups"]
    assert sorted(len(g["targets"]) for g in groups.values()) == [3, 4]
    assert out[f"{L0}.mlp.up_proj.weight"].dtype == torch.uint8 and out[f"{L0}.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn


def test_moe_names_pass_through(cli, tmp_path):
    hf, _, out = repack(cli, FIXTURES / "moe-w4a16", tmp_path / "o")
    assert hf["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert f"{L0}.mlp.gate" in hf["quantization"]["exclude_modules"]  # the router stays float
    for e in (0, 1):
        for p in ("gate", "up", "down"):
            assert out[f"{L0}.mlp.experts.{e}.{p}_proj.weight"].dtype == torch.uint8
    assert out[f"{L0}.mlp.gate.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(("fixture", "words"), [
    ("w4a16-asym-g128", "--target awq"),
    ("w4a16-asym-channel", "--target awq"),
    ("w4a16-channel", "groups of 64 or 128"),
    ("w8a8-int", "weight-only"),
    ("w3a16-g128", "int3 group"),
    ("mxfp8a16", "MXFP8"),
    ("legacy-0.8.1-actorder-group", "--target gptq"),
])
def test_refusals(cli, tmp_path, fixture, words):
    out = tmp_path / "o"
    r = cli("repack", FIXTURES / fixture, out, "--target", "trtllm")
    assert r.code == 2 and words in r.err and "Traceback" not in r.err and not out.exists(), r.err


def test_keep_unsupported_dense_with_nothing_left_quantized(cli, tmp_path):
    out = tmp_path / "o"
    r = cli("repack", FIXTURES / "w4a16-asym-g128", out, "--target", "trtllm", "--keep-unsupported", "dense", "--json")
    assert r.code == 0 and r.json()["unconverted"] == sorted(LINEARS)
    # nothing quantized: no ModelOpt config at all, a plain float checkpoint
    assert not (out / "hf_quant_config.json").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ref = load_file(FIXTURES / "w4a16-asym-g128" / "reference.safetensors")
    got = load_file(out / "model.safetensors")
    for m in LINEARS:
        assert torch.equal(got[f"{m}.weight"], ref[f"{m}.weight"])


def test_sharded_output_and_verify_command(cli, tmp_path):
    out = tmp_path / "o"
    repack(cli, FIXTURES / "w4a16-g128", out, "--max-shard-size", "40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and f"{L0}.mlp.up_proj.pre_quant_scale" in index["weight_map"]
    r = cli("verify", FIXTURES / "w4a16-g128", out, "--json")
    assert r.code == 0, r.err
    # a flipped nibble in one packed weight is caught
    name = f"{L0}.mlp.up_proj.weight"
    shard = out / index["weight_map"][name]
    t = load_file(shard)
    t[name] = t[name].clone()
    t[name][0, 0] ^= 0x01
    save_file(t, shard, metadata={"format": "pt"})
    r = cli("verify", FIXTURES / "w4a16-g128", out, "--json")
    assert r.code == 1


def test_inspect_shows_the_quant_algo(cli):
    r = cli("inspect", FIXTURES / "mixed-fp8-w4a16", "--json")
    mods = {m["name"]: m for m in r.json()["modules"]}
    assert mods[f"{L0}.mlp.up_proj"]["details"]["trtllm"]["quant_algo"] == "W4A16_AWQ"
    assert mods[f"{L0}.self_attn.q_proj"]["details"]["trtllm"] == {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}
    assert mods[f"{L0}.self_attn.q_proj"]["targets"]["trtllm"] is True
    r = cli("inspect", FIXTURES / "w4a16-asym-g128", "--json")
    m = r.json()["modules"][0]
    assert m["targets"]["trtllm"] is False and "--target awq" in m["reasons"]["trtllm"] and "trtllm" not in m["details"]


def test_verify_sees_a_wrong_weight_scale_2(cli, tmp_path):
    src = shared_global_scales(FIXTURES / "nvfp4", tmp_path / "src")
    out = tmp_path / "o"
    repack(cli, src, out)
    t = load_file(out / "model.safetensors")
    t[f"{L0}.mlp.down_proj.weight_scale_2"] = t[f"{L0}.mlp.down_proj.weight_scale_2"] * 2
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    r = cli("verify", src, out, "--json")
    assert r.code == 1


def test_inexact_input_scale_is_refused_unless_asked_for(cli, tmp_path):
    from ct_convert.targets.modelopt.plan import input_scale

    # a float32 g with no float32 x such that 1/x == g (checked here, so the case is real)
    g = next(g for g in (torch.arange(1, 2000, dtype=torch.float32) * 0.37 + 600) if not input_scale(g.reshape(1))[1])
    src = shared_global_scales(FIXTURES / "nvfp4", tmp_path / "src")
    t = load_file(src / "model.safetensors")
    t[f"{L0}.mlp.down_proj.input_global_scale"] = g.reshape(1)
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    r = cli("repack", src, tmp_path / "s", "--target", "trtllm")
    assert r.code == 2 and "down_proj" in r.err and "--approx-input-scales" in r.err and not (tmp_path / "s").exists()
    r = cli("repack", src, tmp_path / "o", "--target", "trtllm", "--approx-input-scales", "--json")
    assert r.code == 0 and any("one float32 ulp" in n and "down_proj" in n for n in r.json()["notes"])
    got = load_file(tmp_path / "o" / "model.safetensors")[f"{L0}.mlp.down_proj.input_scale"]
    assert got.view(torch.int32) == input_scale(g.reshape(1))[0].view(torch.int32)


def test_per_head_kv_cache_is_refused(cli, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "fp8-static", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"]["strategy"] = "attn_head"
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("repack", src, tmp_path / "o", "--target", "trtllm")
    assert r.code == 2 and "kv_cache_scheme" in r.err and not (tmp_path / "o").exists()


def test_online_transform_is_refused(cli, tmp_path):
    r = cli("repack", FIXTURES / "transform-online", tmp_path / "o", "--target", "trtllm")
    assert r.code == 2 and "online transform" in r.err


@pytest.mark.parametrize("edit", [
    lambda q: q.update(exclude_modules="lm_head"),
    lambda q: q.update(quant_algo="MIXED_PRECISION", quantized_layers={f"{L0}.mlp.up_proj": "W4A16_AWQ"}),
    lambda q: q.update(group_size=None),
])
def test_verify_refuses_a_malformed_hf_quant_config(cli, tmp_path, edit):
    out = tmp_path / "o"
    repack(cli, FIXTURES / "w4a16-g128", out)
    hf = json.loads((out / "hf_quant_config.json").read_text())
    edit(hf["quantization"])
    (out / "hf_quant_config.json").write_text(json.dumps(hf))
    r = cli("verify", FIXTURES / "w4a16-g128", out)
    assert r.code == 2 and "hf_quant_config.json" in r.err and "Traceback" not in r.err, r.err


def test_modelopt_is_an_alias_of_trtllm(cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("repack", FIXTURES / "w4a16-g128", a, "--target", "trtllm", "-q").code == 0
    assert cli("repack", FIXTURES / "w4a16-g128", b, "--target", "modelopt", "-q").code == 0
    ma, mb = (json.loads((d / "ct-convert.json").read_text()) for d in (a, b))
    assert ma["target"] == mb["target"] == "trtllm"
    assert ma["files"] == mb["files"]
