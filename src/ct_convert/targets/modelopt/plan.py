"""Which ModelOpt `quant_algo` each module gets, decided before any output exists: first from header
facts (`algorithm`), then from the few values that decide exactness (`build`): NVFP4 global scales,
static input scales, and the modules TensorRT-LLM fuses into one linear."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ct_convert.errors import InputError, UnsupportedConversion
from ct_convert.qweight import Encoding, ModuleInfo
from ct_convert.targets.modelopt import facts

if TYPE_CHECKING:  # writer_base is not needed at run time
    from ct_convert.targets.writer_base import RepackOptions


@dataclass(frozen=True)
class Algo:
    quant_algo: str
    group_size: int | None = None

    def entry(self) -> dict:
        return facts.layer_config(self.quant_algo, self.group_size)

    def label(self) -> str:
        return self.quant_algo + (f" g{self.group_size}" if self.group_size else "")


def algorithm(info: ModuleInfo) -> tuple[Algo | None, str | None]:
    """(Algo, None) for a module a ModelOpt checkpoint holds exactly, from header facts; else (None, why)."""
    s, act = info.scheme, info.input_activations
    if info.encoding is Encoding.DENSE or s is None:
        return None, "stored as float weights in the source (fake-quantized or sparse-only)"
    if info.name.rsplit(".", 1)[-1] == "lm_head":
        return None, "a quantized lm_head: TensorRT-LLM builds lm_head unquantized"
    if info.has_g_idx:
        return None, "act-order (g_idx): ModelOpt's int4 layout has no group index (use --target gptq)"
    if info.encoding is Encoding.INT:
        return _int_algorithm(info)
    if info.encoding is Encoding.FP8:
        return _fp8_algorithm(info)
    if info.encoding is Encoding.FP4 and info.format == "nvfp4-pack-quantized":
        if act is None:
            return Algo(facts.W4A16_NVFP4, facts.NVFP4_GROUP), None
        if (act.get("type"), act.get("num_bits"), act.get("strategy"), act.get("group_size"), act.get("dynamic")) == (
            "float", 4, "tensor_group", facts.NVFP4_GROUP, "local"
        ):
            return Algo(facts.NVFP4, facts.NVFP4_GROUP), None
        return None, "NVFP4 weights with activations other than NVFP4 (dynamic local, group 16) have no ModelOpt algorithm"
    if info.encoding is Encoding.FP4 and info.format == "mxfp4-pack-quantized":
        if act is None:
            return Algo(facts.W4A16_MXFP4, facts.MXFP4_GROUP), None
        return None, "MXFP4 weights with quantized activations: ModelOpt's W4A16_MXFP4 keeps activations in float"
    return None, f"{info.encoding.value} weights ({info.format}) have no ModelOpt layout"


def _int_algorithm(info: ModuleInfo) -> tuple[Algo | None, str | None]:
    s = info.scheme
    b, n, k = s.num_bits, info.out_features, info.in_features
    if info.input_activations:
        return None, f"int{b} weights with quantized activations: ModelOpt's int algorithms are weight-only"
    if not s.symmetric:
        return None, f"asymmetric int{b}: ModelOpt's int layouts have no zero points (use --target awq)"
    if b == 4 and s.strategy == "group":
        if s.group_size not in facts.INT4_GROUP_SIZES:
            return None, f"group size {s.group_size}: TensorRT-LLM's int4 kernels run groups of 64 and 128 only"
        if k % s.group_size or n % 2:
            return None, f"shape [{n}, {k}]: W4A16_AWQ needs K a multiple of the group size and N even"
        return Algo(facts.W4A16_AWQ, s.group_size), None
    if b == 8 and s.strategy == "channel":
        return Algo(facts.W8A16), None
    return None, (f"int{b} {s.strategy} weights: ModelOpt holds int4 in groups of 64 or 128 (W4A16_AWQ) "
                  "and int8 per channel (W8A16)")


def _fp8_algorithm(info: ModuleInfo) -> tuple[Algo | None, str | None]:
    s, act = info.scheme, info.input_activations
    if info.format == "mxfp8-quantized" or s.strategy == "group":
        return None, "MXFP8 / group-wise FP8 weights have no ModelOpt algorithm that TensorRT-LLM loads here"
    if not act or act.get("type") != "float" or act.get("num_bits") != 8:
        return None, ("FP8 weights without FP8 activations: ModelOpt's FP8 algorithms quantize activations too "
                      "and would change the model (use --target dense)")
    dynamic, strategy = act.get("dynamic"), act.get("strategy")
    if s.strategy == "tensor" and dynamic is False and strategy == "tensor":
        return Algo(facts.FP8), None
    if s.strategy == "tensor" and dynamic is True and strategy == "tensor":
        return Algo(facts.FP8), None  # no input_scale: TensorRT-LLM quantizes each input per tensor
    if s.strategy in ("tensor", "channel") and dynamic is True and strategy == "token":
        return Algo(facts.FP8_PER_CHANNEL_PER_TOKEN), None  # a tensor scale is the same scale on every channel
    if (s.strategy == "block" and tuple(s.block_structure or ()) == (facts.FP8_BLOCK,) * 2 and dynamic is True
            and strategy == "group" and act.get("group_size") == facts.FP8_BLOCK):
        return Algo(facts.FP8_BLOCK_SCALES, facts.FP8_BLOCK), None
    return None, (f"FP8 {s.strategy} weights with {'dynamic' if dynamic else 'static'} {strategy} activations: "
                  "ModelOpt has FP8 (tensor, static or dynamic per tensor), FP8_PER_CHANNEL_PER_TOKEN and "
                  "FP8_BLOCK_SCALES (128x128 weights, dynamic group-128 activations)")


# -- exact global scales ------------------------------------------------------------------------

# every finite positive E4M3 value (codes 0x01..0x7E; 0x7F is NaN) and every non-zero E2M1 magnitude
E4M3_VALUES = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
E2M1_MAGNITUDES = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _candidates(x: torch.Tensor, steps: int = 2) -> list[torch.Tensor]:
    """float32 1/x, then its neighbours outward, nearest first."""
    r = (1.0 / x).to(torch.float32)
    out, up, down = [r], r, r
    for _ in range(steps):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(0.0))
        out += [up, down]
    return out


def weight_scale_2(global_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """ModelOpt's `weight_scale_2` for compressed-tensors' reciprocal `weight_global_scale` g, one per value
    of g, or None where none is exact.

    compressed-tensors dequantizes v * (s / g), ModelOpt v * (s * weight_scale_2), both in float32 and
    rounded once to the model dtype. A candidate is exact when the two agree for every E4M3 block scale s
    and every E2M1 value v, i.e. whatever the codes and block scales are.
    """
    g = global_scale.to(torch.float32).reshape(-1)
    found = [_exact_weight_scale_2(gi, dtype) for gi in g.tolist()]
    return None if None in found else torch.tensor(found, dtype=torch.float32)


@functools.lru_cache(maxsize=4096)
def _exact_weight_scale_2(g: float, dtype: torch.dtype) -> float | None:
    gi = torch.tensor(g, dtype=torch.float32)
    if not torch.isfinite(gi) or gi <= 0:
        return None
    want = (E2M1_MAGNITUDES[:, None] * (E4M3_VALUES / gi)[None, :]).to(dtype)
    for c in _candidates(gi):
        if torch.equal((E2M1_MAGNITUDES[:, None] * (E4M3_VALUES * c)[None, :]).to(dtype), want):
            return c.item()
    return None


def input_scale(input_global_scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """ModelOpt's activation `input_scale` for compressed-tensors' `input_global_scale` g (its reciprocal),
    and whether it is exact: TensorRT-LLM quantizes activations with 1 / input_scale, which equals g
    bit for bit when exact, and is the nearest float32 to it otherwise."""
    g = input_global_scale.to(torch.float32).reshape(-1)[0]
    for c in _candidates(g):
        if torch.equal((1.0 / c).to(torch.float32), g):
            return c, True
    return _candidates(g, 0)[0], False


# -- the checkpoint -----------------------------------------------------------------------------


@dataclass
class Algorithms:
    algos: dict[str, Algo]  # modules written quantized
    reasons: dict[str, str | None]  # every module: why it cannot be, or None
    kv_cache: bool
    notes: list[str] = field(default_factory=list)
    # without `read_values` (inspect): the modules whose scale values still decide, and what they decide
    pending: dict[str, str] = field(default_factory=dict)


NVFP4_VALUES = "whether the NVFP4 global scales have exact ModelOpt counterparts (read from the data)"


def build(reader, opts: RepackOptions, read_values: bool = True) -> Algorithms:
    """The quant_algo of every module and why others have none. Without `read_values`, from header
    facts alone: the checks that read scale values are left `pending`."""
    reasons: dict[str, str | None] = {}
    algos: dict[str, Algo] = {}
    notes: list[str] = []
    inexact_inputs = []
    pending: dict[str, str] = {}
    for name, info in reader.modules.items():
        algo, why = algorithm(info)
        if algo is not None:
            why = _value_refusal(reader, info, algo, opts, inexact_inputs, read_values)
            if why is None and not read_values and algo.quant_algo in (facts.NVFP4, facts.W4A16_NVFP4):
                pending[name] = NVFP4_VALUES
        reasons[name] = why
        if why is None:
            algos[name] = algo
    if inexact_inputs:
        notes.append(
            f"NVFP4 input_scale: no float32 value x has 1/x equal to input_global_scale in {len(inexact_inputs)} "
            f"module(s) ({', '.join(inexact_inputs[:3])}{', ...' if len(inexact_inputs) > 3 else ''}); input_scale is "
            "the float32 nearest 1/input_global_scale, so TensorRT-LLM's activation multiplier differs from it by one "
            "float32 ulp (weights are unaffected; written so because --approx-input-scales was given)"
        )
    _fused(reader, algos, reasons, notes, read_values)
    _consumer_notes(algos, notes)
    return Algorithms(algos, reasons, _kv_cache(reader), notes, {m: why for m, why in pending.items() if m in algos})


def _consumer_notes(algos: dict[str, Algo], notes: list[str]) -> None:
    """Exact ModelOpt algorithms that not every ModelOpt consumer runs (README: which loads what)."""
    used = {a.quant_algo for a in algos.values()}
    if facts.W4A16_NVFP4 in used:
        notes.append("W4A16_NVFP4: vLLM and SGLang load it; TensorRT-LLM's QuantAlgo has no W4A16_NVFP4")
    dense_mx = [m for m, a in algos.items() if a.quant_algo == facts.W4A16_MXFP4 and ".experts." not in m]
    if dense_mx:
        notes.append(f"W4A16_MXFP4 outside MoE experts ({dense_mx[0]}, ...): TensorRT-LLM runs W4A16_MXFP4 only in "
                     "fused MoE experts and has no linear method for it")


def _value_refusal(reader, info: ModuleInfo, algo: Algo, opts: RepackOptions, inexact: list[str], read_values: bool) -> str | None:
    extras = reader.module_extras(info.name)
    if algo.quant_algo == facts.FP8 and info.input_activations.get("dynamic") is False and "input_scale" not in extras:
        return "static FP8 activations without an input_scale tensor"
    if algo.quant_algo in (facts.NVFP4, facts.W4A16_NVFP4):
        if reader.tensor_meta(info.tensors["weight_scale"]).dtype != "F8_E4M3":
            return "NVFP4 block scales not stored as FP8 E4M3: ModelOpt's weight_scale is FP8 E4M3"
        dtype = opts.dtype or info.dtype
        if read_values and weight_scale_2(_scalar_check(reader, info.tensors["weight_global_scale"]), dtype) is None:
            return (f"weight_global_scale: no float32 weight_scale_2 makes ModelOpt's FP8 scale x weight_scale_2 "
                    f"dequantize to the same {str(dtype).removeprefix('torch.')} weights as compressed-tensors' "
                    "FP8 scale / weight_global_scale")
    if algo.quant_algo == facts.NVFP4:
        if "input_global_scale" not in extras:
            return "NVFP4 activations without an input_global_scale tensor"
        if not read_values:
            return None
        g = _scalar_check(reader, extras["input_global_scale"])
        if g.numel() != 1:
            return f"input_global_scale has {g.numel()} values; ModelOpt stores one input_scale per linear"
        if not input_scale(g)[1]:
            if not opts.approx_input_scales:
                return ("input_global_scale has no float32 reciprocal that TensorRT-LLM inverts back to it exactly "
                        "(pass --approx-input-scales to accept one float32 ulp on the activation scale; weights stay exact)")
            inexact.append(info.name)
    return None


def _scalar_check(reader, tensor: str) -> torch.Tensor:
    t = reader.get(tensor).to(torch.float32)
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise InputError(f"tensor {tensor}: global scale is zero, negative, NaN or Inf")
    return t


def _siblings(present: set[str], name: str) -> list[str]:
    """The modules TensorRT-LLM fuses with `name` (itself included), among the checkpoint's linears."""
    parent, _, leaf = name.rpartition(".")
    for group in facts.FUSED_SIBLINGS:
        if leaf in group:
            return [f"{parent}.{m}" for m in group if f"{parent}.{m}" in present]
    return [name]


