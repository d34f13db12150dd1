"""What the three weight-only int targets (gptq, awq, marlin) share: integer codes only, fp16
scales [G, N], one bit width and group size per checkpoint, and the code/zero/scale conversions."""

from __future__ import annotations

import torch

from ct_convert.errors import UnsupportedConversion
from ct_convert.plan import Plan
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.targets.hf_writer import HFWriter
from ct_convert.targets.writer_base import RepackOptions, exact_cast


class IntWeightWriter(HFWriter):
    """Base of the weight-only int targets; subclasses add `layout_refusal` and the per-module output."""

    bits: tuple[int, ...] = ()
    label = ""

    def refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        if info.encoding is Encoding.DENSE:
            return "weights are stored unquantized (dense); there are no integer codes to repack"
        s = info.scheme
        if info.encoding is not Encoding.INT or s is None or s.type != "int":
            return f"{s.num_bits if s else '?'}-bit {info.encoding.value} weights; {self.label} holds integer codes only"
        if len(info.shape) != 2:
            return f"stacked expert weights {list(info.shape)}; {self.label} stores one 2-D linear per module"
        if info.input_activations:
            return f"its input activations are quantized too; {self.label} checkpoints are weight-only and would drop that"
        if s.num_bits not in self.bits:
            return f"{s.num_bits}-bit weights; {self.label} holds {'/'.join(map(str, self.bits))}-bit only"
        if s.strategy not in ("group", "channel", "tensor"):
            return f"{s.strategy} quantization; {self.label} has groups along K only"
        return self.layout_refusal(info, opts)

    def layout_refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        raise NotImplementedError

    def at_repack(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        checks = [self.data_check(info, opts)]
        if info.dtype != torch.float16:
            checks.insert(0, f"{self.label} stores fp16 scales: every {str(info.dtype).removeprefix('torch.')} scale must be exact in fp16")
        return "; ".join(c for c in checks if c) or None

    def data_check(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        """What `convert` refuses on the data of this module beyond fp16 scales, or None."""
        return None

    def group_size(self, info: ModuleInfo) -> int:
        """The config's group_size this module needs (-1: one group spanning K)."""
        s = info.scheme
        return s.group_size if s.strategy == "group" else -1

    def check_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        kept = [reader.modules[m] for m in plan.converted()]
        for what, key in (("bit widths", lambda i: i.scheme.num_bits), ("group sizes", self.group_size)):
            seen = {}
            for info in kept:
                seen.setdefault(key(info), info.name)
            if len(seen) > 1:
                (a, na), (b, nb) = sorted(seen.items())[:2]
                raise UnsupportedConversion(
                    f"{na} ({a}) and {nb} ({b}): a {self.label} config holds one of each, this checkpoint mixes {what}",
                    hint="Convert to --target dense, or keep the checkpoint in compressed-tensors.",
                )

    def unconverted(self, plan: Plan, reader: SourceReader) -> list[str]:
        """Modules not held quantized: left unquantized by the source, plus dense fallbacks."""
        return sorted(set(reader.unquantized) | {f["module"] for f in plan.fallbacks})

    def config_group_size(self, plan: Plan, reader: SourceReader) -> int:
        sizes = {self.group_size(reader.modules[m]) for m in plan.converted()}
        return sizes.pop() if sizes else -1

    def config_bits(self, plan: Plan, reader: SourceReader) -> int:
        bits = {reader.modules[m].scheme.num_bits for m in plan.converted()}
        return bits.pop() if bits else self.bits[0]


def unsigned_codes(qw: QuantizedWeight) -> torch.Tensor:
    """uint8 [N, K]: u = s + 2^(b-1), computed on the bytes (the add wraps exactly into [0, 2^b))."""
    return qw.codes.view(torch.uint8) + (1 << (qw.scheme.num_bits - 1))


def unsigned_zeros(qw: QuantizedWeight) -> torch.Tensor:
    """uint8 [G, N] unsigned zero points; 2^(b-1) everywhere for a symmetric module."""
    b = qw.scheme.num_bits
    z = qw.group_zero_points()
    if z is None:
        return torch.full((qw.num_groups, qw.out_features), 1 << (b - 1), dtype=torch.uint8)
    return (z.to(torch.int16) + (1 << (b - 1))).to(torch.uint8).t().contiguous()


def fp16_scales(qw: QuantizedWeight, label: str) -> torch.Tensor:
    """fp16 [G, N] scales, refused when any source value is not exactly an fp16 value."""
    s = qw.group_scales().t().contiguous()
    try:
        return exact_cast(s, torch.float16, f"{qw.name}.weight_scale")
    except UnsupportedConversion as e:
        raise UnsupportedConversion(
            f"{e} ({label} stores fp16 scales)",
            hint="Convert to --target dense, or keep the checkpoint in compressed-tensors.",
        ) from None


def require_plain_g_idx(qw: QuantizedWeight, label: str) -> None:
    if not qw.has_trivial_g_idx():
        raise UnsupportedConversion(
            f"{qw.name}: act-order g_idx (not k // group_size) cannot be stored in {label}",
            hint="Use --target gptq, which keeps g_idx (desc_act: true).",
        )
