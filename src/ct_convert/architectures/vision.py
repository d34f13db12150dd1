"""Vision towers: what llama.cpp's `convert_hf_to_gguf.py --mmproj` writes into the projector file
its multimodal tools (libmtmd, `llama-mtmd-cli`, `llama-server --mmproj`) load beside the text
model: arch `clip`, `general.type mmproj`, `clip.*` keys, `v.*` / `mm.*` tensors.

One class per tower, in a table keyed by the HF `architectures` name, independent of the text
classes (architectures/__init__.py): the GGUF writer asks `lookup(config)` and writes a second file
from the tensors the class claims. Facts from llama-cpp-python 0.3.36's converter (`MmprojModel`,
`LlavaVisionModel`, `Gemma3VisionModel`, `Llama4VisionModel`) and what tools/mtmd/clip.cpp loads;
see docs/gguf-architectures.md.
"""

from __future__ import annotations

import math
import os
from functools import cached_property, partial
from pathlib import Path
from typing import Callable

import gguf
import torch

from ct_convert.architectures import hf_architecture
from ct_convert.architectures.base import ModelBase, Part, rope_rows
from ct_convert.architectures.gemma import norm_plus_one
from ct_convert.errors import InputError, UnsupportedConversion
from ct_convert.jsonfile import load_json
from ct_convert.regular_files import require_regular

VISION: dict[str, type["VisionTower"]] = {}


def register(*hf_names: str):
    def deco(cls: type[VisionTower]) -> type[VisionTower]:
        for name in hf_names:
            VISION[name] = cls
        return cls

    return deco


def lookup(config: dict) -> type["VisionTower"] | None:
    """The tower class of config.json's architecture, or None when none is registered."""
    return VISION.get(hf_architecture(config))


def in_tower(model, cls: type["VisionTower"] | None, hf_name: str) -> bool:
    """A tensor or module of the vision tower or projector, not of the text model (`model`, whose
    `towers` name its own idea of them)."""
    return model.in_tower(hf_name) or (cls is not None and cls.in_tower(hf_name))


def for_projector(projector_type: str) -> type["VisionTower"] | None:
    """The class an mmproj file's `clip.projector_type` names."""
    return next((c for c in VISION.values() if c.projector_type == projector_type), None)


