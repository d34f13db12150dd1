"""Architectures the GGUF target supports: HF class -> llama.cpp arch, hyper-parameter keys, tensor
names (gguf-py's name map), the llama Q/K rope row order, and llama3's generated `rope_freqs`
(gguf.md §3.1–§3.5)."""

from __future__ import annotations

import math
import re

import gguf
import torch

from ct_convert.errors import InputError, UnsupportedConversion

ARCHITECTURES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,
    "Qwen3MoeForCausalLM": gguf.MODEL_ARCH.QWEN3MOE,
}

# per-expert HF modules; llama.cpp only knows the stacked 3-D tensor of each (layer, projection)
_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")

# tensors no llama.cpp graph reads: recomputed by the engine
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# tensor slots with a per-tensor `.scale` multiplier in llama.cpp (gguf.md §3.8): NVFP4's global factor
NVFP4_SLOTS = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
    "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "output",
}  # fmt: skip
F32_SLOTS = {"ffn_gate_inp"}  # MoE router: llama.cpp's converter forces F32


def arch_of(config: dict) -> gguf.MODEL_ARCH:
    archs = config.get("architectures") or []
    name = archs[0] if archs else None
    if name not in ARCHITECTURES:
        raise UnsupportedConversion(
            f"architecture {name or '(none in config.json)'} is not supported by --target gguf",
            hint=f"Supported: {', '.join(sorted(ARCHITECTURES))}.",
        )
    return ARCHITECTURES[name]


def arch_name(arch: gguf.MODEL_ARCH) -> str:
    return gguf.MODEL_ARCH_NAMES[arch]


def expert_of(hf_weight: str) -> tuple[str, int] | None:
    """`…experts.E.gate_proj.weight` -> (`…experts.gate_proj.weight`, E)."""
    m = _EXPERT.match(hf_weight)
    if m is None:
        return None
    return f"{m['prefix']}.{m['proj']}.weight", int(m["e"])


def is_dropped(hf_name: str) -> bool:
    return bool(_DROPPED.search(hf_name))


class Names:
    """HF tensor names -> GGUF names for one architecture (gguf-py's TensorNameMap)."""

    def __init__(self, arch: gguf.MODEL_ARCH, n_layers: int):
        self.map = gguf.get_tensor_name_map(arch, n_layers)

    def gguf_name(self, hf_name: str) -> str | None:
        stacked = expert_of(hf_name)
        return self.map.get_name(stacked[0] if stacked else hf_name, try_suffixes=(".weight", ".bias"))


def slot(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `attn_q`; `output.weight` -> `output`."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's NORM rope needs for HF q/k_proj: inside each head of hd rows, output row
    2i + j is HF row j·hd/2 + i (gguf.md §3.4). new = old.index_select(0, rope_rows(...))."""
    hd = n_rows // n_head
    return torch.arange(n_rows).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


def permute_heads(arch: gguf.MODEL_ARCH, gguf_name: str, config: dict) -> int | None:
    """Number of heads whose rows are reordered for this tensor, or None."""
    if arch is not gguf.MODEL_ARCH.LLAMA:
        return None
    s = slot(gguf_name)
    if s == "attn_q":
        return int(config["num_attention_heads"])
    if s == "attn_k":
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def _need(config: dict, key: str):
    if config.get(key) is None:
        raise InputError(f"config.json: missing {key!r}, needed for the GGUF metadata")
    return config[key]


def _rope(config: dict) -> tuple[float, dict]:
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), params


def expert_count(config: dict) -> int | None:
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    return None


def check_config(arch: gguf.MODEL_ARCH, config: dict) -> None:
    """Refuse configs whose model llama.cpp's graph for `arch` would compute differently."""
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "rms_norm_eps"):
        _need(config, key)
    _, params = _rope(config)
    kind = params.get("rope_type") or params.get("type") or "default"
    allowed = {"default", "linear", "yarn"} | ({"llama3"} if arch is gguf.MODEL_ARCH.LLAMA else set())
    if kind not in allowed:
        raise UnsupportedConversion(f"config.json: rope scaling {kind!r} is not supported by --target gguf for this architecture")
    if arch is gguf.MODEL_ARCH.QWEN3MOE:
        _need(config, "moe_intermediate_size")
        _need(config, "num_experts_per_tok")
        if expert_count(config) is None:
            raise InputError("config.json: missing num_experts, needed for the GGUF metadata")
        if not config.get("norm_topk_prob", False):
            raise UnsupportedConversion(
                "config.json: norm_topk_prob is false, but llama.cpp's qwen3moe graph always renormalizes the top-k router weights",
                hint="The GGUF would compute a different model; no GGUF key changes that for qwen3moe.",
            )
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
            raise UnsupportedConversion(
                "config.json: dense MLP layers inside a Qwen3-MoE (mlp_only_layers / decoder_sparse_step) are not supported by llama.cpp's qwen3moe"
            )


def add_hparams(w: gguf.GGUFWriter, arch: gguf.MODEL_ARCH, config: dict, n_vocab: int) -> None:
    n_head = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    w.add_vocab_size(n_vocab)
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    w.add_block_count(int(config["num_hidden_layers"]))
    if config.get("intermediate_size"):
        w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    theta, params = _rope(config)
    w.add_rope_freq_base(theta)
    if config.get("head_dim"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch is gguf.MODEL_ARCH.LLAMA:
        w.add_rope_dimension_count(head_dim)
    if arch is gguf.MODEL_ARCH.QWEN3MOE:
        w.add_expert_count(expert_count(config))
        w.add_expert_used_count(int(config["num_experts_per_tok"]))
        w.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(params["factor"]))
        if params.get("original_max_position_embeddings"):
            w.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))


def rope_freqs(config: dict) -> torch.Tensor | None:
    """llama3 rope scaling: llama.cpp reads per-dimension frequency divisors from `rope_freqs.weight`
    (F32 [head_dim/2]) instead of config keys; the factors follow Meta's llama3 schedule."""
    theta, params = _rope(config)
    if (params.get("rope_type") or params.get("type")) != "llama3":
        return None
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(freqs), torch.where(wavelen > old_ctx / low, torch.full_like(freqs, factor), mid))
    return out.to(torch.float32)
