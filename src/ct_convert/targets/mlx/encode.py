"""One compressed-tensors module as MLX tensors (writer side): which MLX mode holds it, whether its
stored values fit exactly, and the tensors themselves.

Integer codes move as they are: MLX's affine code is the unsigned code u = q + 2^(b-1), packed like
compressed-tensors >= 0.18 packs it (a dense LSB-first stream along K), so `weight_packed` words are
reused whenever they are that stream. Only the zero point changes form: MLX stores the bias
-z_u * s (z_u the unsigned zero point) in the scale dtype, which is exact for symmetric modules
(-2^(b-1) * s) and must be checked for asymmetric ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ct_convert import bitpack, floatcodes
from ct_convert.errors import UnsupportedConversion
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.targets.mlx.facts import AFFINE, AFFINE_BITS, AFFINE_GROUP_SIZES, FLOAT_MODES

_FLOAT_FORMATS = {  # compressed-tensors format -> the MLX mode that holds its codes exactly
    "mxfp4-pack-quantized": "mxfp4",
    "mxfp6-pack-quantized": "mxfp8",  # every E2M3 value is an E4M3 value; the E8M0 scales stay
    "mxfp8-quantized": "mxfp8",
    "nvfp4-pack-quantized": "nvfp4",
}


@dataclass(frozen=True)
class Params:
    """What one MLX quantized layer is: the per-module entry of config.json's `quantization`."""

    mode: str
    bits: int
    group_size: int

    def as_json(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def choose(info: ModuleInfo) -> tuple[Params | None, str | None]:
    """The MLX layer that holds this module exactly, from header facts; or why none does."""
    s = info.scheme
    if info.encoding is Encoding.DENSE or s is None:
        return None, "weights are stored unquantized (dense); there are no codes to repack"
    p, why = _mode(info)
    if why is None and info.input_activations:
        return None, "its input activations are quantized too; MLX weight-only layers would drop that"
    return p, why


def _mode(info: ModuleInfo) -> tuple[Params | None, str | None]:
    s = info.scheme
    k = info.in_features
    if info.encoding is Encoding.INT:
        if s.num_bits not in AFFINE_BITS:
            return None, f"{s.num_bits}-bit integer weights; MLX affine layers hold {'/'.join(map(str, AFFINE_BITS))}-bit"
        if s.strategy not in ("group", "channel", "tensor"):
            return None, f"{s.strategy} quantization; MLX groups run along K only"
        if s.actorder == "group":
            return None, "act-order (g_idx) cannot be stored in MLX (use --target gptq)"
        gs = info.effective_group_size
        g = next((g for g in AFFINE_GROUP_SIZES if k % g == 0 and gs % g == 0), None)
        if g is None:
            what = f"K={k}" if s.strategy != "group" else f"K={k} with group size {gs}"
            return None, f"{what}: no MLX group size ({', '.join(map(str, AFFINE_GROUP_SIZES))}) divides it"
        return Params(AFFINE, s.num_bits, g), None
    mode = _FLOAT_FORMATS.get(info.format)
    if mode is None:
        return None, (
            f"FP{s.num_bits} weights with {s.strategy} scales; MLX holds float codes only as mxfp4/mxfp8 "
            "(E8M0 scale per 32) or nvfp4 (E4M3 scale per 16)"
        )
    bits, gs = FLOAT_MODES[mode]
    if info.effective_group_size != gs or k % gs:
        return None, f"{info.format} with K={k}, group size {info.effective_group_size}; MLX {mode} needs groups of {gs}"
    return Params(mode, bits, gs), None


def specs(info: ModuleInfo, p: Params, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(suffix, dtype, shape) of every tensor the module becomes."""
    *lead, n, k = info.shape
    words = (*lead, n, k * p.bits // 32)
    groups = (*lead, n, k // p.group_size)
    if p.mode == AFFINE:
        return [("weight", torch.uint32, words), ("scales", dtype, groups), ("biases", dtype, groups)]
    return [("weight", torch.uint32, words), ("scales", torch.uint8, groups)]


def data_reason(qw: QuantizedWeight, p: Params, dtype: torch.dtype) -> str | None:
    """Why the stored scales / zero points cannot be written exactly (they are read, codes are not)."""
    if p.mode == AFFINE:
        if not qw.has_trivial_g_idx():
            return "act-order g_idx (not k // group_size) cannot be stored in MLX"
        name = str(dtype).removeprefix("torch.")
        bad = _not_exact(qw.group_scales().to(torch.float64), dtype)
        if bad:
            return f"{bad} stored scale(s) are not {name} values (MLX keeps scales in the model dtype)"
        bad = _not_exact(_biases(qw), dtype)
        if bad:
            return f"-z*s of {bad} group(s), from the stored scales and zero points, is not a {name} value (MLX stores the bias -z*s, not the zero point)"
    elif p.mode == "nvfp4":
        bad = _not_exact(_folded_nvfp4_scales(qw), torch.float8_e4m3fn)
        if bad:
            return f"the stored global scale does not fold exactly into {bad} E4M3 block scale(s) (MLX nvfp4 layers have no tensor scale)"
    return None


def encode(qw: QuantizedWeight, p: Params, dtype: torch.dtype, parts: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The module's MLX tensors (only `parts` of them when given: one expert's slice of a stacked
    tensor); raises UnsupportedConversion when a value would change."""
    why = data_reason(qw, p, dtype)
    if why is not None:
        raise UnsupportedConversion(
            f"{qw.name}: cannot be written as mlx: {why}",
            hint="Pass --keep-unsupported dense to write such modules dequantized, or choose another --target.",
        )
    makers = _affine(qw, p, dtype) if p.mode == AFFINE else _float(qw, p)
    return {name: make() for name, make in makers.items() if parts is None or name in parts}


def _affine(qw: QuantizedWeight, p: Params, dtype: torch.dtype) -> dict:
    # output group j lies inside source group (j * g) // gs: scales repeat when the source's groups are coarser
    index = torch.arange(0, qw.in_features, p.group_size, device=qw.device) // qw.effective_group_size
    return {
        "weight": lambda: _affine_words(qw, p.bits).view(torch.uint32),
        "scales": lambda: qw.group_scales().to(dtype).index_select(-1, index),
        "biases": lambda: _biases(qw).to(dtype).index_select(-1, index),
    }


def _float(qw: QuantizedWeight, p: Params) -> dict:
    def weight() -> torch.Tensor:
        if qw.encoding is Encoding.FP4:
            return bitpack.pack_nibbles(qw.codes).view(torch.uint32)
        if qw.encoding is Encoding.FP6:
            return e2m3_to_e4m3_bytes(qw.codes).view(torch.uint32)
        return qw.codes.contiguous().view(torch.uint8).view(torch.uint32)

    def scales() -> torch.Tensor:
        if p.mode == "nvfp4":
            return _folded_nvfp4_scales(qw).to(torch.float8_e4m3fn).view(torch.uint8)
        return qw.extras["weight_scale_e8m0"].reshape(*qw.shape[:-1], -1).contiguous()

    return {"weight": weight, "scales": scales}


def e2m3_to_e4m3_bytes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 FP6 E2M3 codes -> the E4M3 bytes of the same values (every E2M3 value is one)."""
    table = floatcodes.fp6_e2m3_to_float(torch.arange(64, dtype=torch.uint8)).to(torch.float8_e4m3fn).view(torch.uint8)
    return table.to(codes.device)[codes.to(torch.int64)]


def _affine_words(qw: QuantizedWeight, bits: int) -> torch.Tensor:
    """int32 [.., N, K*b/32]: the unsigned codes of each row as one LSB-first bit stream."""
    packed = qw.packed_stream
    if packed is not None and packed.shape[-1] * 32 == qw.in_features * bits:
        return packed
    u = qw.codes.view(torch.uint8) + (1 << (bits - 1))  # wraps into the unsigned code
    return bitpack.pack(u, bits, bitpack.STREAM)


def _biases(qw: QuantizedWeight) -> torch.Tensor:
    """-z_u * s per source group, exact in float64 (an integer of at most 8 bits times a float)."""
    offset = 1 << (qw.scheme.num_bits - 1)
    s = qw.group_scales().to(torch.float64)
    z = qw.group_zero_points()
    z_u = offset if z is None else z.to(torch.float64) + offset
    return -(z_u * s)


def _folded_nvfp4_scales(qw: QuantizedWeight) -> torch.Tensor:
    """The E4M3 block scales divided by the global divisor, in float64 (exact whenever the result is an E4M3 value)."""
    s = qw.scale.to(torch.float64).reshape(*qw.shape[:-1], -1)
    g = qw.global_scale.to(torch.float64).reshape(-1)
    g = g.reshape(-1, 1, 1) if len(qw.shape) == 3 and g.numel() > 1 else g[:1]
    return s / g


def _not_exact(values: torch.Tensor, dtype: torch.dtype) -> int:
    """How many float64 values change (or stop being finite) when stored as `dtype`."""
    back = values.to(dtype).to(torch.float64)
    same = (back == values) & torch.isfinite(back)
    return int((~same).sum())
