"""`--target gptq`: the AutoGPTQ / GPTQModel checkpoint layout (targets.md §3), v1 or v2 zero points.

Also home of `IntWeightWriter`, what the three weight-only int targets (gptq, awq, marlin) share:
integer codes only, fp16 scales [G, N], one bit width and group size per checkpoint.
"""

from __future__ import annotations

import re

import torch

from ct_convert import bitpack
from ct_convert.errors import UnsupportedConversion
from ct_convert.marlin_layout import pack_lsb
from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight
from ct_convert.safetensors_out import TensorSpec
from ct_convert.writers.base import RepackOptions, WriteReport, exact_cast, register
from ct_convert.writers.hf import HFWriter


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

    def group_size(self, info: ModuleInfo) -> int:
        """The config's group_size this module needs (-1: one group spanning K)."""
        s = info.scheme
        return s.group_size if s.strategy == "group" else -1

    def check(self, reader, opts: RepackOptions) -> None:
        super().check(reader, opts)
        kept = [i for i in reader.modules.values() if self.refusal(i, opts) is None]
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

    def unconverted(self, reader, report: WriteReport) -> list[str]:
        """Modules not held quantized: left unquantized by the source, plus dense fallbacks."""
        return sorted(set(reader.unquantized) | {f["module"] for f in report.fallbacks})

    def config_group_size(self, reader, opts: RepackOptions) -> int:
        sizes = {self.group_size(i) for i in reader.modules.values() if self.refusal(i, opts) is None}
        return sizes.pop() if sizes else -1

    def config_bits(self, reader, opts: RepackOptions) -> int:
        bits = {i.scheme.num_bits for i in reader.modules.values() if self.refusal(i, opts) is None}
        return bits.pop() if bits else self.bits[0]


# -- numerics the int targets share ----------------------------------------------------------------


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


def pack_along_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., C] -> int32 words, a dense LSB-first bit stream along the last dim."""
    if 8 % bits == 0:
        return pack_lsb(values, bits)
    return bitpack.pack(values, bits, bitpack.STREAM)


def dynamic_exclusions(modules: list[str]) -> dict[str, dict]:
    """GPTQModel `dynamic` negative matches: "-:^name$" leaves that module unquantized."""
    return {f"-:^{re.escape(m)}$": {} for m in modules}


# -- GPTQ ------------------------------------------------------------------------------------------


@register
class GPTQWriter(IntWeightWriter):
    name = "gptq"
    label = "GPTQ"
    bits = (2, 3, 4, 8)

    def layout_refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        b = info.scheme.num_bits
        n, k = info.shape
        if (k * b) % 32:
            return f"K={k}: {k} {b}-bit codes do not fill whole 32-bit qweight words"
        if (n * b) % 32:
            return f"N={n}: {n} {b}-bit zero points do not fill whole 32-bit qzeros words"
        return None

    def specs(self, info: ModuleInfo, opts: RepackOptions) -> list[TensorSpec]:
        b = info.scheme.num_bits
        n, k = info.shape
        g = info.num_groups
        return [
            TensorSpec("qweight", torch.int32, (k * b // 32, n)),
            TensorSpec("qzeros", torch.int32, (g, n * b // 32)),
            TensorSpec("scales", torch.float16, (g, n)),
            TensorSpec("g_idx", torch.int32, (k,)),
        ]

    def convert(self, qw: QuantizedWeight, opts: RepackOptions) -> dict[str, torch.Tensor]:
        b = qw.scheme.num_bits
        zeros = unsigned_zeros(qw)
        if opts.gptq_format == "v1":
            if bool((zeros == 0).any()):
                raise UnsupportedConversion(
                    f"{qw.name}: zero point {-(1 << (b - 1))} (unsigned 0) cannot be stored in GPTQ v1, "
                    "which stores zero - 1",
                    hint="Use --gptq-format v2, or --target awq for 4-bit weights.",
                )
            zeros = zeros - 1
        return {
            "qweight": self._qweight(qw),
            "qzeros": pack_along_last(zeros, b),
            "scales": fp16_scales(qw, self.label),
            "g_idx": qw.column_groups().to(torch.int32),
        }

    def _qweight(self, qw: QuantizedWeight) -> torch.Tensor:
        """[K*b/32, N]: a column-wise bit stream along K, i.e. `weight_packed` transposed when that is
        a dense stream with no padding bits (targets.md §0.2), else packed from the codes."""
        b = qw.scheme.num_bits
        packed = qw.packed_stream
        if packed is not None:
            return packed.t().contiguous()
        return pack_along_last(unsigned_codes(qw), b).t().contiguous()

    def quantization_config(self, reader, report: WriteReport, opts: RepackOptions) -> dict:
        converted = [reader.modules[m] for m, e in report.modules.items() if e["status"] == "converted"]
        config = {
            "quant_method": "gptq",
            "bits": self.config_bits(reader, opts),
            "group_size": self.config_group_size(reader, opts),
            "desc_act": any(i.has_g_idx for i in converted),
            "sym": all(i.scheme.symmetric for i in converted),
            "checkpoint_format": "gptq_v2" if opts.gptq_format == "v2" else "gptq",
            "pack_dtype": "int32",
            "static_groups": False,
            "true_sequential": True,
            "damp_percent": 0.01,
            "lm_head": "lm_head" in {i.name for i in converted},
        }
        skipped = self.unconverted(reader, report)
        if skipped:
            config["dynamic"] = dynamic_exclusions(skipped)
        return config

