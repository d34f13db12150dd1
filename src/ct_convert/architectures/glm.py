"""GLM-4.5 / GLM-4.5-Air (`Glm4MoeForCausalLM`): llama.cpp's `glm4moe` graph as its `Glm4MoeModel`
(conversion/glm.py) writes it: dense leading layers, then routed experts (stacked per layer and
projection), one shared expert, a sigmoid router with `e_score_correction_bias`; q/k/v biases;
`post_attention_layernorm` is `post_attention_norm`; partial NEOX rope (no row order). block_count
counts the multi-token-prediction layers (`num_nextn_predict_layers`) even when the checkpoint lacks
them: llama.cpp then loads the trunk only.
"""

from __future__ import annotations

import gguf

from ct_convert.architectures import register
from ct_convert.architectures.base import ModelBase, _need, rope_params
from ct_convert.errors import InputError, UnsupportedConversion


@register("Glm4MoeForCausalLM")
class Glm4MoeModel(ModelBase):
    gguf_arch = gguf.MODEL_ARCH.GLM4_MOE
    mtp_key = "num_nextn_predict_layers"
    rope_types = frozenset({"default", "linear"})  # YaRN would need keys ModelBase does not write yet

    @classmethod
    def from_config(cls, config: dict) -> "ModelBase":
        model = super().from_config(config)
        model.n_layers += int(model.config.get(cls.mtp_key) or 0)
        return model

    def check_config(self) -> None:
        super().check_config()
        # what transformers would default and llama.cpp's loader defaults differently (no dense layer,
        # no renormalization, no scale) is required rather than guessed
        for key in ("moe_intermediate_size", "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "routed_scaling_factor"):
            _need(self.config, key)
        if not self.config.get("n_routed_experts"):
            raise InputError("config.json: missing 'n_routed_experts', needed for the GGUF metadata")
        if not self.config.get("n_shared_experts"):
            raise UnsupportedConversion("config.json: n_shared_experts is missing or 0, but llama.cpp's glm4moe graph always adds a shared expert")

    def add_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        config = self.config
        params = rope_params(config)[1]
        partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
        w.add_rope_dimension_count(int(self.head_dim * float(partial)))
        w.add_expert_count(int(config["n_routed_experts"]))
        w.add_expert_used_count(int(config["num_experts_per_tok"]))
        if config.get("n_group") is not None:
            w.add_expert_group_count(int(config["n_group"]))
        if config.get("topk_group") is not None:
            w.add_expert_group_used_count(int(config["topk_group"]))
        w.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))
        # check_config requires these (llama.cpp's converter writes each whenever present)
        w.add_expert_shared_count(int(config["n_shared_experts"]))
        w.add_leading_dense_block_count(int(config["first_k_dense_replace"]))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)  # whatever scoring_func says: GLM routes by sigmoid
        w.add_expert_weights_scale(float(config["routed_scaling_factor"]))
        w.add_expert_weights_norm(bool(config["norm_topk_prob"]))
        if config.get(self.mtp_key) is not None:
            w.add_nextn_predict_layers(int(config[self.mtp_key]))
