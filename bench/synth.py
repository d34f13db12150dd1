"""Build a large synthetic but valid compressed-tensors checkpoint (W4A16, Llama shapes).

Codes are random and packed with the compressed-tensors library's own `pack_to_int32`; each distinct
weight shape is packed once and reused by every layer, so building a multi-GB checkpoint takes
seconds. Shards are written one at a time (bounded memory).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors.torch import save_file

LLAMA3_8B = dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256)
QWEN3_30B_A3B = dict(layers=48, hidden=2048, moe_intermediate=768, experts=128, heads=32, kv_heads=4, head_dim=128, vocab=151936)


def _module(n: int, k: int, gs: int, bits: int, symmetric: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=gen, dtype=torch.int8)
    groups = k // gs if gs > 0 else 1
    scale = (torch.rand(n, groups, generator=gen) * 0.02 + 0.001).to(torch.bfloat16)
    out = {"weight_packed": pack_to_int32(q, bits), "weight_scale": scale, "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not symmetric:
        zp = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, groups), generator=gen, dtype=torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    return out


def build(out: Path, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
          group_size: int = 128, bits: int = 4, symmetric: bool = True, shard_bytes: int = 1 << 30, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    packed = {name: _module(n, k, group_size, bits, symmetric, gen) for name, (n, k) in shapes.items()}
    norm = torch.ones(hidden, dtype=torch.bfloat16)
    tensors = [("model.embed_tokens.weight", (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16))]
    for i in range(layers):
        for mod, ts in packed.items():
            tensors += [(f"model.layers.{i}.{mod}.{suffix}", t) for suffix, t in ts.items()]
        tensors += [(f"model.layers.{i}.input_layernorm.weight", norm), (f"model.layers.{i}.post_attention_layernorm.weight", norm)]
    tensors += [("model.norm.weight", norm), ("lm_head.weight", (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16))]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    return _write(out, tensors, config, ["lm_head"], group_size, bits, symmetric, shard_bytes)


def _write(out: Path, tensors: list[tuple[str, torch.Tensor]], config: dict, ignore: list[str], group_size: int, bits: int,
           symmetric: bool, shard_bytes: int) -> Path:
    """Shards of at most `shard_bytes`, an index, and config.json with a pack-quantized group."""
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):
        # shared tensors are saved as separate copies; safetensors refuses aliased storage
        save_file({k: v.clone() for k, v in shard.items()}, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum((out / n).stat().st_size for n in names)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group_size > 0 else "channel",
               "group_size": group_size, "dynamic": False}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0",
        "quantization_status": "compressed", "ignore": ignore,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def build_moe(out: Path, *, layers: int, hidden: int, moe_intermediate: int, experts: int, heads: int, kv_heads: int,
              head_dim: int, vocab: int, group_size: int = 128, bits: int = 4, shard_bytes: int = 1 << 30, seed: int = 0) -> Path:
    """A Qwen3-MoE-shaped W4A16 checkpoint: `experts` experts per layer (each a gate/up/down module,
    the packed codes of one shape shared by all), float routers, q/k norms."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        **{f"mlp.experts.{e}.{p}": s for e in range(experts) for p, s in (
            ("gate_proj", (moe_intermediate, hidden)), ("up_proj", (moe_intermediate, hidden)), ("down_proj", (hidden, moe_intermediate)))},
    }
    packed = {shape: _module(*shape, group_size, bits, True, gen) for shape in set(shapes.values())}
    norm = torch.ones(hidden, dtype=torch.bfloat16)
    tensors: list[tuple[str, torch.Tensor]] = [("model.embed_tokens.weight", (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16))]
    for i in range(layers):
        for mod, shape in shapes.items():
            tensors += [(f"model.layers.{i}.{mod}.{suffix}", t) for suffix, t in packed[shape].items()]
        tensors += [(f"model.layers.{i}.mlp.gate.weight", (torch.randn(experts, hidden, generator=gen) * 0.02).to(torch.bfloat16)),
                    (f"model.layers.{i}.input_layernorm.weight", norm), (f"model.layers.{i}.post_attention_layernorm.weight", norm),
                    (f"model.layers.{i}.self_attn.q_norm.weight", torch.ones(head_dim, dtype=torch.bfloat16)),
                    (f"model.layers.{i}.self_attn.k_norm.weight", torch.ones(head_dim, dtype=torch.bfloat16))]
    tensors += [("model.norm.weight", norm), ("lm_head.weight", (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16))]
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden, "intermediate_size": 6144,
        "moe_intermediate_size": moe_intermediate, "num_experts": experts, "num_local_experts": experts, "num_experts_per_tok": 8,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "attention_bias": False, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    ignore = [f"model.layers.{i}.mlp.gate" for i in range(layers)] + ["lm_head"]
    return _write(out, tensors, config, ignore, group_size, bits, True, shard_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=16, help="Llama-3-8B has 32; 16 gives ~4 GB")
    ap.add_argument("--asym", action="store_true")
    args = ap.parse_args()
    shape = dict(LLAMA3_8B, layers=args.layers)
    build(args.out, symmetric=not args.asym, **shape)


if __name__ == "__main__":
    main()
