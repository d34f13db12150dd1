"""`naive-quantized`, `int-quantized`, `float-quantized`: one unpacked layout under three names (§5.2)."""

from __future__ import annotations

import torch

from ct_convert.errors import InputError
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.readers.formats.base import ModuleTensors, check_rank, load_scale, register


@register
class NaiveDecoder:
    formats = ("naive-quantized", "int-quantized", "float-quantized")

    def describe(self, mt: ModuleTensors, fmt: str) -> ModuleInfo:
        args = mt.weights
        if args.type == "int":
            w = mt.expect_dtype("weight", "I8")
            encoding = Encoding.INT
        else:
            if args.num_bits != 8:
                raise InputError(f"{mt.name}: {fmt} stores float weights as FP8 only, the config says {args.num_bits} bits")
            w = mt.expect_dtype("weight", "F8_E4M3")
            encoding = Encoding.FP8
        check_rank(mt, "weight", w)
        *lead, n, k = w.shape
        mt.expect_float_scale()
        mt.check_scale("weight_scale", tuple(lead), n, k, args)
        if not args.symmetric and not mt.has("weight_zero_point"):
            raise InputError(f"missing tensor {mt.name}.weight_zero_point: the scheme is asymmetric")
        if mt.has("weight_zero_point"):
            mt.check_scale("weight_zero_point", tuple(lead), n, k, args)
        return ModuleInfo(
            name=mt.name,
            format=fmt,
            shape=w.shape,
            dtype=mt.float_dtype("weight_scale"),
            encoding=encoding,
            scheme=args.weight_scheme(),
            tensors=dict(mt.tensors),
        )

    def decode(self, mt: ModuleTensors, info: ModuleInfo) -> QuantizedWeight:
        zp = None
        if mt.has("weight_zero_point"):
            raw = mt.get("weight_zero_point")
            if info.scheme.symmetric:
                mt.trivial_zero_point(raw)
            else:
                zp = raw.to(torch.float32).round().to(torch.int16) if raw.is_floating_point() else raw.to(torch.int16)
        if info.encoding is Encoding.INT:
            lo, hi = -(1 << (info.scheme.num_bits - 1)), (1 << (info.scheme.num_bits - 1)) - 1

            def codes():
                q = mt.get("weight")
                if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
                    raise InputError(f"tensor {mt.tensors['weight']}: codes outside the {info.scheme.num_bits}-bit range")
                return q
        else:
            codes = lambda: mt.get("weight")  # noqa: E731
        return QuantizedWeight(info=info, scale=load_scale(mt), zero_point=zp, _codes=codes)