def _fused(reader, algos: dict[str, Algo], reasons: dict[str, str | None], notes: list[str], read_values: bool) -> None:
    """TensorRT-LLM loads q/k/v (gate/up, ...) into one linear with one quantization: every member must be
    written the same way, NVFP4 ones with one weight_scale_2 and one input_scale (its loader asserts it)."""
    present = set(reader.modules) | set(reader.unquantized)
    changed = True
    while changed:  # a member falling back to float takes its siblings with it
        changed = False
        for name in list(algos):
            group = _siblings(present, name)
            kinds = {m: algos.get(m) for m in group}
            if len(set(kinds.values())) > 1:
                other = next(m for m in group if kinds[m] != algos[name])
                how = kinds[other].label() if kinds[other] else "unquantized"
                reasons[name] = f"TensorRT-LLM fuses it with {other}, which is written {how}"
                del algos[name]
                changed = True
    if not read_values:
        return
    differing_fp8 = []
    for name in sorted(algos):
        group = _siblings(present, name)
        if len(group) < 2 or name != group[0]:
            continue
        algo = algos[name].quant_algo
        if algo in (facts.NVFP4, facts.W4A16_NVFP4):
            why = _nvfp4_group_refusal(reader, group, algo)
            if why:
                for m in group:
                    reasons[m] = why
                    del algos[m]
        elif algo == facts.FP8 and not _same(reader, group, lambda m: reader.modules[m].tensors["weight_scale"]):
            differing_fp8.append(name.rpartition(".")[0])
    if differing_fp8:
        notes.append(
            f"FP8 fused projections with different weight scales ({', '.join(differing_fp8[:3])}"
            f"{', ...' if len(differing_fp8) > 3 else ''}): written as they are; TensorRT-LLM (rescale_fused_weights) "
            "and vLLM re-quantize such q/k/v and gate/up to their largest scale when they load them"
        )


