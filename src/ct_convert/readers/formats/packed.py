"""`pack-quantized`: INT 1–8 bit codes packed into int32 words along K (compressed-tensors.md §5.3, §8.3)."""

from __future__ import annotations

import torch

from ct_convert import bitpack
from ct_convert.errors import InputError
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.readers.formats.base import ModuleTensors, check_rank, load_scale, register

LAYOUT_A_SINCE = (0, 18)  # dense bit stream (#732); older versions used floor(32/b) codes per word


@register
class PackedDecoder:
    formats = ("pack-quantized",)

    def describe(self, mt: ModuleTensors, fmt: str) -> ModuleInfo:
        args = mt.weights
        if args.type != "int":
            raise InputError(f"{mt.name}: pack-quantized needs int weights, the config says {args.type}")
        b = args.num_bits
        packed = mt.expect_dtype("weight_packed", "I32")
        check_rank(mt, "weight_packed", packed)
        shape = self._shape(mt, packed.shape)
        *lead, n, k = shape
        layout = choose_layout(mt, b, k, n, packed.shape[-1])
        mt.expect_float_scale()
        mt.check_scale("weight_scale", tuple(lead), n, k, args)
        if not args.symmetric or mt.has("weight_zero_point"):
            self._check_zero_point(mt, tuple(lead), n, k, b, layout)
        if mt.has("weight_g_idx"):
            g = mt.expect_dtype("weight_g_idx", "I32", "I64")
            if g.shape != (k,):
                raise InputError(f"tensor {mt.tensors['weight_g_idx']}: shape {list(g.shape)}, expected [{k}]")
        return ModuleInfo(
            name=mt.name,
            format=fmt,
            shape=shape,
            dtype=mt.float_dtype("weight_scale"),
            encoding=Encoding.INT,
            scheme=args.weight_scheme(),
            tensors=dict(mt.tensors),
            layout=layout,
        )

    @staticmethod
    def _shape(mt: ModuleTensors, packed_shape: tuple[int, ...]) -> tuple[int, ...]:
        name = mt.tensors.get("weight_shape", f"{mt.name}.weight_shape")
        raw = mt.get("weight_shape")
        if raw.dtype not in (torch.int64, torch.int32) or raw.numel() != len(packed_shape):
            raise InputError(f"tensor {name}: expected {len(packed_shape)} integers, got {list(raw.shape)} {raw.dtype}")
        shape = tuple(int(v) for v in raw.reshape(-1).tolist())
        if any(v <= 0 for v in shape) or shape[:-1] != tuple(packed_shape[:-1]):
            raise InputError(
                f"tensor {name}: weight shape {list(shape)} does not match weight_packed {list(packed_shape)}"
            )
        return shape

    @staticmethod
    def _check_zero_point(mt, lead, n, k, b, layout) -> None:
        args = mt.weights
        if not mt.has("weight_zero_point"):
            raise InputError(
                f"missing tensor {mt.name}.weight_zero_point: the scheme is asymmetric",
                hint="The checkpoint is incomplete, or its config should say symmetric: true.",
            )
        zm = mt.meta("weight_zero_point")
        g = (mt.meta("weight_scale").shape or (1,))[-1]
        name = mt.tensors["weight_zero_point"]
        if zm.dtype == "I8" or args.strategy == "tensor":
            mt.check_scale("weight_zero_point", lead, n, k, args)
            return
        if zm.dtype != "I32":
            raise InputError(f"tensor {name}: dtype {zm.dtype}, expected I32 (packed) or I8")
        rows = bitpack.packed_width(n, b, layout)
        if tuple(zm.shape) != (*lead, rows, g):
            raise InputError(f"tensor {name}: shape {list(zm.shape)}, expected {[*lead, rows, g]} (packed along N)")

    def decode(self, mt: ModuleTensors, info: ModuleInfo) -> QuantizedWeight:
        b = info.scheme.num_bits
        offset = 1 << (b - 1)
        k, n = info.in_features, info.out_features

        read_once: list[torch.Tensor] = []

        def packed() -> torch.Tensor:
            if not read_once:
                read_once.append(mt.get("weight_packed"))
            return read_once[0]

        def codes_rows(start: int, stop: int) -> torch.Tensor:
            u = bitpack.unpack(packed()[..., start:stop, :], b, k, info.layout)
            # u - 2^(b-1) wraps modulo 256 and reads back as the signed code: one pass, no widening
            return u.sub_(offset).view(torch.int8)

        def codes() -> torch.Tensor:
            return codes_rows(0, n)

        zp = None
        if not info.scheme.symmetric or mt.has("weight_zero_point"):
            raw = mt.get("weight_zero_point")
            if raw.dtype == torch.int32 and info.scheme.strategy != "tensor":
                u = bitpack.unpack(raw.transpose(-1, -2).contiguous(), b, n, info.layout).transpose(-1, -2)
                zp = (u.to(torch.int16) - offset).to(torch.int8)
            else:
                zp = raw.to(torch.int8)
            lo, hi = -offset, offset - 1
            if zp.numel() and (int(zp.min()) < lo or int(zp.max()) > hi):
                raise InputError(f"tensor {mt.tensors['weight_zero_point']}: zero points outside [{lo}, {hi}]")
            if info.scheme.symmetric:
                mt.trivial_zero_point(zp)
                zp = None
        g_idx = mt.get("weight_g_idx").to(torch.int32) if mt.has("weight_g_idx") else None
        if g_idx is not None:
            groups = mt.meta("weight_scale").shape[-1]
            if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                raise InputError(f"tensor {mt.tensors['weight_g_idx']}: group index outside [0, {groups})")
        stream = info.layout == bitpack.STREAM or 32 % b == 0
        return QuantizedWeight(
            info=info,
            scale=load_scale(mt),
            zero_point=zp,
            g_idx=g_idx,
            _codes=codes,
            _codes_rows=codes_rows,
            _packed=packed if stream else None,
        )


def choose_layout(mt: ModuleTensors, b: int, k: int, n: int, width: int) -> str:
    """Which bit layout a 3/5/6/7-bit file uses (§8.3); 1/2/4/8-bit layouts are identical."""
    name = mt.tensors["weight_packed"]
    fits = [lay for lay in (bitpack.STREAM, bitpack.WORDS) if bitpack.packed_width(k, b, lay) == width]
    if not fits:
        raise InputError(
            f"tensor {name}: {width} words per row fit neither packing of {k} {b}-bit codes "
            f"({bitpack.packed_width(k, b, bitpack.STREAM)} or {bitpack.packed_width(k, b, bitpack.WORDS)})"
        )
    if len(fits) == 1 or 32 % b == 0 or k <= 32 // b:
        return fits[0]
    version = mt.config.version_tuple
    if version is not None:
        return bitpack.STREAM if version[:2] >= LAYOUT_A_SINCE else bitpack.WORDS
    if mt.has("weight_zero_point") and mt.meta("weight_zero_point").dtype == "I32":
        rows = mt.meta("weight_zero_point").shape[-2]
        by_zp = [lay for lay in fits if bitpack.packed_width(n, b, lay) == rows]
        if len(by_zp) == 1:
            return by_zp[0]
    # Without a version the file may come from <= 0.10 (floor(32/b) per word) or from a third-party
    # writer using the dense stream; both fit this width, and guessing could silently corrupt weights.
    raise InputError(
        f"tensor {name}: cannot tell which {b}-bit packing layout this file uses (no version in the config)",
        hint='Set quantization_config.version to the writing library\'s version ("0.17.0" or older: '
        'codes per word; "0.18.0" or newer: dense bit stream) and retry.',
    )
