"""`dense`: float weights, possibly fake-quantized (on the grid, with qparams beside them) or sparse-only."""

from __future__ import annotations

from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.readers.formats.base import ModuleTensors, register
from ct_convert.tensorstore import FLOAT_DTYPES
from ct_convert.errors import InputError


@register
class DenseDecoder:
    formats = ("dense", "sparse-bitmask", "sparse-24-bitmask")

    def describe(self, mt: ModuleTensors, fmt: str) -> ModuleInfo:
        m = mt.meta("weight")
        if m.dtype not in FLOAT_DTYPES:
            raise InputError(f"tensor {mt.tensors['weight']}: a dense weight must be float, got {m.dtype}")
        scheme = mt.group.weights.weight_scheme() if mt.group and mt.group.weights else None
        return ModuleInfo(
            name=mt.name,
            format=fmt,
            shape=m.shape,
            dtype=m.torch_dtype,
            encoding=Encoding.DENSE,
            scheme=scheme,
            tensors=dict(mt.tensors),
        )

    def decode(self, mt: ModuleTensors, info: ModuleInfo) -> QuantizedWeight:
        return QuantizedWeight(info=info, _dense=lambda: mt.get("weight"))
