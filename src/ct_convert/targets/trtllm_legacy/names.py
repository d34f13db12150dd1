"""Hugging Face Llama-family names -> TensorRT-LLM checkpoint names and config (targets.md §4.1–§4.2)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ct_convert import architectures
from ct_convert.errors import InputError
from ct_convert.targets.trtllm_legacy.facts import LINEAR_ORDER, NORM, NORMS, PROJECTION, PROJECTIONS, TOP_LEVEL

# the architectures whose class says TensorRT-LLM's legacy checkpoint holds them (Llama-family names)
ARCHITECTURES = tuple(n for n, cls in architectures.ARCHITECTURES.items() if cls.trtllm_legacy is not None)


@dataclass(frozen=True)
class Linear:
    """One TensorRT-LLM linear: its name, how TP splits it, and the HF projections fused into it."""

    layer: int
    name: str  # e.g. transformer.layers.0.attention.qkv
    parallel: str  # COLUMN (split along N) or ROW (split along K)
    parts: tuple[str, ...]  # HF module names, in fused order along N

    @property
    def is_qkv(self) -> bool:
        return len(self.parts) == 3


# tensors with no TensorRT-LLM counterpart that carry nothing the engine needs
IGNORABLE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def parse_projection(module: str) -> tuple[int, str] | None:
    m = PROJECTION.match(module)
    return (int(m.group(1)), m.group(2)) if m else None


def linear_of(module: str) -> tuple[str, str] | None:
    """HF projection module -> (TensorRT-LLM linear name, parallelism), or None."""
    p = parse_projection(module)
    if p is None:
        return None
    trt, parallel = PROJECTIONS[p[1]]
    return f"transformer.layers.{p[0]}.{trt}", parallel


def layer_linears(layer: int) -> list[Linear]:
    pre = f"model.layers.{layer}"
    out = []
    for trt in LINEAR_ORDER:
        parts = tuple(f"{pre}.{hf}" for hf, (t, _) in PROJECTIONS.items() if t == trt)
        parallel = next(p for t, p in PROJECTIONS.values() if t == trt)
        out.append(Linear(layer, f"transformer.layers.{layer}.{trt}", parallel, parts))
    return out


def replicated_name(source: str) -> str | None:
    """Norms and the embedding table: the same tensor on every rank (lm_head is split instead)."""
    m = NORM.match(source)
    if m:
        return f"transformer.layers.{m.group(1)}.{NORMS[m.group(2)]}.weight"
    return TOP_LEVEL.get(source) if source != "lm_head.weight" else None


def text_config(config: dict) -> dict:
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config


@dataclass(frozen=True)
class Geometry:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_size: int
    intermediate: int
    vocab: int

    def qkv_rows(self) -> tuple[int, int, int]:
        return self.heads * self.head_size, self.kv_heads * self.head_size, self.kv_heads * self.head_size


def geometry(config: dict) -> Geometry:
    c = text_config(config)
    try:
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        return Geometry(
            layers=int(c["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_size=int(c.get("head_dim") or hidden // heads),
            intermediate=int(c["intermediate_size"]),
            vocab=int(c["vocab_size"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(
            f"config.json: missing or invalid {e} for a Llama-family model",
            hint="The TensorRT-LLM checkpoint needs the model's geometry from config.json.",
        ) from None


def _rope(c: dict) -> tuple[float, dict | None]:
    params = c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else {}
    base = c.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") if isinstance(c.get("rope_scaling"), dict) else None
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return float(base), None
        # both spellings: TensorRT-LLM reads "type" in older releases, "rope_type" in newer
        scaling = {**scaling, "type": kind, "rope_type": kind}
    return float(base), scaling


def trtllm_config(config: dict, geo: Geometry, dtype: str, tp: int, quantization: dict, biases: dict) -> dict:
    c = text_config(config)
    arch = (config.get("architectures") or [None])[0]
    base, scaling = _rope(c)
    out = {
        "architecture": arch,
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": geo.vocab,
        "hidden_size": geo.hidden,
        "num_hidden_layers": geo.layers,
        "num_attention_heads": geo.heads,
        "num_key_value_heads": geo.kv_heads,
        "head_size": geo.head_size,
        "intermediate_size": geo.intermediate,
        "norm_epsilon": float(c.get("rms_norm_eps", 1e-6)),
        "hidden_act": c.get("hidden_act", "silu"),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": int(c.get("max_position_embeddings", 2048)),
        "rotary_base": base,
        "rotary_scaling": scaling,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        "attn_bias": biases["attn"],
        "mlp_bias": biases["mlp"],
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": quantization,
    }
    out.update(architectures.ARCHITECTURES[arch].trtllm_legacy)
    if c.get("sliding_window") is not None:
        out["sliding_window"] = c["sliding_window"]
    return out
