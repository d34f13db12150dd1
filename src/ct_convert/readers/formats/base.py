"""The decoder protocol: `describe` reads headers (and tiny tensors such as `weight_shape`) into a
ModuleInfo; `decode` turns that module's tensors into a QuantizedWeight with lazy codes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ct_convert.errors import InputError
from ct_convert.floatcodes import all_finite
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.readers.config import QuantArgs, QuantizationConfig, SchemeGroup
from ct_convert.tensorstore import DTYPE_NAMES, FLOAT_DTYPES, TensorMeta


@dataclass
class ModuleTensors:
    """The tensors of one module and what the config says about it."""

    name: str
    tensors: dict[str, str]  # parameter suffix -> checkpoint tensor name
    store: object  # TensorStore or SparseStore
    group: SchemeGroup | None
    config: QuantizationConfig
    model_dtype: torch.dtype

    def has(self, suffix: str) -> bool:
        return suffix in self.tensors

    def meta(self, suffix: str) -> TensorMeta:
        if suffix not in self.tensors:
            raise InputError(f"missing tensor {self.name}.{suffix}", hint=self.format_hint())
        return self.store.meta(self.tensors[suffix])

    def get(self, suffix: str) -> torch.Tensor:
        self.meta(suffix)
        return self.store.get(self.tensors[suffix])

    def format_hint(self) -> str:
        return "The checkpoint is incomplete or its quantization_config does not describe it."

    @property
    def weights(self) -> QuantArgs:
        if self.group is None or self.group.weights is None:
            raise InputError(f"{self.name}: quantized tensors but no config group with weights targets it")
        return self.group.weights

    def float_dtype(self, *suffixes: str) -> torch.dtype:
        """The first of these tensors with a 16/32-bit float dtype, else the model's dtype."""
        for s in suffixes:
            if s in self.tensors:
                dt = self.meta(s).torch_dtype
                if dt in (torch.bfloat16, torch.float16, torch.float32):
                    return dt
        return self.model_dtype

    def expect_dtype(self, suffix: str, *allowed: str) -> TensorMeta:
        m = self.meta(suffix)
        if m.dtype not in allowed:
            raise InputError(f"tensor {self.tensors[suffix]}: dtype {m.dtype}, expected {' or '.join(allowed)}")
        return m

    def expect_float_scale(self, suffix: str = "weight_scale") -> TensorMeta:
        """A scale stored as floats: F16/BF16/F32/F64, or the dtype the scheme's `scale_dtype` declares.
        Integer bits read as a float scale would convert without error and be wrong everywhere."""
        allowed = set(FLOAT_DTYPES)
        declared = getattr(torch, self.weights.scale_dtype or "", None)
        if isinstance(declared, torch.dtype) and declared.is_floating_point and declared in DTYPE_NAMES:
            allowed.add(DTYPE_NAMES[declared])
        return self.expect_dtype(suffix, *sorted(allowed))

    def trivial_zero_point(self, zp: torch.Tensor) -> None:
        """A symmetric scheme whose module still carries zero points: accepted only when they are all
        zero, since a symmetric reader ignores them and non-zero ones would change every weight."""
        if zp.numel() and bool(zp.ne(0).any()):
            raise InputError(
                f"tensor {self.tensors['weight_zero_point']}: non-zero zero points, but the config says symmetric: true",
                hint="The config and the tensors contradict each other: fix `symmetric` in config.json, "
                "or drop the zero points.",
            )

    def check_scale(self, suffix: str, lead: tuple[int, ...], n: int, k: int, args: QuantArgs) -> TensorMeta:
        """Validate a scale/zero-point tensor's element count against the strategy (§4.1)."""
        m = self.meta(suffix)
        want = expected_scale_shape(lead, n, k, args)
        if want is not None and not _shape_fits(m.shape, want, args.strategy):
            raise InputError(
                f"tensor {self.tensors[suffix]}: shape {list(m.shape)} does not fit a {args.strategy} scheme "
                f"for a weight of shape {[*lead, n, k]} (expected {list(want)})"
            )
        return m


def expected_scale_shape(lead: tuple[int, ...], n: int, k: int, args: QuantArgs) -> tuple[int, ...] | None:
    s = args.strategy
    if s == "tensor":
        return (*lead, 1) if lead else (1,)
    if s == "channel":
        return (*lead, n, 1)
    if s in ("group", "tensor_group"):
        return (*lead, n, math.ceil(k / args.group_size))
    if s == "block":
        bh, bw = args.block_structure
        return (*lead, math.ceil(n / bh), math.ceil(k / bw))
    return None


def _shape_fits(shape: tuple[int, ...], want: tuple[int, ...], strategy: str) -> bool:
    if tuple(shape) == want:
        return True
    if strategy == "tensor":  # [] and [1] both occur (§4.4); per-expert [E] or [E, 1]
        return math.prod(shape) == math.prod(want)
    if strategy == "channel":  # [N] occurs in third-party files
        return tuple(shape) == want[:-1]
    return False


def check_rank(mt: ModuleTensors, suffix: str, meta: TensorMeta) -> None:
    if len(meta.shape) not in (2, 3):
        raise InputError(f"tensor {mt.tensors[suffix]}: expected a 2-D (or 3-D stacked experts) tensor, got {list(meta.shape)}")


class Decoder(Protocol):
    formats: tuple[str, ...]

    def describe(self, mt: ModuleTensors, fmt: str) -> ModuleInfo: ...

    def decode(self, mt: ModuleTensors, info: ModuleInfo) -> QuantizedWeight: ...


DECODERS: dict[str, Decoder] = {}


def register(cls: Callable[[], Decoder]):
    inst = cls()
    for f in inst.formats:
        DECODERS[f] = inst
    return cls


def decoder_for(fmt: str) -> Decoder:
    try:
        return DECODERS[fmt]
    except KeyError:
        raise InputError(f"no decoder for compression format {fmt!r}") from None


def load_scale(mt: ModuleTensors, suffix: str = "weight_scale") -> torch.Tensor:
    t = mt.get(suffix)
    if t.is_floating_point() and t.dtype.itemsize >= 2 and not all_finite(t):
        raise InputError(f"tensor {mt.tensors[suffix]}: contains NaN or Inf scales")
    return t
