"""Phi-3: llama.cpp's `phi3` graph, which takes the fused `qkv_proj` and `gate_up_proj` as they are
(`attn_qkv` rows [q; k; v], `ffn_up` rows [gate; up]; it splits them at run time) and rotates no
row pairs. Keys as llama.cpp's `Phi3MiniModel.set_gguf_parameters` writes them (no vocab_size)."""

from __future__ import annotations

import gguf

from ct_convert.architectures import register
from ct_convert.architectures.base import ModelBase, _need, rope_params


@register("Phi3ForCausalLM")
class Phi3Model(ModelBase):
    gguf_arch = gguf.MODEL_ARCH.PHI3
    # longrope/su need llama.cpp's rope_factors_long/short tensors and attention factor: not written yet
    rope_types = frozenset({"default"})

    def check_config(self) -> None:
        super().check_config()
        _need(self.config, "original_max_position_embeddings")
        _need(self.config, "intermediate_size")

    def add_hparams(self, w: gguf.GGUFWriter, n_vocab: int) -> None:
        config = self.config
        hidden = int(config["hidden_size"])
        w.add_context_length(int(config["max_position_embeddings"]))
        w.add_rope_scaling_orig_ctx_len(int(config["original_max_position_embeddings"]))
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_block_count(self.n_layers)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        w.add_rope_dimension_count(int(float(config.get("partial_rotary_factor", 1.0)) * hidden) // self.n_head)
        w.add_rope_freq_base(rope_params(config)[0])
        w.add_sliding_window(int(config.get("sliding_window") or 0))