class VisionTower:
    """A vision encoder and its projector as llama.cpp's clip graph for `projector_type` computes them.
    Built from the source's config.json and preprocessor_config.json (`from_source`, which refuses,
    with UnsupportedConversion, what the converter or clip.cpp cannot take), or from an mmproj file's
    metadata (`from_gguf`, to read one back)."""

    projector_type: str
    prefixes: tuple[str, ...] = ()  # HF names of the tower's tensors start with one of these
    # duck-typed like a text class for targets/gguf/mapping.py: clip.cpp has no per-tensor `.scale`
    # (NVFP4 is written dense) and no tensor forced to F32 by its slot (see forced_type)
    f32_slots = frozenset()
    nvfp4_slots = frozenset()

    def __init__(self, n_layers: int, n_head: int, vision: dict | None = None, config: dict | None = None, preprocessor: dict | None = None):
        self.n_layers = n_layers
        self.n_head = n_head
        self.vision = vision or {}
        self.config = config or {}
        self.preprocessor = preprocessor or {}

    @classmethod
    def from_source(cls, config: dict, root: Path) -> "VisionTower":
        vision = config.get("vision_config")
        if not isinstance(vision, dict):
            raise UnsupportedConversion("config.json has no vision_config")
        for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "image_size", "patch_size"):
            whole(vision, key, "config.json: vision_config.")
        tower = cls(vision["num_hidden_layers"], vision["num_attention_heads"], vision, config, _preprocessor(root))
        whole({"hidden_size": tower.text_hidden}, "hidden_size", "config.json: the text model's ")
        for key in ("image_mean", "image_std"):
            values = tower.preprocessor.get(key)
            if not isinstance(values, list) or not values or not all(_finite(x) for x in values):
                raise UnsupportedConversion(
                    f"preprocessor_config.json: {key} is {values!r}, not a list of numbers (llama.cpp normalizes images with it)"
                )
        tower.check(root)
        return tower

    @classmethod
    def from_gguf(cls, field: Callable[[str], object], token_id: Callable[[str], int | None]) -> "VisionTower":
        """`field(key)`: an mmproj metadata value or None; `token_id(text)`: the id of a token in the
        text model's vocabulary, or None."""
        counts = [field(k) for k in ("clip.vision.block_count", "clip.vision.attention.head_count")]
        if not all(isinstance(c, int) and c > 0 for c in counts):
            raise InputError(f"clip.vision.block_count / attention.head_count are {counts}, not positive counts")
        return cls(*counts)

    def check(self, root: Path) -> None:
        """Refuse a config the converter refuses or the clip graph computes differently."""

    @property
    def text_hidden(self):
        return ModelBase.text_config(self.config).get("hidden_size")

    @cached_property
    def names(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, self.n_layers)

    # -- metadata ------------------------------------------------------------------------------
    def add_hparams(self, w: gguf.GGUFWriter) -> None:
        """MmprojModel.set_gguf_parameters (vision only), then the projector's own keys."""
        v = self.vision
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(int(self.text_hidden))
        w.add_vision_image_size(int(v["image_size"]))
        w.add_vision_patch_size(int(v["patch_size"]))
        w.add_vision_embedding_length(int(v["hidden_size"]))
        w.add_vision_feed_forward_length(int(v["intermediate_size"]))
        w.add_vision_block_count(self.n_layers)
        w.add_vision_head_count(self.n_head)
        w.add_vision_image_mean([float(x) for x in self.preprocessor["image_mean"]])
        w.add_vision_image_std([float(x) for x in self.preprocessor["image_std"]])
        w.add_clip_projector_type(self.projector_type)
        self.add_projector_hparams(w)

    def add_projector_hparams(self, w: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    # -- tensors -------------------------------------------------------------------------------
    @classmethod
    def in_tower(cls, hf_name: str) -> bool:
        return cls.hf_prefixless(hf_name).startswith(cls.prefixes)

    @staticmethod
    def hf_prefixless(hf_name: str) -> str:
        """transformers 5 saves some VL models' towers under `model.` (`model.vision_tower.…`); real
        checkpoints, and the names llama.cpp's converter maps, have none."""
        return hf_name.removeprefix("model.")

    def is_dropped(self, hf_name: str) -> bool:
        """A tower tensor the converter skips."""
        return False

    def hf_name(self, hf_name: str) -> str:
        """The name the converter maps (its filter_tensors renames)."""
        return self.hf_prefixless(hf_name)

    def modify_tensors(self, hf_name: str) -> list[Part] | None:
        """The mmproj tensors one tower tensor becomes (None: none corresponds)."""
        g = self.names.get_name(self.hf_name(hf_name), try_suffixes=(".weight", ".bias"))
        return None if g is None else [Part(g, None, self.row_order(hf_name))]

    def row_order(self, hf_name: str) -> Callable[[int], torch.Tensor] | None:
        return None

    def copies(self, hf_name: str) -> list[Part]:
        """mmproj tensors copied from rows of a text-model tensor (which the text file holds too)."""
        return []

    def forced_type(self, hf_name: str, gguf_name: str) -> str | None:
        """The ggml type the converter forces whatever the file type (tensor_force_quant, and
        prepare_tensors' F32 for position embeddings); None: the rules every tensor follows."""
        if ".patch_embd.weight" in gguf_name or ".patch_merger.weight" in gguf_name or gguf_name.startswith("v.position_embd."):
            return "F32"
        return None

    def stored_value(self, hf_name: str, value: torch.Tensor) -> torch.Tensor:
        """What the converter stores for a carried tower tensor (ModelBase.stored_value)."""
        return value


def _finite(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def whole(d: dict, key: str, where: str, default: int | None = None) -> int:
    """A whole number in 1..2^32-1 (GGUF stores counts as uint32), or `default` when absent."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**32:
        raise UnsupportedConversion(f"{where}{key} is {value!r}, not a whole number in 1..2^32-1")
    return value


def positive(d: dict, key: str, where: str, default: float | None = None) -> float:
    value = d.get(key, default)
    if not _finite(value) or value <= 0:
        raise UnsupportedConversion(f"{where}{key} is {value!r}, not a finite positive number")
    return float(value)


def _preprocessor(root: Path) -> dict:
    """preprocessor_config.json, then processor_config.json's image_processor over it (as the
    converter merges them)."""
    merged: dict = {}
    for name, inner in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        path = root / name
        if os.path.lexists(path):
            require_regular(path)
            cfg = load_json(path)
            if isinstance(cfg, dict):
                merged.update(cfg)
                if isinstance(cfg.get(inner), dict):
                    merged.update(cfg[inner])
    return merged


def _token_id(root: Path, token: str) -> int | None:
    """A special token's id as LlavaVisionModel.get_token_id finds it: tokenizer_config.json's
    added_tokens_decoder, else tokenizer.json's added_tokens."""
    for name, get in (("tokenizer_config.json", _decoder_ids), ("tokenizer.json", _added_ids)):
        path = root / name
        if os.path.lexists(path):
            require_regular(path)
            found = get(load_json(path)).get(token)
            if found is not None:
                return found
    return None


def _decoder_ids(cfg) -> dict[str, int]:
    decoder = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
    if not isinstance(decoder, dict):
        return {}
    return {t["content"]: int(i) for i, t in decoder.items() if isinstance(t, dict) and isinstance(t.get("content"), str) and str(i).isdigit()}


def _added_ids(tok) -> dict[str, int]:
    added = tok.get("added_tokens") if isinstance(tok, dict) else None
    if not isinstance(added, list):
        return {}
    return {t["content"]: t["id"] for t in added if isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)}


