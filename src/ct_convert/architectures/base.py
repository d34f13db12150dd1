"""What every model architecture class says: HF tensor names -> GGUF tensors (gguf-py's name map),
hyper-parameter keys, per-tensor transforms (row orders, splits, expert stacking), the tensors
llama.cpp keeps in F32 or can scale per tensor (gguf.md §3.1–§3.5). One subclass per architecture,
registered by its HF `architectures` names (architectures/__init__.py), in the spirit of llama.cpp's
`convert_hf_to_gguf.py` ModelBase registry. The GGUF writer and the GGUF reader both ask it, so a
name or row order is decided in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import gguf
import torch

from ct_convert.errors import InputError, UnsupportedConversion

# per-expert HF modules; llama.cpp only knows the stacked 3-D tensor of each (layer, projection)
_EXPERT = re.compile(r"^(?P<prefix>.+\.(?:mlp|feed_forward)\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")

# tensors no llama.cpp graph reads: recomputed by the engine
_DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Part:
    """One GGUF tensor made from (part of) a source tensor.

    Several sources naming one GGUF tensor with an `expert` index are stacked into it (a merge);
    one source yielding several parts is cut into them (a split); `select` picks and orders the
    source rows a part holds, given the source's row count (the whole source, in order, when None).
    `heads` views the picked rows [heads · r, K] as a 3-D [heads, r, K] (the same bytes, row by row);
    `transpose` then swaps each head's two axes to [heads, K, r] (MLA's attn_k_b), which moves
    values across rows: such a part is written from float values, never from a source's blocks.
    """

    name: str
    expert: int | None = None
    select: Callable[[int], torch.Tensor] | None = None
    heads: int | None = None
    transpose: bool = False

    def rows(self, n_rows: int) -> torch.Tensor | None:
        return None if self.select is None else self.select(n_rows)

    def shape(self, source: tuple[int, ...]) -> tuple[int, ...]:
        """The part's numpy shape, from its source's (rows are the next-to-last axis, the only one of a 1-D)."""
        if self.select is not None:
            n = len(self.select(source[-2] if len(source) > 1 else source[0]))
            source = (*source[:-2], n, source[-1]) if len(source) > 1 else (n,)
        if self.heads is not None:
            source = (*source[:-2], self.heads, source[-2] // self.heads, source[-1])
        return (*source[:-2], source[-1], source[-2]) if self.transpose else source

    def arrange(self, t: torch.Tensor) -> torch.Tensor:
        """The part's values from its source's."""
        rows = self.rows(t.shape[-2] if t.dim() > 1 else t.shape[0])
        if rows is not None:
            t = t.index_select(-2 if t.dim() > 1 else 0, rows)
        if self.heads is not None:
            t = t.reshape(*t.shape[:-2], self.heads, -1, t.shape[-1])
        return t.transpose(-1, -2) if self.transpose else t

    def flatten(self, v: torch.Tensor) -> torch.Tensor:
        """`arrange` undone up to the row selection: a part's values as its picked source rows [r, K]
        (for one expert's, or a 2-D part's, values; rows of blocks alike when neither heads nor transpose)."""
        if self.transpose:
            v = v.transpose(-1, -2)
        return v.reshape(-1, v.shape[-1]) if self.heads is not None else v


def expert_of(hf_name: str) -> tuple[str, int] | None:
    """`…experts.E.gate_proj.weight` -> (`…experts.gate_proj.weight`, E)."""
    m = _EXPERT.match(hf_name)
    if m is None:
        return None
    return f"{m['prefix']}.{m['proj']}.weight", int(m["e"])


def slot(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `attn_q`; `output.weight` -> `output`."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's NORM rope needs for HF q/k_proj: inside each head of hd rows, output row
    2i + j is HF row j·hd/2 + i (gguf.md §3.4). new = old.index_select(0, rope_rows(...))."""
    hd = n_rows // n_head
    return torch.arange(n_rows).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(-1)


def _need(config: dict, key: str):
    if config.get(key) is None:
        raise InputError(f"config.json: missing {key!r}, needed for the GGUF metadata")
    return config[key]


