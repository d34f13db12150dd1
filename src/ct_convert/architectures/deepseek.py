"""DeepSeek-V2/V3/R1 and Kimi-K2 (`model_type: kimi_k2`, a DeepseekV3ForCausalLM): llama.cpp's
`deepseek2` graph, as llama-cpp-python 0.3.36's `DeepseekV2Model` (conversion/deepseek.py) converts
them: multi-head latent attention written as MQA with one KV head whose K/V are decompressed per head
by `attn_k_b` / `attn_v_b` (kv_b_proj cut per head, the K half transposed), dense first layers,
routed experts stacked, shared experts, the router's score-correction bias, group-limited routing
keys and YaRN scaling with DeepSeek's log multiplier. Multi-token-prediction layers (numbered from
num_hidden_layers on) are not read by llama.cpp's graph and are dropped, as its converter does.
"""

from __future__ import annotations

import re
from functools import partial

import gguf
import torch

from ct_convert.architectures import register
from ct_convert.architectures.base import ModelBase, Part, _need
from ct_convert.errors import InputError, UnsupportedConversion

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_GATING = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}


def rope_parameters(config: dict) -> dict:
    """The rope parameters as llama.cpp's TextModel reads them: `rope_parameters` (transformers 5)
    if the key is there, else `rope_scaling` (transformers 4, Kimi's raw config), with the top-level
    rope_theta, original_max_position_embeddings and a legacy `type` mirrored in."""
    params = dict((config["rope_parameters"] if "rope_parameters" in config else config.get("rope_scaling")) or {})
    if config.get("rope_theta") is not None:
        params.setdefault("rope_theta", config["rope_theta"])
    if params.get("type") is not None:
        params.setdefault("rope_type", params["type"])
    if config.get("original_max_position_embeddings") is not None:
        params.setdefault("original_max_position_embeddings", config["original_max_position_embeddings"])
    return params