def _same(reader, group: list[str], tensor_of) -> bool:
    values = [reader.get(tensor_of(m)).to(torch.float32).reshape(-1) for m in group]
    return all(torch.equal(values[0], v) for v in values[1:])


def _nvfp4_group_refusal(reader, group: list[str], algo: str) -> str | None:
    joined = "/".join(m.rpartition(".")[2] for m in group)
    if not _same(reader, group, lambda m: reader.modules[m].tensors["weight_global_scale"]):
        return (f"{joined} have different weight_global_scale values; TensorRT-LLM fuses them and requires one "
                "weight_scale_2 (re-quantization would be needed)")
    if algo == facts.NVFP4 and not _same(reader, group, lambda m: reader.module_extras(m)["input_global_scale"]):
        return f"{joined} have different input_global_scale values; TensorRT-LLM fuses them and requires one input_scale"
    return None


def _kv_cache(reader) -> bool:
    names = [t for t in reader.passthrough() if t.rsplit(".", 1)[-1] in facts.KV_SCALE_NAMES]
    kv = reader.kv_cache_scheme
    if not names and kv is None:
        return False
    if kv is None or kv.type != "float" or kv.num_bits != 8 or kv.strategy != "tensor" or kv.dynamic or not kv.symmetric:
        raise UnsupportedConversion(
            "kv_cache_scheme: only a static, symmetric, per-tensor FP8 KV cache maps to kv_cache_quant_algo FP8",
            hint="Convert to --target dense (KV-cache scales are dropped there).",
        )
    for t in names:
        if reader.tensor_meta(t).numel != 1:
            raise UnsupportedConversion(f"tensor {t}: {reader.tensor_meta(t).numel} values; ModelOpt stores one KV scale per layer")
    return bool(names)
