"""Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Qwen3-MoE (experts stacked per layer and projection)."""

from __future__ import annotations

import gguf

from ct_convert.architectures import register
from ct_convert.architectures.base import ModelBase, _need
from ct_convert.errors import InputError, UnsupportedConversion


@register("Qwen2ForCausalLM")
class Qwen2Model(ModelBase):
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    trtllm_legacy = {"qwen_type": "qwen2"}


@register("Qwen3ForCausalLM")
class Qwen3Model(ModelBase):
    gguf_arch = gguf.MODEL_ARCH.QWEN3


@register("Qwen3MoeForCausalLM")
class Qwen3MoeModel(ModelBase):
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    moe = True

    def check_config(self) -> None:
        super().check_config()
        config = self.config
        _need(config, "moe_intermediate_size")
        _need(config, "num_experts_per_tok")
        if self.expert_count() is None:
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

    def add_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_expert_count(self.expert_count())
        w.add_expert_used_count(int(self.config["num_experts_per_tok"]))
        w.add_expert_feed_forward_length(int(self.config["moe_intermediate_size"]))
