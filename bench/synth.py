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
    out.mkdir(parents=True, exist_ok=True)
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
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0

    def add(name: str, t: torch.Tensor):
        nonlocal size
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    add("model.embed_tokens.weight", (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16))
    for i in range(layers):
        for mod, tensors in packed.items():
            for suffix, t in tensors.items():
                add(f"model.layers.{i}.{mod}.{suffix}", t)
        add(f"model.layers.{i}.input_layernorm.weight", norm)
        add(f"model.layers.{i}.post_attention_layernorm.weight", norm)
    add("model.norm.weight", norm)
    add("lm_head.weight", (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16))
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
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "quantization_config": {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}},
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


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
