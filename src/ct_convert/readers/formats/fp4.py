"""`nvfp4-pack-quantized`: E2M1 codes two per byte, FP8 group-16 scales, a float32 global divisor (§5.4)."""

from __future__ import annotations

import torch

from ct_convert import bitpack
from ct_convert.errors import InputError
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.readers.formats.base import ModuleTensors, check_rank, register


@register
class NVFP4Decoder:
    formats = ("nvfp4-pack-quantized",)

    def describe(self, mt: ModuleTensors, fmt: str) -> ModuleInfo:
        args = mt.weights
        packed = mt.expect_dtype("weight_packed", "U8")
        check_rank(mt, "weight_packed", packed)
        *lead, n, half = packed.shape
        k = 2 * half
        if mt.has("weight_shape"):
            k = int(mt.get("weight_shape").reshape(-1)[-1])
            if k not in (2 * half, 2 * half - 1):
                raise InputError(f"tensor {mt.tensors['weight_shape']}: K={k} does not fit weight_packed {list(packed.shape)}")
        mt.expect_dtype("weight_scale", "F8_E4M3", "BF16", "F16", "F32")
        mt.check_scale("weight_scale", tuple(lead), n, k, args)
        if not mt.has("weight_global_scale"):
            raise InputError(f"missing tensor {mt.name}.weight_global_scale (NVFP4 needs its global scale)")
        return ModuleInfo(
            name=mt.name,
            format=fmt,
            shape=(*lead, n, k),
            dtype=mt.model_dtype,
            encoding=Encoding.FP4,
            scheme=args.weight_scheme(),
            tensors=dict(mt.tensors),
        )

    def decode(self, mt: ModuleTensors, info: ModuleInfo) -> QuantizedWeight:
        gs = mt.get("weight_global_scale").to(torch.float32)
        if not torch.isfinite(gs).all() or (gs == 0).any():
            raise InputError(f"tensor {mt.tensors['weight_global_scale']}: global scale is zero, NaN or Inf")
        scale = mt.get("weight_scale")
        if not torch.isfinite(scale.to(torch.float32)).all():
            raise InputError(f"tensor {mt.tensors['weight_scale']}: contains NaN scales")
        k = info.in_features
        return QuantizedWeight(
            info=info,
            scale=scale,
            global_scale=gs,
            _codes=lambda: bitpack.split_nibbles(mt.get("weight_packed"))[..., :k].contiguous(),
        )
