"""One module's ModelOpt tensors per algorithm (facts.py's table): specs from header facts, tensors
from the decoded module. Codes and scales move as they are; only the int4 nibble pairs change axis."""

from __future__ import annotations

import math

import torch

from ct_convert import bitpack
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.safetensors_out import TensorSpec
from ct_convert.targets import int4_rows
from ct_convert.targets.modelopt import facts
from ct_convert.targets.modelopt.plan import Algo, input_scale, weight_scale_2
from ct_convert.targets.writer_base import exact_cast


def specs(info: ModuleInfo, algo: Algo, dtype: torch.dtype, has_input_scale: bool) -> list[TensorSpec]:
    *lead, n, k = info.shape
    lead = tuple(lead)
    a = algo.quant_algo
    if a == facts.W4A16_AWQ:
        out = [("weight", torch.uint8, (*lead, n // 2, k)), ("weight_scale", dtype, (*lead, n, k // algo.group_size)),
               ("pre_quant_scale", dtype, (*lead, k))]
    elif a == facts.W8A16:
        out = [("weight", torch.int8, (*lead, n, k)), ("weight_scale", dtype, (*lead, n))]
    elif a == facts.FP8:
        out = [("weight", torch.float8_e4m3fn, (*lead, n, k)), ("weight_scale", torch.float32, lead)]
        if has_input_scale:
            out.append(("input_scale", torch.float32, ()))
    elif a == facts.FP8_PER_CHANNEL_PER_TOKEN:
        out = [("weight", torch.float8_e4m3fn, (*lead, n, k)), ("weight_scale", torch.float32, (*lead, n))]
    elif a == facts.FP8_BLOCK_SCALES:
        b = facts.FP8_BLOCK
        out = [("weight", torch.float8_e4m3fn, (*lead, n, k)),
               ("weight_scale", torch.float32, (*lead, math.ceil(n / b), math.ceil(k / b)))]
    elif a in (facts.NVFP4, facts.W4A16_NVFP4):
        out = [("weight", torch.uint8, (*lead, n, k // 2)),
               ("weight_scale", torch.float8_e4m3fn, (*lead, n, k // facts.NVFP4_GROUP)),
               ("weight_scale_2", torch.float32, lead)]
        if a == facts.NVFP4:
            out.append(("input_scale", torch.float32, ()))
    elif a == facts.W4A16_MXFP4:
        out = [("weight", torch.uint8, (*lead, n, k // 2)), ("weight_scale", torch.uint8, (*lead, n, k // facts.MXFP4_GROUP))]
    else:
        raise AssertionError(a)
    return [TensorSpec(name, dt, shape) for name, dt, shape in out]


def tensors(qw: QuantizedWeight, algo: Algo, dtype: torch.dtype, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`extras`: the module's activation qparams (input_scale, input_global_scale) as the source stores them."""
    a = algo.quant_algo
    *lead, n, k = qw.shape
    lead = tuple(lead)
    if a == facts.W4A16_AWQ:
        scale = exact_cast(qw.group_scales(), dtype, f"{qw.name}.weight_scale")
        stream = qw.packed_stream if k % 8 == 0 else None  # whole words per row: moved without unpacking
        weight = int4_rows.from_stream(stream) if stream is not None else int4_rows.pack(qw.codes)
        return {"weight": weight, "weight_scale": scale,
                "pre_quant_scale": torch.ones((*lead, k), dtype=dtype)}
    if a == facts.W8A16:
        return {"weight": qw.codes, "weight_scale": exact_cast(qw.group_scales().reshape(*lead, n), dtype, f"{qw.name}.weight_scale")}
    if a in (facts.FP8, facts.FP8_PER_CHANNEL_PER_TOKEN, facts.FP8_BLOCK_SCALES):
        scale = qw.scale.to(torch.float32)  # every float scale widens to float32 exactly
        if a == facts.FP8:
            scale = scale.reshape(*lead, -1)[..., 0] if lead else scale.reshape(-1)[0]
        elif a == facts.FP8_PER_CHANNEL_PER_TOKEN:
            scale = qw.group_scales().to(torch.float32).reshape(*lead, n).contiguous()
        out = {"weight": qw.codes, "weight_scale": scale}
        if "input_scale" in extras:
            out["input_scale"] = extras["input_scale"].to(torch.float32).reshape(-1)[0]
        return out
    if a in (facts.NVFP4, facts.W4A16_NVFP4):
        w2 = weight_scale_2(qw.global_scale, dtype)
        if w2 is None:  # the plan refused such modules
            raise AssertionError(f"{qw.name}: no exact weight_scale_2")
        # one global scale may serve every stacked expert
        w2 = w2.reshape(lead) if w2.numel() == math.prod(lead) else w2.reshape(()).expand(lead).contiguous()
        out = {"weight": bitpack.pack_nibbles(qw.codes), "weight_scale": qw.scale.to(torch.float8_e4m3fn), "weight_scale_2": w2}
        if a == facts.NVFP4:
            out["input_scale"] = input_scale(extras["input_global_scale"])[0]
        return out
    if a == facts.W4A16_MXFP4:
        return {"weight": bitpack.pack_nibbles(qw.codes), "weight_scale": qw.extras["weight_scale_e8m0"]}
    raise AssertionError(a)
