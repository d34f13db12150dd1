"""OCP microscaling formats with E8M0 group-32 scales: MXFP4, MXFP6 and MXFP8 (§5.5–§5.7)."""

from __future__ import annotations


from ct_convert import bitpack, floatcodes
from ct_convert.errors import InputError
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.readers.formats.base import ModuleTensors, check_rank, register

# payload tensor, its dtype, encoding, K per stored column (as a fraction), unpacker
_LAYOUTS = {
    "mxfp4-pack-quantized": ("weight_packed", "U8", Encoding.FP4, (2, 1), bitpack.split_nibbles),
    "mxfp6-pack-quantized": ("weight_packed", "U8", Encoding.FP6, (4, 3), floatcodes.unpack_fp6),
    "mxfp8-quantized": ("weight", "F8_E4M3", Encoding.FP8, (1, 1), None),
}


@register
class MXDecoder:
    formats = tuple(_LAYOUTS)

    def describe(self, mt: ModuleTensors, fmt: str) -> ModuleInfo:
        payload, dtype, encoding, (num, den), _ = _LAYOUTS[fmt]
        args = mt.weights
        p = mt.expect_dtype(payload, dtype)
        check_rank(mt, payload, p)
        *lead, n, cols = p.shape
        if cols * num % den:
            raise InputError(f"tensor {mt.tensors[payload]}: {cols} bytes per row do not hold whole {fmt} codes")
        k = cols * num // den
        mt.expect_dtype("weight_scale", "U8")
        mt.check_scale("weight_scale", tuple(lead), n, k, args)
        return ModuleInfo(
            name=mt.name,
            format=fmt,
            shape=(*lead, n, k),
            dtype=mt.model_dtype,
            encoding=encoding,
            scheme=args.weight_scheme(),
            tensors=dict(mt.tensors),
        )

    def decode(self, mt: ModuleTensors, info: ModuleInfo) -> QuantizedWeight:
        payload, _, _, _, unpack = _LAYOUTS[info.format]
        exponents = mt.get("weight_scale")
        codes = (lambda: unpack(mt.get(payload))) if unpack else (lambda: mt.get(payload))
        return QuantizedWeight(
            info=info,
            scale=floatcodes.e8m0_to_float(exponents),
            extras={"weight_scale_e8m0": exponents},
            _codes=codes,
        )
