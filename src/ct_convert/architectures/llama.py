"""Llama and Mistral: llama.cpp's `llama` graph, with its Q/K row order and llama3's `rope_freqs`."""

from __future__ import annotations

import math
from functools import partial

import gguf
import torch

from ct_convert.architectures import register
from ct_convert.architectures.base import ModelBase, rope_kind, rope_params, rope_rows, slot
from ct_convert.errors import InputError


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaModel(ModelBase):
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    rope_types = ModelBase.rope_types | {"llama3"}
    rope_pairs_rows = True
    writes_vocab_size = True
    trtllm_legacy = {}

    def row_order(self, gguf_name: str):
        # llama.cpp's NORM rope pairs rows 2i, 2i+1 of each head where HF pairs i, i + hd/2
        heads = {"attn_q": self.n_head, "attn_k": self.n_head_kv}.get(slot(gguf_name))
        return partial(rope_rows, n_head=heads) if heads else None

    def add_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_rope_dimension_count(self.head_dim)

    def extra_tensors(self) -> list[tuple[str, torch.Tensor]]:
        freqs = rope_freqs(self.config)
        return [] if freqs is None else [("rope_freqs.weight", freqs)]


def rope_freqs(config: dict) -> torch.Tensor | None:
    """llama3 rope scaling: llama.cpp reads per-dimension frequency divisors from `rope_freqs.weight`
    (F32 [head_dim/2]) instead of config keys; the factors follow Meta's llama3 schedule."""
    theta, params = rope_params(config)
    if rope_kind(params) != "llama3":
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
    if not bool(torch.isfinite(out).all()):  # equal low/high factors and a wavelength exactly on them: 0/0
        raise InputError("config.json: llama3 rope parameters give a non-finite frequency factor (a wavelength on equal low/high_freq_factor bounds)")
    return out.to(torch.float32)


@register("Mistral3ForConditionalGeneration")
class Mistral3Model(LlamaModel):
    """The text model of Mistral-3 (Mistral-Small-3.1): llama.cpp's `mistral3` graph, llama's Q/K row
    order, weights under `language_model.`. The vision tower and projector go to llama.cpp's separate
    mmproj file (`towers`; PixtralVision in architectures/vision.py writes it)."""

    gguf_arch = gguf.MODEL_ARCH.MISTRAL3
    trtllm_legacy = None
    towers = ("vision_tower.", "multi_modal_projector.")