def rope_params(config: dict) -> tuple[float, dict]:
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), params


def rope_kind(params: dict) -> str:
    return params.get("rope_type") or params.get("type") or "default"


class ModelBase:
    """An architecture as llama.cpp's graph for `gguf_arch` computes it. Built from an HF config.json
    (`from_config`, which refuses what that graph would compute differently) or from a GGUF's
    metadata (`from_gguf`, for reading one back)."""

    gguf_arch: gguf.MODEL_ARCH
    hf_names: tuple[str, ...] = ()  # set by @register
    rope_types = frozenset({"default", "linear", "yarn"})
    f32_slots = frozenset({"ffn_gate_inp"})  # MoE router: llama.cpp's converter forces F32
    # tensor slots with a per-tensor `.scale` multiplier in llama.cpp (gguf.md §3.8): NVFP4's global factor
    nvfp4_slots = frozenset({
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
        "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "output",
    })  # fmt: skip
    rope_pairs_rows = False  # llama.cpp's rope rotates adjacent row pairs of HF's q/k (an even head_dim)
    moe = False  # every layer is a mixture of experts: its config's expert count is checked even without expert tensors
    mla = False  # multi-head latent attention (q_a/q_b, kv_a/kv_b): hparams checks its sizes instead of q/k/v_proj's
    # config.json keys TensorRT-LLM's legacy checkpoint adds for this model, which it holds under
    # Llama-family names (targets/trtllm_legacy); None: that target does not hold it
    trtllm_legacy: dict | None = None
    # name prefixes of parts llama.cpp keeps in another file: a vision tower and projector, written
    # as the mmproj file by their class in architectures/vision.py (or listed as not written, and said so)
    towers: tuple[str, ...] = ()
    # (config.json key, regex of the tensors whose rows it gives, in every layer): targets/gguf/hparams.py
    ffn_rows: tuple[tuple[str, str], ...] = (
        ("intermediate_size", r"model\.layers\.\d+\.mlp\.(?:gate|up)_proj\.weight"),
        ("moe_intermediate_size", r"model\.layers\.\d+\.mlp\.experts\.\d+\.(?:gate|up)_proj\.weight"),
    )
    # llama.cpp's converter writes `{arch}.vocab_size` for this class (the GGUF writer adds it anyway
    # when the file has no vocabulary: llama.cpp's loader then sizes the token table from it)
    writes_vocab_size = False
    mtp_key: str | None = None  # config key counting multi-token-prediction layers after the trunk's (the class keeps or drops them)

    def __init__(self, n_layers: int, n_head: int, n_head_kv: int, config: dict | None = None):
        self.n_layers = n_layers
        self.n_head = n_head
        self.n_head_kv = n_head_kv
        self.config = config or {}

    @staticmethod
    def text_config(config: dict) -> dict:
        """The config llama.cpp's converter reads (TextModel): text_config merged over the top level."""
        text = config.get("text_config")
        if text is not None and not isinstance(text, dict):
            raise InputError("config.json: text_config is not a JSON object")
        return {**config, **(text or {})}

    @classmethod
    def expert_layers(cls, config: dict, n_layers: int) -> set[int] | None:
        """The layers llama.cpp's graph builds with experts, where it decides that from the config."""
        return None

    @classmethod
    def from_config(cls, config: dict) -> "ModelBase":
        config = cls.text_config(config)
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "rms_norm_eps"):
            _need(config, key)
        n_head = int(config["num_attention_heads"])
        model = cls(int(config["num_hidden_layers"]), n_head, int(config.get("num_key_value_heads") or n_head), config)
        model.check_config()
        return model

    @classmethod
    def from_gguf(cls, field: Callable[[str], object]) -> "ModelBase":
        """`field(key)`: a GGUF metadata value or None."""
        name = gguf.MODEL_ARCH_NAMES[cls.gguf_arch]
        n_head = int(field(f"{name}.attention.head_count"))
        return cls(int(field(f"{name}.block_count")), n_head, int(field(f"{name}.attention.head_count_kv") or n_head))

    @property
    def name(self) -> str:
        """llama.cpp's name of the architecture (`general.architecture`)."""
        return self.gguf_arch_name()

    @classmethod
    def gguf_arch_name(cls) -> str:
        return gguf.MODEL_ARCH_NAMES[cls.gguf_arch]

    @cached_property
    def names(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)

    # -- the config ----------------------------------------------------------------------------
    def check_config(self) -> None:
        """Refuse configs whose model llama.cpp's graph would compute differently."""
        kind = rope_kind(rope_params(self.config)[1])
        if kind not in self.rope_types:
            raise UnsupportedConversion(f"config.json: rope scaling {kind!r} is not supported by --target gguf for this architecture")

    def add_hparams(self, w: gguf.GGUFWriter, n_vocab: int) -> None:
        config = self.config
        hidden = int(config["hidden_size"])
        if self.writes_vocab_size:
            w.add_vocab_size(n_vocab)
        w.add_context_length(int(config["max_position_embeddings"]))
        w.add_embedding_length(hidden)
        w.add_block_count(self.n_layers)
        if config.get("intermediate_size"):
            w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        theta, params = rope_params(config)
        w.add_rope_freq_base(theta)
        if config.get("head_dim"):
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        self.add_arch_hparams(w)
        kind = rope_kind(params)
        if kind in ("linear", "yarn"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(params["factor"]))
            if params.get("original_max_position_embeddings"):
                w.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))

    def add_arch_hparams(self, w: gguf.GGUFWriter) -> None:
        """Keys only this architecture has (written after the common ones, before rope scaling)."""

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or int(self.config["hidden_size"]) // self.n_head)

    def expert_count(self) -> int | None:
        for key in ("num_experts", "num_local_experts", "n_routed_experts"):
            if self.config.get(key):
                return int(self.config[key])
        return None

    def bind_source(self, root) -> None:
        """Read what the class needs from the source folder besides config.json (Gemma-3: the
        tokenizer's vocabulary size); files that are absent are simply not used."""

    def extra_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """GGUF tensors computed from the config alone (no source tensor)."""
        return []

    # -- tensors -------------------------------------------------------------------------------
    def is_dropped(self, hf_name: str) -> bool:
        """A source tensor (or module weight) no llama.cpp graph reads, or one of a tower written elsewhere."""
        return bool(_DROPPED.search(hf_name)) or self.in_tower(hf_name)

    def in_tower(self, hf_name: str) -> bool:
        return hf_name.startswith(self.towers)

    @staticmethod
    def converter_name(hf_name: str) -> str:
        """The name llama.cpp's converter maps (ModelBase.filter_tensors): `e_score_correction_bias`
        as a `.bias`, every `language_model.` removed (a VL checkpoint's text model)."""
        if hf_name.endswith("e_score_correction_bias"):
            hf_name = hf_name.removesuffix("_bias") + ".bias"
        return hf_name.replace("language_model.", "")

    def modify_tensors(self, hf_name: str) -> list[Part] | None:
        """The GGUF tensors one HF tensor becomes (None: it has no counterpart): per-expert tensors
        name one expert of a stacked tensor; subclasses add row orders and splits."""
        hf_name = self.converter_name(hf_name)
        stacked = expert_of(hf_name)
        g = self.names.get_name(stacked[0] if stacked else hf_name, try_suffixes=(".weight", ".bias"))
        if g is None:
            return None
        return [Part(g, stacked[1] if stacked else None, self.row_order(g))]

    def row_order(self, gguf_name: str) -> Callable[[int], torch.Tensor] | None:
        """How llama.cpp orders this tensor's rows, if not as in HF."""
        return None

    def stored_value(self, hf_name: str, value: torch.Tensor) -> torch.Tensor:
        """What llama.cpp's converter stores for a carried source tensor (its selected rows, in the
        source dtype), before the cast to the GGUF type: the value itself unless a class changes it."""
        return value

    @staticmethod
    def slot(gguf_name: str) -> str:
        return slot(gguf_name)