@register("Mistral3ForConditionalGeneration")
class PixtralVision(VisionTower):
    """Mistral-3's Pixtral encoder (LlavaVisionModel): llama's Q/K row order with the vision head
    count, and `v.token_embd.img_break`, the text embedding's row of `[IMG_BREAK]`, which clip.cpp
    requires. The converter never writes that row for HF-layout checkpoints (it drops every
    `language_model.` tensor before it could), so its mmproj cannot load; ct-convert writes it."""

    projector_type = gguf.VisionProjectorType.PIXTRAL
    prefixes = ("multi_modal_projector.", "vision_tower.")

    def __init__(self, *args, img_break: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.img_break = img_break

    @classmethod
    def from_gguf(cls, field, token_id):
        tower = super().from_gguf(field, token_id)
        tower.img_break = token_id("[IMG_BREAK]")
        return tower

    def check(self, root: Path) -> None:
        if self.vision.get("model_type") != "pixtral":
            raise UnsupportedConversion(f"vision model_type {self.vision.get('model_type')!r}: llama.cpp's converter takes only pixtral here")
        if self.vision.get("hidden_act") not in ("gelu", "silu"):
            raise UnsupportedConversion(f"vision hidden_act {self.vision.get('hidden_act')!r}: clip.cpp's pixtral graph runs gelu or silu")
        positive(self.vision, "layer_norm_eps", "config.json: vision_config.", 1e-5)
        if "spatial_merge_size" in self.config:
            whole(self.config, "spatial_merge_size", "config.json: ")
        self.img_break = _token_id(root, "[IMG_BREAK]")
        if not self.img_break:  # the converter writes no row for id 0 either
            raise UnsupportedConversion("no [IMG_BREAK] token in tokenizer_config.json or tokenizer.json (clip.cpp needs its embedding)")

    def add_projector_hparams(self, w: gguf.GGUFWriter) -> None:
        # modeling_pixtral.py hard-codes the eps; config.json does not hold it
        w.add_vision_attention_layernorm_eps(float(self.vision.get("layer_norm_eps", 1e-5)))
        if self.vision["hidden_act"] == "silu":
            w.add_vision_use_silu(True)
        else:
            w.add_vision_use_gelu(True)
        if "spatial_merge_size" in self.config:
            w.add_vision_spatial_merge_size(int(self.config["spatial_merge_size"]))

    def row_order(self, hf_name: str):
        if hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            return partial(rope_rows, n_head=self.n_head)
        return None

    def copies(self, hf_name: str) -> list[Part]:
        if not hf_name.endswith("embed_tokens.weight") or not self.img_break:  # the text model's embedding
            return []
        row = torch.tensor([self.img_break])
        return [Part(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK], None, lambda n: row)]


