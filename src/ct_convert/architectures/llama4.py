"""Llama-4 (Scout, Maverick): llama.cpp's `llama4` graph, as its converter's `Llama4Model` writes it.

What differs from Llama: no Q/K row reordering (HF's Llama-4 rope already rotates adjacent pairs);
MoE layers every `interleave_moe_layer_step` layers, dense ones between them; HF's
`intermediate_size` is the experts' (and the shared expert's) width and `intermediate_size_mlp`
the dense layers', which llama.cpp names `expert_feed_forward_length` and `feed_forward_length`;
per-expert Linears (llm-compressor's layout) stacked into `ffn_*_exps`, the shared expert as
`ffn_*_shexp`, the router F32. The text model of `Llama4ForConditionalGeneration` lives under
`language_model.`; its vision model and projector go to llama.cpp's separate mmproj file (`towers`, architectures/vision.py).

llama.cpp's graph fixes what transformers reads from the config (src/models/llama4.cpp): a NoPE
layer every 4th layer, chunked attention of 8192 tokens on the others, the NoPE layers' attention
temperature (floor 8192, scale 0.1), the L2 q/k norm on rope layers unless 128 experts. A config
whose layers differ from that would compute another model: refused.
"""

from __future__ import annotations

import gguf

from ct_convert.architectures import register
from ct_convert.architectures.base import ModelBase, _need
from ct_convert.architectures.llama import LlamaModel
from ct_convert.errors import InputError, UnsupportedConversion

NOPE_STEP = 4  # llama.cpp's n_no_rope_layer_step: layers il with (il + 1) % 4 == 0 have no rope
CHUNK = 8192  # llama.cpp's chunked-attention window (n_swa) for every other layer
TEMPERATURE = {"floor_scale": 8192, "attn_scale": 0.1}  # llama.cpp's NoPE attention temperature
NO_QK_NORM_EXPERTS = 128  # llama.cpp skips the q/k L2 norm only for the 128-expert model (Maverick)


