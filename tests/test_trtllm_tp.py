"""Tensor parallelism: synthetic Llama / Qwen2 checkpoints (packed with the compressed-tensors
library) written at --tp-size 1 and 2; the ranks' shards put back together are the tp-1 tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, equal_bits
from ct_convert.targets.trtllm_legacy.reader import undo_mixed_gemm

helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

H, HEADS, KV, D, I, V = 256, 4, 2, 64, 512, 64
PROJ = {"self_attn.q_proj": (HEADS * D, H), "self_attn.k_proj": (KV * D, H), "self_attn.v_proj": (KV * D, H),
        "self_attn.o_proj": (H, HEADS * D), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
QKV_ROWS = (HEADS * D, KV * D, KV * D)
ROW = ("attention.dense", "mlp.proj")


def make_checkpoint(folder: Path, scheme: str, arch: str = "LlamaForCausalLM", layers: int = 2) -> Path:
    g = torch.Generator().manual_seed(hash(scheme) % 1000)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(V, H, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(H, generator=g).bfloat16(),
        "lm_head.weight": torch.randn(V, H, generator=g).bfloat16(),
    }
    bits = 8 if scheme == "channel8" else 4
    for layer in range(layers):
        pre = f"model.layers.{layer}"
        t[f"{pre}.input_layernorm.weight"] = torch.randn(H, generator=g).bfloat16()
        t[f"{pre}.post_attention_layernorm.weight"] = torch.randn(H, generator=g).bfloat16()
        for proj, (n, k) in PROJ.items():
            m = f"{pre}.{proj}"
            if arch == "Qwen2ForCausalLM" and proj[-6:] in ("q_proj", "k_proj", "v_proj"):
                t[f"{m}.bias"] = torch.randn(n, generator=g).bfloat16()
            if scheme == "fp8":
                t[f"{m}.weight"] = (torch.randn(n, k, generator=g) * 100).to(torch.float8_e4m3fn)
                t[f"{m}.weight_scale"] = torch.tensor([0.0078125], dtype=torch.bfloat16)
                t[f"{m}.input_scale"] = torch.tensor([0.015625], dtype=torch.bfloat16)
                continue
            gcount = k // 128 if scheme.endswith("g128") else 1
            lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
            codes = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
            t[f"{m}.weight_packed"] = helpers.pack_to_int32(codes, bits)
            t[f"{m}.weight_scale"] = (torch.rand(n, gcount, generator=g) * 0.01 + 0.001).bfloat16()
            t[f"{m}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
            if scheme == "asym-g128":
                zp = torch.randint(-8, 8, (n, gcount), generator=g, dtype=torch.int8)
                t[f"{m}.weight_zero_point"] = helpers.pack_to_int32(zp, 4, packed_dim=0)
    if scheme == "fp8":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
        fmt = "float-quantized"
    else:
        weights = {"num_bits": bits, "type": "int", "symmetric": scheme != "asym-g128", "dynamic": False,
                   "strategy": "group" if scheme.endswith("g128") else "channel",
                   "group_size": 128 if scheme.endswith("g128") else None}
        acts, fmt = None, "pack-quantized"
    config = {
        "architectures": [arch], "model_type": "qwen2" if arch.startswith("Qwen2") else "llama",
        "hidden_size": H, "intermediate_size": I, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "head_dim": D, "num_hidden_layers": layers, "vocab_size": V, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "quantization_config": {
            "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "version": "0.20.0", "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "format": fmt}},
        },
    }
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def logical(algo: str, name: str, t: torch.Tensor, sm: int) -> torch.Tensor:
    """A rank tensor in HF orientation ([N, ...] or [K] for prequant), layout undone."""
    kind = name.rsplit(".", 1)[-1]
    if ".attention." not in name and ".mlp." not in name:
        return t
    if kind == "weight" and algo == "W4A16_AWQ" and t.dtype == torch.int8:
        b = t.to(torch.int16) & 0xFF
        codes = torch.stack((b & 0xF, b >> 4), dim=1).reshape(-1, t.shape[1])
        return torch.where(codes > 7, codes - 16, codes)
    if kind == "weight" and algo == "W4A16_GPTQ" and t.dtype == torch.bfloat16:
        return undo_mixed_gemm(t, t.shape[0], t.shape[1] * 4, 4, sm).t()
    if kind == "weight" and algo in ("W4A16", "W8A16"):
        bits = 4 if algo == "W4A16" else 8
        return undo_mixed_gemm(t, t.shape[0], t.shape[1] * 8 // bits, bits, sm).t()
    if kind in ("zero",) or (kind == "weights_scaling_factor" and algo == "W4A16_GPTQ"):
        return t.t()
    if kind == "weight" and t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t


def merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    kind = name.rsplit(".", 1)[-1]
    if name == "lm_head.weight":
        return torch.cat(shards)
    if ".layers." not in name or kind in ("weights_scaling_factor", "activation_scaling_factor") and shards[0].numel() == 1 \
            or name.endswith(("layernorm.weight", "kv_cache_scaling_factor")):
        assert all(equal_bits(s, shards[0]) for s in shards[1:]), name
        return shards[0]
    if any(f".{r}." in name for r in ROW):
        if kind in ("bias", "per_channel_scale"):  # bias is added after the all-reduce; channels are not split
            assert all(equal_bits(s, shards[0]) for s in shards[1:]), name
            return shards[0]
        return torch.cat(shards, dim=-1)
    if kind == "prequant_scaling_factor":
        assert all(equal_bits(s, shards[0]) for s in shards[1:])
        return shards[0]
    if "attention.qkv" in name:  # each rank is cat(q_r, k_r, v_r)
        tp = len(shards)
        rows = [r // tp for r in QKV_ROWS]
        per_part = [torch.split(s, rows, dim=0) for s in shards]
        return torch.cat([torch.cat([p[i] for p in per_part]) for i in range(3)])
    return torch.cat(shards, dim=0)


@pytest.mark.parametrize(
    "scheme, arch, algo, sm",
    [
        ("sym-g128", "LlamaForCausalLM", "W4A16_AWQ", None),
        ("asym-g128", "Qwen2ForCausalLM", "W4A16_GPTQ", 80),
        ("asym-g128", "MistralForCausalLM", "W4A16_GPTQ", 90),
        ("channel4", "LlamaForCausalLM", "W4A16", 89),
        ("channel8", "Qwen2ForCausalLM", "W8A16", 100),
        ("fp8", "LlamaForCausalLM", "FP8", None),
    ],
)
def test_tp2_shards_reassemble_to_tp1(cli, tmp_path, scheme, arch, algo, sm):
    src = make_checkpoint(tmp_path / "src", scheme, arch)
    outs = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        args = ["repack", src, out, "--target", "trtllm-legacy", "--tp-size", tp, "--json"] + (["--sm", sm] if sm else [])
        r = cli(*args)
        assert r.code == 0, r.err
        assert r.json()["verified"] is True
        outs[tp] = out
    cfg1 = json.loads((outs[1] / "config.json").read_text())
    cfg2 = json.loads((outs[2] / "config.json").read_text())
    assert cfg1["quantization"]["quant_algo"] == algo and cfg2["mapping"] == {"world_size": 2, "tp_size": 2, "pp_size": 1}
    assert cfg1["architecture"] == arch and cfg1["rotary_base"] == 500000.0
    assert cfg1["rotary_scaling"]["type"] == "llama3" and cfg1["rotary_scaling"]["factor"] == 8.0
    assert cfg1["attn_bias"] is (arch == "Qwen2ForCausalLM")
    assert (outs[2] / "tokenizer.json").is_file()
    one = load_file(outs[1] / "rank0.safetensors")
    ranks = [load_file(outs[2] / f"rank{r}.safetensors") for r in range(2)]
    assert set(one) == set(ranks[0]) == set(ranks[1])
    if arch == "Qwen2ForCausalLM":
        assert "transformer.layers.1.attention.qkv.bias" in one
    for name, want in one.items():
        got = merge(name, [logical(algo, name, r[name], sm) for r in ranks])
        assert equal_bits(got, logical(algo, name, want, sm)), name
    # rank shapes as TensorRT-LLM declares them for a column and a row linear
    if algo == "W4A16_GPTQ":
        assert ranks[0]["transformer.layers.0.attention.qkv.weight"].shape == (H, (HEADS + 2 * KV) * D // 2 // 4)
        assert ranks[0]["transformer.layers.0.mlp.proj.zero"].shape == (I // 2 // 128, H)


def test_kv_heads_fewer_than_ranks_are_refused(cli, tmp_path):
    src = make_checkpoint(tmp_path / "src", "sym-g128")
    out = tmp_path / "o"
    r = cli("repack", src, out, "--target", "trtllm-legacy", "--tp-size", "4")
    assert r.code == 2 and "num_key_value_heads 2" in r.err and "duplicating" in r.err and not out.exists()


def test_groupwise_shapes_that_trtllm_would_pad_are_refused(cli, tmp_path):
    out = tmp_path / "o"
    # hidden 128 at tp 2: TensorRT-LLM pads groupwise layers to multiples of max(64, 128) x 2
    r = cli("repack", FIXTURES / "w4a16-g128", out, "--target", "trtllm-legacy", "--tp-size", "2")
    assert r.code == 2 and "would pad" in r.err and not out.exists()


def test_embedding_and_lm_head_are_streamed_in_bands(cli, tmp_path, monkeypatch):
    """Bands of 3 rows (tensorstore.BAND_BYTES patched): the embedding written to both ranks and each
    rank's 32 rows of lm_head (a band straddles the split) equal the source's rows bit for bit, and
    verification reads them back in bands."""
    from ct_convert import tensorstore

    src = make_checkpoint(tmp_path / "src", "sym-g128")
    monkeypatch.setattr(tensorstore, "BAND_BYTES", 3 * H * 2)
    out = tmp_path / "o"
    r = cli("repack", src, out, "--target", "trtllm-legacy", "--tp-size", "2", "--json")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    source = load_file(src / "model.safetensors")
    for rank in range(2):
        t = load_file(out / f"rank{rank}.safetensors")
        assert equal_bits(t["transformer.vocab_embedding.weight"], source["model.embed_tokens.weight"])
        assert equal_bits(t["lm_head.weight"], source["lm_head.weight"][rank * V // 2:(rank + 1) * V // 2])