def _head_rows(n_rows: int, width: int, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1 of every head of `width` rows (kv_b_proj's per-head [K-nope; V] halves)."""
    return torch.arange(n_rows).reshape(-1, width)[:, start:stop].reshape(-1)


@register("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")
class DeepseekV2Model(ModelBase):
    gguf_arch = gguf.MODEL_ARCH.DEEPSEEK2
    moe = True
    mla = True
    writes_vocab_size = True  # config.json's vocab_size, in add_hparams below, as llama.cpp's converter does
    mtp_key = "num_nextn_predict_layers"

    def __init__(self, n_layers: int, n_head: int, n_head_kv: int, config: dict | None = None, nope: int = 0, v_dim: int = 0):
        super().__init__(n_layers, n_head, n_head_kv, config)
        self.nope = nope  # qk_nope_head_dim: the K rows of a head in kv_b_proj, before its V rows
        self.v_dim = v_dim  # v_head_dim

    @classmethod
    def from_config(cls, config: dict) -> "ModelBase":
        model = super().from_config(config)
        model.nope, model.v_dim = int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
        return model

    @classmethod
    def from_gguf(cls, field) -> "ModelBase":
        model = super().from_gguf(field)
        name = gguf.MODEL_ARCH_NAMES[cls.gguf_arch]
        keys = [f"{name}.attention.key_length_mla", f"{name}.rope.dimension_count", f"{name}.attention.value_length_mla"]
        k_mla, rope, v_mla = (field(k) for k in keys)
        if None in (k_mla, rope, v_mla):  # older deepseek2 GGUFs kept kv_b_proj whole
            raise InputError(f"GGUF without {', '.join(k for k, v in zip(keys, (k_mla, rope, v_mla)) if v is None)}: not a deepseek2 file ct-convert writes")
        model.nope, model.v_dim = int(k_mla) - int(rope), int(v_mla)
        return model

    # -- the config ----------------------------------------------------------------------------
    def check_config(self) -> None:
        config = self.config
        for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size"):
            _need(config, key)
        if config.get("moe_intermediate_size") is None:
            _need(config, "intermediate_size")  # the converter's expert_feed_forward_length otherwise
        heads = int(config["num_attention_heads"])
        if int(config.get("num_key_value_heads") or heads) != heads:
            raise UnsupportedConversion(
                f"config.json: num_key_value_heads {config['num_key_value_heads']} differs from num_attention_heads {heads}, "
                "but llama.cpp's deepseek2 decompresses MLA's K and V for every attention head"
            )
        params = rope_parameters(config)
        kind = params.get("rope_type") or "default"
        if kind not in self.rope_types:
            raise UnsupportedConversion(f"config.json: rope scaling {kind!r} is not supported by --target gguf for deepseek2")
        if kind in ("linear", "yarn") and params.get("factor") is None:
            raise InputError(f"config.json: {kind} rope scaling without a factor")
        if kind == "yarn" and params.get("original_max_position_embeddings") is None:
            raise InputError("config.json: yarn rope scaling without original_max_position_embeddings, needed for the GGUF metadata")
        if config.get("rope_interleave") is False:
            raise UnsupportedConversion("config.json: rope_interleave is false, but llama.cpp's deepseek2 rotates interleaved pairs")
        self._check_routing()

    def _check_routing(self) -> None:
        config = self.config
        if config.get("n_routed_experts") is None:
            return
        _need(config, "num_experts_per_tok")
        score = config.get("scoring_func")
        if score is not None and score not in _GATING:
            raise UnsupportedConversion(f"config.json: scoring_func {score!r} has no llama.cpp deepseek2 gating function")
        if int(config.get("moe_layer_freq") or 1) != 1:
            raise UnsupportedConversion("config.json: moe_layer_freq is not 1, but llama.cpp's deepseek2 makes every layer after the dense ones a MoE")
        n_experts, groups = int(config["n_routed_experts"]), int(config.get("n_group") or 0)
        used_groups = int(config.get("topk_group") or 0)
        if groups > 1:
            # llama.cpp's loader asserts these, and ranks groups by the sum of their top two scores
            # (DeepSeek-V3's noaux_tc), not by their best one (V2's group_limited_greedy)
            if n_experts % groups or groups >= n_experts:
                raise InputError(f"config.json: n_group {groups} does not divide n_routed_experts {n_experts} into groups")
            if not 0 < used_groups < groups:
                raise UnsupportedConversion(f"config.json: topk_group {used_groups} must be in 1..{groups - 1} for llama.cpp's group-limited routing")
            if config.get("topk_method") == "group_limited_greedy":
                raise UnsupportedConversion(
                    "config.json: topk_method group_limited_greedy ranks expert groups by their best score; "
                    "llama.cpp's deepseek2 ranks them by the sum of their top two (noaux_tc)"
                )

    def add_hparams(self, w: gguf.GGUFWriter, n_vocab: int) -> None:
        """llama.cpp's TextModel keys, then DeepseekV2Model's; head_count_kv is 1 (MLA as MQA)."""
        config = self.config
        params = rope_parameters(config)
        w.add_block_count(self.n_layers)
        w.add_context_length(int(config["max_position_embeddings"]))
        w.add_embedding_length(int(config["hidden_size"]))
        if config.get("intermediate_size") is not None:
            w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(1)
        kind = params.get("rope_type")
        if kind in ("linear", "yarn"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(params["factor"]))
        if kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
            for key, add in (
                ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                ("attention_factor" if "attention_factor" in params else "attn_factor", w.add_rope_scaling_yarn_attn_factor),
                ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
            ):
                if params.get(key) is not None:
                    add(float(params[key]))
        if params.get("rope_theta") is not None:
            w.add_rope_freq_base(float(params["rope_theta"]))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
        n_experts = config.get("n_routed_experts")
        if n_experts is not None:
            w.add_expert_count(int(n_experts))
        if config.get("num_experts_per_tok") is not None:
            w.add_expert_used_count(int(config["num_experts_per_tok"]))
        if config.get("n_group") is not None:
            w.add_expert_group_count(int(config["n_group"]))
        if config.get("topk_group") is not None:
            w.add_expert_group_used_count(int(config["topk_group"]))
        if config.get("scoring_func") is not None:
            w.add_expert_gating_func(_GATING[config["scoring_func"]])

        dense = config.get("first_k_dense_replace")
        w.add_leading_dense_block_count(int(dense if dense is not None else (self.n_layers if n_experts is None else 0)))
        w.add_vocab_size(int(config["vocab_size"]))
        if config.get("q_lora_rank") is not None:
            w.add_q_lora_rank(int(config["q_lora_rank"]))
        kv_lora, rope = int(config.get("kv_lora_rank") or 512), int(config["qk_rope_head_dim"])
        w.add_kv_lora_rank(kv_lora)
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(self.nope + rope)
        w.add_value_length_mla(self.v_dim)
        w.add_expert_feed_forward_length(int(config.get("moe_intermediate_size") or config["intermediate_size"]))
        w.add_expert_shared_count(int(config.get("n_shared_experts") or 0))
        if config.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(float(config["routed_scaling_factor"]))
        if config.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(rope)
        if params.get("mscale_all_dim") is not None:
            # llama.cpp's deepseek2 reads this key as 0.1 · mscale_all_dim (a legacy form, unlike other archs)
            w.add_rope_scaling_yarn_log_mul(0.1 * float(params["mscale_all_dim"]))

    # -- tensors -------------------------------------------------------------------------------
    def is_dropped(self, hf_name: str) -> bool:
        m = _LAYER.match(hf_name)
        if m is not None and int(m[1]) >= self.n_layers:
            return True  # a multi-token-prediction layer
        if hf_name == "lm_head.weight" and self.config.get("tie_word_embeddings"):
            return True
        return super().is_dropped(hf_name)

    def modify_tensors(self, hf_name: str) -> list[Part] | None:
        if not hf_name.endswith("self_attn.kv_b_proj.weight"):
            return super().modify_tensors(hf_name)
        # [n_head · (nope + v), kv_lora] viewed per head: the nope K rows, transposed, become attn_k_b
        # (numpy [n_head, kv_lora, nope]); the v rows attn_v_b ([n_head, v, kv_lora])
        prefix = hf_name.removesuffix("kv_b_proj.weight")
        width = self.nope + self.v_dim
        k_b = self.names.get_name(f"{prefix}k_b_proj.weight", try_suffixes=(".weight",))
        v_b = self.names.get_name(f"{prefix}v_b_proj.weight", try_suffixes=(".weight",))
        if k_b is None or v_b is None:
            return None
        return [
            Part(k_b, select=partial(_head_rows, width=width, start=0, stop=self.nope), heads=self.n_head, transpose=True),
            Part(v_b, select=partial(_head_rows, width=width, start=self.nope, stop=width), heads=self.n_head),
        ]
