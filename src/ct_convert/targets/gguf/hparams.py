"""The config.json numbers the GGUF writer uses (gguf.md §3.1), checked before anything is built
from them: each must be a number of the right kind and range (GGUF stores counts as uint32), and
every size must agree with the tensors the checkpoint holds. A config that claims 10^7 layers for a
one-layer checkpoint, 10^9 experts or a head_dim of 2^31 is refused naming the field, instead of
sizing a name table, an expert list or the llama3 `rope_freqs` tensor from the claim.
"""

from __future__ import annotations

import math
import re

from ct_convert.architectures.base import ModelBase, expert_of
from ct_convert.errors import InputError
from ct_convert.readers.checkpoint import SourceReader

U32 = 2**32 - 1
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")  # the decoder layers gguf-py maps to blk.N
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")  # the order ModelBase.expert_count reads them in


def check(reader: SourceReader, model: type[ModelBase]) -> None:
    """Refuse config.json numbers `model` (the architecture's class) would be built from, before it is."""
    config = model.text_config(reader.config)  # a VL checkpoint's text model: its numbers and tensors
    c = _Fields(config, str(reader.config_file or "config.json"))
    shapes = {f"{m}.weight": tuple(info.shape) for m, info in reader.modules.items()}
    shapes.update((t, tuple(reader.tensor_meta(t).shape)) for t in reader.passthrough())
    # the text model's tensors, named as llama.cpp's converter maps them (no `language_model.`)
    shapes = {model.converter_name(name): shape for name, shape in shapes.items() if not name.startswith(model.towers)}
    largest = max((d for s in shapes.values() for d in s), default=0)

    layers = {int(m[1]) for name in shapes if (m := _LAYER.search(name))}
    n_layers = c.count("num_hidden_layers")
    # multi-token-prediction layers follow the trunk's; a checkpoint may hold them or not
    mtp = (c.count(model.mtp_key, n_layers or 0, allow_zero=True) or 0) if model.mtp_key else 0
    if n_layers is not None and not (_exactly(layers, n_layers) or (mtp and _exactly(layers, n_layers + mtp))):
        nor = f" (nor {n_layers + mtp} with {model.mtp_key} {mtp})" if mtp else ""
        c.refuse("num_hidden_layers", n_layers, f"but the checkpoint's tensors hold {_numbered('layers', layers)}{nor}")

    hidden = c.count("hidden_size", largest)
    heads = c.count("num_attention_heads", largest)
    kv_heads = c.count("num_key_value_heads", largest) or heads
    head_dim = c.count("head_dim", largest, allow_zero=True) or (hidden // heads if hidden and heads else None)
    if head_dim == 0:
        c.refuse("hidden_size", hidden, f"smaller than num_attention_heads {heads}")
    if model.rope_pairs_rows and head_dim is not None and head_dim % 2:
        c.refuse("head_dim", head_dim, "odd, but llama's rope rotates pairs of rows")
    if model.mla:
        _mla(c, heads, largest, shapes)
    elif heads and head_dim:
        c.rows("num_attention_heads x head_dim", heads * head_dim, "model.layers.0.self_attn.q_proj.weight", shapes)
        c.rows("num_key_value_heads x head_dim", kv_heads * head_dim, "model.layers.0.self_attn.k_proj.weight", shapes)
    embed = shapes.get("model.embed_tokens.weight")
    if hidden and embed and embed[-1] != hidden:
        c.refuse("hidden_size", hidden, f"but model.embed_tokens.weight has {embed[-1]} columns")
    for key, pattern in model.ffn_rows:
        want = c.count(key)
        for name in [n for n in shapes if re.fullmatch(pattern, n)] if want is not None else ():
            c.rows(key, want, name, shapes)

    experts = {found[1] for name in shapes if (found := expert_of(name))}
    for key in EXPERT_KEYS:
        c.count(key, allow_zero=True)
    key = next((k for k in EXPERT_KEYS if config.get(k)), None)
    if key is not None and (experts or model.moe):
        n_experts = int(config[key])
        if not _exactly(experts, n_experts):
            c.refuse(key, n_experts, f"but the checkpoint's tensors hold {_numbered('experts', experts)}")
        used = c.count("num_experts_per_tok")
        if used is not None and used > n_experts:
            c.refuse("num_experts_per_tok", used, f"more than the {n_experts} experts")
    for key in ("decoder_sparse_step", "interleave_moe_layer_step", "no_rope_layer_interval", "intermediate_size_mlp"):
        c.count(key)
    expected = model.expert_layers(config, n_layers) if n_layers is not None else None
    held = {int(m[1]) for name in shapes if expert_of(name) and (m := _LAYER.search(name))}
    if expected is not None and held != expected:
        c.refuse("interleave_moe_layer_step", config.get("interleave_moe_layer_step", 1),
                 f"so llama.cpp expects experts in layers {_listed(expected)}, but the checkpoint's tensors hold them in layers {_listed(held)}")
    dense = c.count("first_k_dense_replace", allow_zero=True)
    if dense is not None and experts and held != {n for n in layers if n >= dense}:
        # llama.cpp's graph takes layers below it as dense, the others as MoE: the checkpoint must agree
        c.refuse("first_k_dense_replace", dense, f"but the checkpoint's experts are in {_numbered('layers', held)}")
    for key in ("n_shared_experts", "sliding_window"):
        c.count(key, allow_zero=True)
    for key in ("n_group", "topk_group", "sliding_window_pattern", "_sliding_window_pattern"):
        c.count(key)
    for key in ("routed_scaling_factor", "partial_rotary_factor", "query_pre_attn_scalar", "final_logit_softcapping"):
        c.positive(key)
    c.count("max_position_embeddings")
    c.positive("rms_norm_eps")
    _rope(c, config)


def _mla(c: "_Fields", heads: int | None, largest: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """Multi-head latent attention (DeepSeek-V2/V3): per head, K is nope + rope wide and V v wide;
    K and V come from a kv_lora-wide latent, Q from a q_lora-wide one (or straight from q_proj)."""
    nope, rope, v = (c.count(k, largest) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    q_lora, kv_lora = c.count("q_lora_rank", largest), c.count("kv_lora_rank", largest) or 512
    attn = "model.layers.0.self_attn."
    c.rows("q_lora_rank", q_lora, f"{attn}q_a_proj.weight", shapes)
    c.rows("kv_lora_rank + qk_rope_head_dim", kv_lora + rope if rope else None, f"{attn}kv_a_proj_with_mqa.weight", shapes)
    c.cols("kv_lora_rank", kv_lora, f"{attn}kv_b_proj.weight", shapes)
    if heads is None:
        return
    q = heads * (nope + rope) if nope and rope else None
    c.rows("num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim)", q, f"{attn}q_b_proj.weight", shapes)
    c.rows("num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim)", q, f"{attn}q_proj.weight", shapes)
    c.rows("num_attention_heads x (qk_nope_head_dim + v_head_dim)", heads * (nope + v) if nope and v else None, f"{attn}kv_b_proj.weight", shapes)
    c.cols("num_attention_heads x v_head_dim", heads * v if v else None, f"{attn}o_proj.weight", shapes)


def _exactly(found: set[int], n: int) -> bool:
    """`found` is 0..n-1 (compared without building a range as large as a claim)."""
    return len(found) == n and (n == 0 or (min(found) == 0 and max(found) == n - 1))


def _listed(layers: set[int]) -> str:
    shown = sorted(layers)
    return "[" + ", ".join(map(str, shown[:8])) + (", …" if len(shown) > 8 else "") + "]"


def _numbered(what: str, found: set[int]) -> str:
    if not found:
        return f"no {what}"
    gaps = "" if _exactly(found, len(found)) else f" ({len(found)} of them, with gaps)"
    return f"{what} {min(found)}..{max(found)}{gaps}"


def _rope(c: "_Fields", config: dict) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            c.refuse(key, config[key], "not a JSON object")
    key = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"  # as architectures.base.rope_params picks them
    params = config.get(key) or {}
    c.positive("rope_theta")
    p = _Fields(params, c.where, prefix=f"{key}.")
    for kind in ("rope_type", "type"):
        if params.get(kind) is not None and not isinstance(params[kind], str):
            p.refuse(kind, params[kind], "not a string")
    for kind in ("full_attention", "sliding_attention"):  # transformers 5: one set per layer type (Gemma-3)
        if params.get(kind) is not None and not isinstance(params[kind], dict):
            p.refuse(kind, params[kind], "not a JSON object")
        sub = _Fields(params.get(kind) or {}, c.where, prefix=f"{key}.{kind}.")
        sub.positive("rope_theta")
        sub.positive("factor")
    p.positive("rope_theta")
    p.positive("factor")
    p.positive("partial_rotary_factor")
    p.count("original_max_position_embeddings")
    low, high = p.positive("low_freq_factor"), p.positive("high_freq_factor")
    # equal factors (Llama-4 Scout) leave llama3's smooth band empty: factors are 1 or `factor`
    if (params.get("rope_type") or params.get("type")) == "llama3" and (high or 4.0) < (low or 1.0):
        p.refuse("high_freq_factor", high or 4.0, f"below low_freq_factor {low or 1.0}")


class _Fields:
    """Typed reads of one config object; every failure names the file and the field."""

    def __init__(self, config: dict, where: str, prefix: str = ""):
        self.config = config
        self.where = where
        self.prefix = prefix

    def refuse(self, key: str, value, why: str):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise InputError(f"{self.where}: {self.prefix}{key} is {shown}, {why}")

    def count(self, key: str, most: int = U32, allow_zero: bool = False) -> int | None:
        """A whole number in 1..min(most, 2^32-1) (or 0, where the writer reads 0 as absent)."""
        v = self.config.get(key)
        if v is None:
            return None
        whole = isinstance(v, int) or (isinstance(v, float) and math.isfinite(v) and v.is_integer())
        if isinstance(v, bool) or not whole:
            self.refuse(key, v, "not a whole number")
        v = int(v)
        if v == 0 and allow_zero:
            return 0
        if not 1 <= v <= min(most, U32):
            bound = " (the largest dimension of any tensor)" if most < U32 else ""
            self.refuse(key, v, f"outside 1..{min(most, U32)}{bound}")
        return v

    def positive(self, key: str) -> float | None:
        v = self.config.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            self.refuse(key, v, "not a finite positive number")
        return float(v)

    def cols(self, what: str, want: int | None, tensor: str, shapes: dict[str, tuple[int, ...]]) -> None:
        """The tensor that `what` sizes, where the checkpoint has it, has exactly that many columns."""
        shape = shapes.get(tensor)
        if want is not None and shape and len(shape) >= 2 and shape[-1] != want:
            raise InputError(f"{self.where}: {what} is {want}, but {tensor} has {shape[-1]} columns")

    def rows(self, what: str, want: int | None, tensor: str, shapes: dict[str, tuple[int, ...]]) -> None:
        """The tensor that `what` sizes, where the checkpoint has it, has exactly that many rows."""
        shape = shapes.get(tensor)
        if want is not None and shape and len(shape) >= 2 and shape[-2] != want:
            raise InputError(f"{self.where}: {what} is {want}, but {tensor} has {shape[-2]} rows")