@register("Gemma3ForConditionalGeneration")
class Gemma3Vision(VisionTower):
    """Gemma-3's SigLIP encoder and projector (Gemma3VisionModel)."""

    projector_type = gguf.VisionProjectorType.GEMMA3
    prefixes = ("multi_modal_projector.", "vision_tower.", "multimodal_projector.", "vision_model.")

    def check(self, root: Path) -> None:
        positive(self.vision, "layer_norm_eps", "config.json: vision_config.", 1e-6)
        whole(self.preprocessor, "image_seq_length", "preprocessor_config.json: ", 256)

    def is_dropped(self, hf_name: str) -> bool:
        return "vision_model.head." in hf_name  # the converter skips SigLIP's pooling head

    def hf_name(self, hf_name: str) -> str:
        return super().hf_name(hf_name).replace("_weight", ".weight")  # multi_modal_projector.mm_input_projection_weight

    def add_projector_hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_vision_attention_layernorm_eps(float(self.vision.get("layer_norm_eps", 1e-6)))
        w.add_vision_use_gelu(True)
        # tokens per image side after the projector's pooling; written only when not the default 4
        per_side = int(int(self.preprocessor.get("image_seq_length", 256)) ** 0.5)
        factor = (int(self.vision["image_size"]) // int(self.vision["patch_size"])) // per_side if per_side else 0
        if factor > 0 and factor != 4:
            w.add_vision_projector_scale_factor(factor)

    def forced_type(self, hf_name: str, gguf_name: str) -> str | None:
        if "input_projection" in hf_name:
            return "F16"  # llama.cpp issue 13025
        if ".embeddings." in hf_name:
            return "F32"
        return super().forced_type(hf_name, gguf_name)

    def stored_value(self, hf_name: str, value: torch.Tensor) -> torch.Tensor:
        # the projector's Gemma RMSNorm; SigLIP's LayerNorms are stored as they are
        return norm_plus_one(value) if hf_name.endswith("soft_emb_norm.weight") else value


@register("Llama4ForConditionalGeneration")
class Llama4Vision(VisionTower):
    """Llama-4's vision model, adapter and projector (Llama4VisionModel)."""

    projector_type = gguf.VisionProjectorType.LLAMA4
    prefixes = ("multi_modal_projector.", "vision_model.")

    def check(self, root: Path) -> None:
        if self.vision.get("hidden_act") != "gelu":
            raise UnsupportedConversion(f"vision hidden_act {self.vision.get('hidden_act')!r}: llama.cpp's llama4 projector runs gelu only")
        positive(self.vision, "norm_eps", "config.json: vision_config.")
        if positive(self.vision, "pixel_shuffle_ratio", "config.json: vision_config.") > 1:
            raise UnsupportedConversion(f"config.json: vision_config.pixel_shuffle_ratio is {self.vision['pixel_shuffle_ratio']!r}, above 1")

    def add_projector_hparams(self, w: gguf.GGUFWriter) -> None:
        w.add_vision_attention_layernorm_eps(float(self.vision["norm_eps"]))
        w.add_vision_projector_scale_factor(int(1.0 / self.vision["pixel_shuffle_ratio"]))
        w.add_vision_use_gelu(True)

    def hf_name(self, hf_name: str) -> str:
        hf_name = super().hf_name(hf_name)
        return hf_name + ".weight" if hf_name.endswith("positional_embedding_vlm") else hf_name

    def modify_tensors(self, hf_name: str) -> list[Part] | None:
        if "multi_modal_projector.linear_1" in hf_name:  # one fully connected layer despite its name
            return [Part(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ_FC] + ".weight")]
        return super().modify_tensors(hf_name)