@register("Llama4ForConditionalGeneration", "Llama4ForCausalLM")
class Llama4Model(LlamaModel):
    gguf_arch = gguf.MODEL_ARCH.LLAMA4
    trtllm_legacy = None
    moe = True  # llama.cpp refuses a llama4 without experts
    towers = ("vision_model.", "multi_modal_projector.")
    ffn_rows = (
        ("intermediate_size", r"model\.layers\.\d+\.feed_forward\.(?:experts\.\d+|shared_expert)\.(?:gate|up)_proj\.weight"),
        ("intermediate_size_mlp", r"model\.layers\.\d+\.feed_forward\.(?:gate|up)_proj\.weight"),
    )

    @classmethod
    def from_config(cls, config: dict) -> "ModelBase":
        text = {k: v for k, v in cls.text_config(config).items() if k != "text_config"}
        _need(text, "intermediate_size")
        _need(text, "intermediate_size_mlp")
        # renamed as llama.cpp's converter renames them: feed_forward_length is the dense layers' width
        return super().from_config({**text, "intermediate_size": text["intermediate_size_mlp"], "intermediate_size_moe": text["intermediate_size"]})

    @staticmethod
    def moe_step(config: dict) -> int:
        return int(config.get("interleave_moe_layer_step", 1))

    @classmethod
    def expert_layers(cls, config: dict, n_layers: int) -> set[int]:
        """The layers llama.cpp's llama4 graph builds with experts: (il + 1) % step == 0."""
        step = cls.moe_step(config)
        return {il for il in range(n_layers) if (il + 1) % step == 0}

    def check_config(self) -> None:
        super().check_config()
        config, n = self.config, self.n_layers
        if self.expert_count() is None:
            raise InputError("config.json: missing num_local_experts, needed for the GGUF metadata (llama.cpp's llama4 needs experts)")
        _need(config, "num_experts_per_tok")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedConversion(f"config.json: hidden_act {config['hidden_act']!r}, but llama.cpp's llama4 graph computes silu")
        moe_layers = config.get("moe_layers")
        if moe_layers is not None and not (isinstance(moe_layers, list) and all(isinstance(i, int) for i in moe_layers)):
            raise InputError("config.json: moe_layers is not a list of layer numbers")
        if moe_layers is not None and set(moe_layers) != self.expert_layers(config, n):
            raise UnsupportedConversion(
                f"config.json: moe_layers {moe_layers}, but llama.cpp's llama4 graph builds experts in layers {sorted(self.expert_layers(config, n))} "
                f"(those after every interleave_moe_layer_step = {self.moe_step(config)} layers)"
            )
        qk_norm = self.expert_count() != NO_QK_NORM_EXPERTS
        if bool(config.get("use_qk_norm", True)) != qk_norm:
            raise UnsupportedConversion(
                f"config.json: use_qk_norm is {config.get('use_qk_norm', True)}, but llama.cpp's llama4 graph applies the q/k norm "
                f"exactly when the model does not have {NO_QK_NORM_EXPERTS} experts"
            )
        self._check_layers()

    def _check_layers(self) -> None:
        """Rope, chunked attention and temperature, layer by layer, as transformers reads them from
        the config and as llama.cpp's llama4 graph computes them."""
        config, n = self.config, self.n_layers
        interval = int(config.get("no_rope_layer_interval", NOPE_STEP))
        default = [int((il + 1) % interval != 0) for il in range(n)]
        hf_rope = [bool(r) for r in _layer_list(config, "no_rope_layers", n, int, default, empty_is_default=True)]
        kinds = _layer_list(config, "layer_types", n, str, ["chunked_attention" if r else "full_attention" for r in hf_rope])
        if all(k == "full_attention" for k in kinds):
            # llama.cpp's converter then writes sliding_window 0, and its graph skips rope on the last
            # layer with no temperature defined for it (it asserts): nothing transformers computes
            raise UnsupportedConversion("config.json: every layer is full attention (layer_types), which llama.cpp's llama4 graph does not compute as transformers does")
        cpp = [(il + 1) % NOPE_STEP != 0 for il in range(n)]
        if hf_rope != cpp:
            raise UnsupportedConversion(
                f"config.json: the layers with rope are {_which(hf_rope)} (no_rope_layers), but llama.cpp's llama4 graph ropes layers {_which(cpp)}"
            )
        chunked = [k == "chunked_attention" for k in kinds]
        if chunked != cpp:
            raise UnsupportedConversion(
                f"config.json: layer_types makes layers {_which(chunked)} chunked, but llama.cpp's llama4 graph chunks layers {_which(cpp)}"
            )
        if config.get("attention_chunk_size", CHUNK) != CHUNK:
            raise UnsupportedConversion(
                f"config.json: attention_chunk_size is {config['attention_chunk_size']!r}, but llama.cpp's llama4 graph chunks attention by {CHUNK}"
            )
        if not all(hf_rope) and (not config.get("attn_temperature_tuning", True) or any(config.get(k, v) != v for k, v in TEMPERATURE.items())):
            raise UnsupportedConversion(
                "config.json: the NoPE layers' attention temperature (attn_temperature_tuning, floor_scale, attn_scale) differs from "
                f"llama.cpp's llama4 graph (always on, floor_scale {TEMPERATURE['floor_scale']}, attn_scale {TEMPERATURE['attn_scale']})"
            )

    def add_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        super().add_arch_hparams(w)
        config = self.config
        w.add_expert_count(self.expert_count())
        w.add_expert_used_count(int(config["num_experts_per_tok"]))
        w.add_interleave_moe_layer_step(self.moe_step(config))
        w.add_expert_feed_forward_length(int(config["intermediate_size_moe"]))

    def row_order(self, gguf_name: str):
        return None  # HF's Llama-4 rope already rotates adjacent pairs, as llama.cpp's does


def _layer_list(config: dict, key: str, n: int, kind: type, default: list, empty_is_default: bool = False) -> list:
    """A per-layer list of config.json, checked for its type and length, or transformers' default for it."""
    v = config.get(key)
    if v is None or (empty_is_default and v == []):
        return default
    if not (isinstance(v, list) and len(v) == n and all(isinstance(x, kind) for x in v)):
        raise InputError(f"config.json: {key} is not a list of {n} {kind.__name__} values (one per layer)")
    return v


def _which(flags: list[bool]) -> str:
    layers = [i for i, f in enumerate(flags) if f]
    shown = ", ".join(map(str, layers[:8])) + (", …" if len(layers) > 8 else "")
    return f"[{shown}]" if layers else "none"
