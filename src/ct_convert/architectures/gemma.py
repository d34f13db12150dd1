"""Gemma-3: llama.cpp's `gemma3` graph, for `Gemma3ForCausalLM` and the text model of
`Gemma3ForConditionalGeneration` (`language_model.` names, numbers in text_config), as llama.cpp's
`Gemma3Model` (conversion/gemma.py) writes it: every `*norm.weight` stored as 1 + w (Gemma3RMSNorm
multiplies by 1 + w, llama.cpp's RMS norm by w), the token embedding cut to the tokenizer's real
vocabulary, sliding-window keys, no vocab_size and no rope.dimension_count; NEOX rope, so no row order.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import gguf
import torch

from ct_convert.architectures import register
from ct_convert.architectures.base import ModelBase, Part, _need, rope_kind
from ct_convert.errors import UnsupportedConversion
from ct_convert.jsonfile import load_json

SWA_PERIOD = 6  # llama.cpp's gemma3 loader (load_swa_pattern): layer il slides unless il % 6 == 5
# llama.cpp's TextModel: the first of these config keys present is the full / sliding rope theta
_THETA_KEYS = ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base")
_LOCAL_THETA_KEYS = ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq")
_LAYER_27B = 62  # llama.cpp scales gemma3's queries by n_embd / n_head instead of head_dim at this depth


def rope_views(config: dict) -> tuple[dict, dict]:
    """(full-attention, sliding-attention) rope parameters as llama.cpp's TextModel sees them, from a
    transformers-5 config (`rope_parameters` per layer type) or an older one (rope_scaling,
    rope_theta, rope_local_base_freq)."""
    params = config.get("rope_parameters", config.get("rope_scaling")) or {}
    if "full_attention" in params or "sliding_attention" in params:
        return params.get("full_attention", params), params.get("sliding_attention") or {}
    full = dict(params)
    theta = next((config[k] for k in _THETA_KEYS if k in config), None)
    local = next((config[k] for k in _LOCAL_THETA_KEYS if k in config), None)
    if "rope_theta" not in full and theta is not None:
        full["rope_theta"] = theta
    if "rope_type" not in full and full.get("type") is not None:
        full["rope_type"] = full["type"]
    return full, ({"rope_theta": local} if local is not None else {})


def norm_plus_one(value: torch.Tensor) -> torch.Tensor:
    """1 + w as llama.cpp's converter computes it: in the source dtype when that is float16 or
    float32, else (bfloat16) after widening to float32."""
    if value.dtype not in (torch.float16, torch.float32):
        value = value.to(torch.float32)
    return value + 1.0


@register("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
class Gemma3Model(ModelBase):
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    # the VL checkpoint's vision tower and projector: llama.cpp's mmproj file (old and new HF names)
    towers = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
    n_vocab_real: int | None = None  # rows of token_embd llama.cpp keeps; None: all

    # -- the config ----------------------------------------------------------------------------
    def check_config(self) -> None:
        config = self.config
        _need(config, "head_dim")
        if config.get("use_bidirectional_attention"):
            raise UnsupportedConversion("config.json: use_bidirectional_attention is set, but llama.cpp's gemma3 graph is causal")
        if config.get("attn_logit_softcapping") is not None:
            raise UnsupportedConversion("config.json: attn_logit_softcapping is set, but llama.cpp's gemma3 graph has no attention soft-capping")
        full, sliding = rope_views(config)
        if rope_kind(full) not in ("default", "linear"):
            raise UnsupportedConversion(f"config.json: rope scaling {rope_kind(full)!r} of the full-attention layers is not supported by --target gguf for gemma3")
        if rope_kind(sliding) != "default":
            raise UnsupportedConversion(
                f"config.json: rope scaling {rope_kind(sliding)!r} on the sliding-window layers, which llama.cpp's gemma3 graph never scales"
            )
        if self.sliding_window_written:
            _need(config, "sliding_window")
        self._check_layer_types()
        self._check_query_scale()

    @property
    def sliding_window_written(self) -> bool:
        # Gemma3Model.set_gguf_parameters writes the window unless the pattern is 1 (no sliding layer)
        return self.config.get("sliding_window_pattern") != 1

    def _check_layer_types(self) -> None:
        """llama.cpp has no per-layer list: with a window, every layer slides but each 6th."""
        config, n = self.config, self.n_layers
        kinds = config.get("layer_types")
        if kinds is None:
            period = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", SWA_PERIOD))
            kinds = ["sliding_attention" if (i + 1) % int(period) else "full_attention" for i in range(n)]
        if not isinstance(kinds, list) or len(kinds) != n:
            raise UnsupportedConversion(f"config.json: layer_types does not list the {n} layers")
        swa = self.sliding_window_written and int(config["sliding_window"]) > 0
        theirs = ["sliding_attention" if swa and i % SWA_PERIOD != SWA_PERIOD - 1 else "full_attention" for i in range(n)]
        wrong = [i for i in range(n) if kinds[i] != theirs[i]]
        if wrong:
            i = wrong[0]
            raise UnsupportedConversion(
                f"config.json: layer_types makes layer {i} {kinds[i]}, but llama.cpp's gemma3 graph makes it {theirs[i]} "
                f"(every layer slides but each {SWA_PERIOD}th)",
                hint="The GGUF would compute a different model for contexts longer than the sliding window.",
            )

    def _check_query_scale(self) -> None:
        config = self.config
        hidden = int(config["hidden_size"])
        theirs = hidden // self.n_head if self.n_layers == _LAYER_27B else self.head_dim
        ours = config.get("query_pre_attn_scalar", 256)  # transformers' Gemma3TextConfig default
        if float(ours) != float(theirs):
            raise UnsupportedConversion(
                f"config.json: query_pre_attn_scalar is {ours}, but llama.cpp's gemma3 graph scales queries by 1/sqrt({theirs})"
            )

    def add_hparams(self, w: gguf.GGUFWriter, n_vocab: int) -> None:
        config = self.config
        full, sliding = rope_views(config)
        w.add_block_count(self.n_layers)
        w.add_context_length(int(config["max_position_embeddings"]))
        w.add_embedding_length(int(config["hidden_size"]))
        if config.get("intermediate_size"):
            w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
        if sliding.get("rope_theta") is not None:
            w.add_rope_freq_base_swa(float(sliding["rope_theta"]))
        if rope_kind(full) == "linear" and full.get("factor") is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(full["factor"]))
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        if self.sliding_window_written:
            w.add_sliding_window(int(config["sliding_window"]))

    @classmethod
    def from_gguf(cls, field) -> "ModelBase":
        model = super().from_gguf(field)
        tokens = field("tokenizer.ggml.tokens")
        model.n_vocab_real = len(tokens) if tokens else None  # a loadable file has one embedding row per token
        return model

    def bind_source(self, root) -> None:
        """The vocabulary size llama.cpp cuts token_embd to (Gemma3Model.modify_tensors): that of
        the SentencePiece vocabulary it builds (vocab_size, else the model's piece count), else
        tokenizer.json's vocab plus added tokens; neither file: no cut."""
        root = Path(root)
        if (root / "tokenizer.model").is_file():
            self.n_vocab_real = int(self.config.get("vocab_size") or 0) or _spm_pieces(root / "tokenizer.model")
        elif (root / "tokenizer.json").is_file():
            tok = load_json(root / "tokenizer.json")
            vocab = (tok.get("model") or {}).get("vocab") if isinstance(tok, dict) else None
            if isinstance(vocab, (dict, list)):
                self.n_vocab_real = len(vocab) + len(tok.get("added_tokens") or [])

    # -- tensors -------------------------------------------------------------------------------
    def modify_tensors(self, hf_name: str) -> list[Part] | None:
        parts = super().modify_tensors(hf_name)
        if parts and parts[0].name == "token_embd.weight" and self.n_vocab_real is not None:
            return [Part(parts[0].name, parts[0].expert, partial(_first_rows, n_keep=self.n_vocab_real))]
        return parts

    def stored_value(self, hf_name: str, value: torch.Tensor) -> torch.Tensor:
        return norm_plus_one(value) if hf_name.endswith("norm.weight") else value


def _spm_pieces(path: Path) -> int | None:
    """The piece count of a SentencePiece model; None where it cannot be read (the vocabulary's
    conversion then refuses it with a clear error)."""
    try:
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(path)).vocab_size()
    except Exception:  # ImportError, or sentencepiece's own error types for a corrupt model
        return None


def _first_rows(n_rows: int, n_keep: int) -> torch.Tensor:
    return torch.arange(min(n_rows, n_keep))
