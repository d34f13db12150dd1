"""Tiny compressed-tensors checkpoints of every architecture the mlx target writes, for its tests.

Names and shapes come from a tiny transformers model of the architecture, with MoE experts in the
per-expert layout Hub checkpoints and llm-compressor use (`mlp.experts.{e}.{gate,up,down}_proj`;
Mixtral `block_sparse_moe.experts.{e}.w1/w2/w3`), where transformers 5 holds them fused in memory.
Codes are random and packed with the compressed-tensors library's own `pack_to_int32`; scales are
random, or, for asymmetric checkpoints, chosen so that -z*s is a bf16 value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors.torch import save_file

PROJECTIONS = "q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|w1|w2|w3|q_a_proj|q_b_proj|kv_a_proj_with_mqa"
SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=128, tie_word_embeddings=False,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe"]


def _hf_model(model_type: str):
    import transformers as tf

    if model_type == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL))
    if model_type == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**SMALL))
    if model_type == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL))
    if model_type == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL))
    if model_type == "gemma3_text":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**dict(SMALL, num_hidden_layers=6), sliding_window=16))  # mlx-lm: a global layer every 6
    if model_type == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**SMALL))
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**SMALL, **MOE, num_experts=4, shared_expert_intermediate_size=64))
    if model_type == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**SMALL, **MOE, num_experts=4, norm_topk_prob=True))
    if model_type == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2))
    mla = dict(n_routed_experts=4, first_k_dense_replace=1, n_group=1, topk_group=1, n_shared_experts=1, **MOE)
    if model_type == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**SMALL, **mla, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=32,
                                  qk_rope_head_dim=16, v_head_dim=32)  # fmt: skip
        return tf.DeepseekV3ForCausalLM(cfg)
    if model_type == "glm4_moe":
        return tf.Glm4MoeForCausalLM(tf.Glm4MoeConfig(**SMALL, **mla))
    raise ValueError(model_type)


def hf_state(model_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict with per-expert 2-D linears) of a tiny model, in bf16."""
    torch.manual_seed(0)
    model = _hf_model(model_type)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["torch_dtype"] = "bfloat16"
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(torch.bfloat16) if t.is_floating_point() else t
        fused = re.match(r"^(.+)\.(mlp)\.experts\.(gate_up_proj|down_proj)$", name)
        if fused:
            prefix = f"{fused[1]}.block_sparse_moe" if model_type == "mixtral" else f"{fused[1]}.mlp"
            names = ("w1", "w3") if model_type == "mixtral" else ("gate_proj", "up_proj")
            for e in range(t.shape[0]):
                if fused[3] == "down_proj":
                    state[f"{prefix}.experts.{e}.{'w2' if model_type == 'mixtral' else 'down_proj'}.weight"] = t[e].clone()
                else:
                    gate, up = t[e].chunk(2, dim=0)
                    state[f"{prefix}.experts.{e}.{names[0]}.weight"] = gate.clone()
                    state[f"{prefix}.experts.{e}.{names[1]}.weight"] = up.clone()
            continue
        if model_type == "mixtral":
            name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        state[name] = t
    return config, state


def build(folder: Path, model_type: str, *, bits: int = 4, group_size: int = 32, symmetric: bool = True, seed: int = 0,
          also: tuple[str, ...] = ()) -> Path:
    """A compressed-tensors checkpoint of `model_type` with every projection (and the modules named
    in `also`) quantized."""
    quantized = re.compile(rf"\.({'|'.join((PROJECTIONS, *also))})$")
    config, state = hf_state(model_type)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    for name, t in state.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and quantized.search(module) and t.dim() == 2):
            tensors[name] = t
            continue
        n, k = t.shape
        groups = k // group_size
        codes = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
        if symmetric:
            scale = torch.rand(n, groups, generator=gen) * 0.02 + 0.002
        else:
            # s = m * 2^-10 with m < 16: -z*s has at most 8 significant bits, a bf16 value
            scale = torch.randint(1, 16, (n, groups), generator=gen).float() * 2.0**-10
            zp = torch.randint(lo, hi, (n, groups), generator=gen, dtype=torch.int8)
            tensors[f"{module}.weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
        tensors[f"{module}.weight_packed"] = pack_to_int32(codes, bits)
        tensors[f"{module}.weight_scale"] = scale.to(torch.bfloat16)
        tensors[f"{module}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size, "dynamic": False}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0",
        "quantization_status": "compressed", "ignore": [],
        "config_groups": {"group_0": {"targets": [f"re:.*\\.({'|'.join((PROJECTIONS, *also))})$"], "weights": weights,
                                      "format": "pack-quantized"}},
    }  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
