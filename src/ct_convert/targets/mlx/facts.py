"""Facts of the MLX / mlx-lm checkpoint layout that the writer and the output reader both rely on
(sources in NOTES-h4.md: mlx `ops.cpp` affine/fp (de)quantize, `backend/cpu/quantized.cpp`,
`backend/common/quantized.h`; mlx-lm `utils.load_model`, `quantize_model`, the model classes).

affine:  w = scales * q + biases, q the unsigned b-bit code. The codes of a row are one dense
         LSB-first bit stream along K held in uint32 words `weight` [.., N, K*b/32] (3-, 5- and
         6-bit codes straddle words); `scales`, `biases` [.., N, K/group] in the model dtype.
mxfp4 / nvfp4: E2M1 codes, two per byte, the low nibble first; mxfp8: E4M3 bytes; both viewed as
         uint32 words. One uint8 scale per group: E8M0 (2^(e-127)) for the mx modes, E4M3 for
         nvfp4. No biases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (128, 64, 32)  # what mlx.core.quantize accepts; the largest that fits is used
FLOAT_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}  # mode -> (bits, group size)
AFFINE = "affine"

# E2M1 magnitudes by the 3 low bits of a nibble; bit 3 is the sign (MLX's fp_dequantize table)
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E8M0_BIAS = 127

SAFETENSORS_METADATA = {"format": "mlx"}  # what mlx_lm.save_model writes

_EXPERTS = re.compile(r"^(?P<prefix>.+\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
_FUSED = re.compile(r"^(?P<prefix>.+\.mlp)\.experts\.(?P<proj>gate_proj|up_proj|down_proj)$")
_MIXTRAL = re.compile(r"^(?P<prefix>.+\.block_sparse_moe)\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3)$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@dataclass(frozen=True)
class Architecture:
    """How the HF module names of one mlx-lm model type become mlx-lm's names."""

    model_type: str
    experts: str | None = None  # "mlp" (experts.{e}.{gate,up,down}_proj) | "mixtral" (experts.{e}.w1/2/3)
    expert_count: tuple[str, ...] = ()  # config keys holding the number of routed experts

    def locate(self, module: str) -> tuple[str, int | None]:
        """Source module -> (mlx-lm module path, expert index in the stacked `switch_mlp` tensor or None)."""
        if self.experts == "mlp":
            m = _EXPERTS.match(module)
            if m:
                return f"{m['prefix']}.switch_mlp.{m['proj']}", int(m["expert"])
            m = _FUSED.match(module)  # experts already stacked in one 3-D tensor
            if m:
                return f"{m['prefix']}.switch_mlp.{m['proj']}", None
        if self.experts == "mixtral":
            m = _MIXTRAL.match(module)
            if m:
                return f"{m['prefix']}.switch_mlp.{_MIXTRAL_PROJ[m['proj']]}", int(m["expert"])
        return module, None

    def num_experts(self, config: dict) -> int | None:
        for key in self.expert_count:
            if isinstance(config.get(key), int):
                return config[key]
        return None


_MOE = ("num_experts", "num_local_experts")
ARCHITECTURES = {
    a.model_type: a
    for a in (
        Architecture("llama"),
        Architecture("mistral"),  # mlx-lm runs it with its llama class
        Architecture("qwen2"),
        Architecture("qwen3"),
        Architecture("gemma3_text"),
        Architecture("phi3"),
        Architecture("qwen2_moe", "mlp", _MOE),
        Architecture("qwen3_moe", "mlp", _MOE),
        Architecture("mixtral", "mixtral", ("num_local_experts",)),
        Architecture("deepseek_v3", "mlp", ("n_routed_experts",)),
        Architecture("kimi_k2", "mlp", ("n_routed_experts",)),  # mlx-lm maps it to deepseek_v3
        Architecture("glm4_moe", "mlp", ("n_routed_experts",)),
    )
}


def architecture(config: dict) -> Architecture | None:
    return ARCHITECTURES.get(config.get("model_type"))
