"""What a TensorRT-LLM checkpoint will hold, decided from header facts (and per-tensor scalars)
before any output exists: one quant_algo, each fused linear's mode, the carried tensors."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ct_convert.errors import InputError, UnsupportedConversion
from ct_convert.plan import REFUSED, ModulePlan, Plan
from ct_convert.qweight import Encoding, ModuleInfo
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.targets.trtllm_legacy.facts import COLUMN, K_TILE
from ct_convert.targets.writer_base import RepackOptions, refuse_online_transforms
from ct_convert.targets.trtllm_legacy.names import (
    ARCHITECTURES,
    IGNORABLE,
    Geometry,
    Linear,
    geometry,
    layer_linears,
    linear_of,
    replicated_name,
)

W4A16_AWQ, W4A16_GPTQ, W4A16, W8A16, FP8 = "W4A16_AWQ", "W4A16_GPTQ", "W4A16", "W8A16", "FP8"
GROUPWISE = (W4A16_AWQ, W4A16_GPTQ)
NEEDS_SM = (W4A16_GPTQ, W4A16, W8A16)  # layouts preprocessed in the checkpoint, per GPU family
GROUP_SIZES = (64, 128)  # CUTLASS fine-grained fpA_intB kernels
BITS = {W4A16_AWQ: 4, W4A16_GPTQ: 4, W4A16: 4, W8A16: 8}

QUANT, DENSE, FLOAT = "quant", "dense", "float"


def algorithm(info: ModuleInfo) -> tuple[str | None, str | None]:
    """(quant_algo, None) for a module TensorRT-LLM can hold exactly, else (None, reason)."""
    s = info.scheme
    if info.encoding is Encoding.DENSE or s is None:
        return None, "stored as float weights in the source (fake-quantized or sparse-only)"
    act = info.input_activations
    if info.has_g_idx:
        return None, "act-order (g_idx) is not supported by TensorRT-LLM's groupwise kernels"
    if info.encoding is Encoding.INT:
        if act is not None:
            return None, "activations are quantized too; TensorRT-LLM's int weight-only algorithms keep them in float"
        if s.strategy == "group" and s.num_bits == 4:
            if s.group_size not in GROUP_SIZES:
                return None, f"group size {s.group_size}: TensorRT-LLM's int4 groupwise kernels run only 64 and 128"
            return (W4A16_AWQ if s.symmetric else W4A16_GPTQ), None
        if s.strategy == "channel" and s.num_bits in (4, 8):
            if not s.symmetric:
                return None, "asymmetric per-channel int: TensorRT-LLM's W4A16/W8A16 are symmetric"
            return (W4A16 if s.num_bits == 4 else W8A16), None
        return None, f"int{s.num_bits} {s.strategy} weights have no TensorRT-LLM weight-only algorithm here"
    if info.encoding is Encoding.FP8:
        if s.strategy != "tensor":
            return None, f"FP8 {s.strategy} weights: only per-tensor FP8 (quant_algo FP8) is supported"
        if not act or act.get("dynamic") or act.get("strategy") != "tensor" or act.get("type") != "float":
            return None, "FP8 needs static per-tensor FP8 input scales (input_activations dynamic: false, strategy: tensor)"
        return FP8, None
    return None, f"{info.encoding.value} weights ({info.format}) have no TensorRT-LLM checkpoint layout here"


def module_refusal(info: ModuleInfo, opts: RepackOptions) -> str | None:
    if info.name == "lm_head":
        return "a quantized lm_head is not written (TensorRT-LLM's quantized lm_head path is unconfirmed)"
    if linear_of(info.name) is None:
        return "no counterpart in a TensorRT-LLM Llama checkpoint"
    algo, why = algorithm(info)
    if why:
        return why
    if algo in NEEDS_SM and opts.sm is None:
        return f"{algo} stores a GPU-specific layout: pass --sm 80, 89, 90 or 100"
    if info.out_features % opts.tp_size or info.in_features % opts.tp_size:
        return f"shape {list(info.shape)} does not split evenly over --tp-size {opts.tp_size}"
    return None


@dataclass
class LinearPlan:
    linear: Linear
    mode: str  # QUANT (the checkpoint's quant_algo), DENSE (dequantized fallback), FLOAT (float in the source)
    rows: tuple[int, ...]  # out_features of each fused part
    cols: int  # in_features
    bias: bool

    @property
    def n(self) -> int:
        return sum(self.rows)


@dataclass
class Layout:
    """The TensorRT-LLM checkpoint's own facts, behind the generic plan."""

    algo: str | None
    group_size: int | None
    dtype: torch.dtype
    tp: int
    sm: int | None
    geo: Geometry
    linears: list[LinearPlan]
    replicated: dict[str, str]  # source tensor -> TensorRT-LLM name
    lm_head: str  # "tensor": lm_head.weight; "module": quantized lm_head dequantized; "tied": the embedding
    kv_cache: bool
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    at_repack: dict[str, str] = field(default_factory=dict)  # inspect only: module -> what the data decides

    @property
    def exclude_modules(self) -> list[str] | None:
        if self.algo is None:
            return None
        dense = [lp.linear.name for lp in self.linears if lp.mode != QUANT]
        return ["*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                "*shared_expert_gate", *dense]


def _refusal(target: str, refused: list[tuple[str, str]], hint: str) -> UnsupportedConversion:
    name, why = refused[0]
    more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
    return UnsupportedConversion(f"{name}: cannot be written as {target}: {why}{more}", hint=hint)


def build(out: Plan, reader: SourceReader, opts: RepackOptions) -> Layout:
    """The checkpoint's layout; refusals go to `out` (module statuses, and raised unless inspecting),
    with what only the data decides noted per module when inspecting."""
    arch = reader.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedConversion(
            f"architecture {arch}: the {out.target} target writes only {', '.join(ARCHITECTURES)}",
            hint="Choose another --target for this model.",
        )
    refuse_online_transforms(reader, "The weights alone are not the model; ct-convert cannot port online transforms yet.")
    geo = geometry(reader.config)
    tp = opts.tp_size
    _check_tp(geo, tp)
    dtype = opts.dtype or reader.model_dtype
    keep = opts.keep_unsupported == "dense"

    reasons: dict[str, str] = {}
    algos: dict[str, str] = {}
    for name, info in reader.modules.items():
        why = module_refusal(info, opts)
        if why and (name != "lm_head" and linear_of(name) is None):
            raise _refusal(out.target, [(name, why)], f"The {out.target} target holds Llama-family decoder layers only; choose another --target.")
        if why:
            reasons[name] = why
        else:
            algos[name] = algorithm(info)[0]
    algo, group_size = _primary(reader, algos, reasons)
    if algo is not None and dtype not in (torch.float16, torch.bfloat16) and algo != FP8:
        raise UnsupportedConversion(
            f"dtype {dtype}: TensorRT-LLM's {algo} kernels need float16 or bfloat16 activations",
            hint="Pass --dtype bfloat16 or --dtype float16.",
        )

    names = set(reader.passthrough())
    pending: dict[str, str] | None = {} if out.inspecting else None
    linears = []
    refused: list[tuple[str, str]] = []
    refused_linears: list[LinearPlan] = []
    fallbacks: list[tuple[str, str]] = []
    for layer in range(geo.layers):
        for lin in layer_linears(layer):
            lp, bad = _plan_linear(reader, lin, geo, names, algo, group_size, reasons, tp, pending)
            if bad:
                if not keep:
                    refused.extend(bad)
                    refused_linears.append(lp)
                    continue
                fallbacks.extend(bad)
                lp.mode = DENSE
            linears.append(lp)
    planned = {p for lp in linears for p in lp.linear.parts}
    stray = [n for n in reader.modules if n != "lm_head" and n not in planned and not any(n in b for b in refused)]
    if stray:
        raise InputError(
            f"{stray[0]}: beyond num_hidden_layers {geo.layers} of config.json", hint="The checkpoint is inconsistent."
        )
    lm_head = "tensor"
    if "lm_head" in reader.modules:
        lm_head = "module"
        (fallbacks if keep else refused).append(("lm_head", reasons["lm_head"]))
    elif "lm_head.weight" not in names:
        if "model.embed_tokens.weight" not in names:
            raise InputError("lm_head.weight: missing, and no model.embed_tokens.weight to tie it to")
        lm_head = "tied"
    for module, why in refused:
        out.modules.setdefault(module, ModulePlan(REFUSED, why))
    if refused and all("--sm" in why for _, why in refused):
        out.refuse_modules(_refusal(out.target, refused, "Pass --sm with the GPU family that will run the engine (80 Ampere, 89 Ada, 90 Hopper, 100 Blackwell)."))
    elif refused:
        out.refuse_modules(_refusal(out.target, refused, "Pass --keep-unsupported dense to write such modules in float (listed in exclude_modules), "
                                    "or choose another --target."))

    layout = Layout(algo, group_size, dtype, tp, opts.sm, geo, linears, {}, lm_head, False, fallbacks, at_repack=pending or {})
    _carried(reader, layout, names, refused_linears, out.target)
    if algo is None:
        layout.notes.append("no module could keep its quantization: quant_algo is null (float checkpoint)")
    return layout


def _check_tp(geo: Geometry, tp: int) -> None:
    if tp == 1:
        return
    for what, value in (("num_attention_heads", geo.heads), ("num_key_value_heads", geo.kv_heads),
                        ("intermediate_size", geo.intermediate), ("vocab_size", geo.vocab), ("hidden_size", geo.hidden)):
        if value % tp:
            extra = " (duplicating KV heads is not implemented)" if what == "num_key_value_heads" and value < tp else ""
            raise UnsupportedConversion(
                f"{what} {value} does not split evenly over --tp-size {tp}{extra}",
                hint="Choose a --tp-size that divides the model's heads, KV heads, intermediate and vocab sizes.",
            )


def _primary(reader, algos: dict[str, str], reasons: dict[str, str]) -> tuple[str | None, int | None]:
    """The one quant_algo of the checkpoint: the most common; modules of any other become refusals."""
    if not algos:
        return None, None
    counts = Counter(algos.values())
    algo = sorted(counts, key=lambda a: (-counts[a], a))[0]
    sizes = Counter(reader.modules[n].scheme.group_size for n, a in algos.items() if a == algo)
    group_size = sorted(sizes, key=lambda g: (-sizes[g], g or 0))[0] if algo in GROUPWISE else None
    for name, a in list(algos.items()):
        if a != algo:
            reasons[name] = f"{a} in a checkpoint converted as {algo}: TensorRT-LLM takes one quant_algo (MIXED_PRECISION is not written)"
            del algos[name]
        elif algo in GROUPWISE and reader.modules[name].scheme.group_size != group_size:
            reasons[name] = f"group size {reader.modules[name].scheme.group_size} where the checkpoint's group_size is {group_size}"
            del algos[name]
    return algo, group_size


def _plan_linear(reader: SourceReader, lin: Linear, geo: Geometry, names: set[str], algo, group_size, reasons, tp, pending):
    """(LinearPlan, [(module, reason)] refusing it); the plan's mode is QUANT or FLOAT when nothing is refused.
    `pending` (a dict when inspecting): data checks are not run but noted per module."""
    expect_rows = geo.qkv_rows() if lin.is_qkv else None
    rows, cols, kinds = [], None, []
    for part in lin.parts:
        if part in reader.modules:
            shape = reader.modules[part].shape
            kinds.append(QUANT)
        elif f"{part}.weight" in names:
            shape = reader.tensor_meta(f"{part}.weight").shape
            kinds.append(FLOAT)
        else:
            raise InputError(f"{part}: missing from the checkpoint", hint="The checkpoint is incomplete.")
        if len(shape) != 2 or (cols is not None and shape[1] != cols):
            raise InputError(f"{part}: shape {list(shape)} does not fit {lin.name}")
        rows.append(shape[0])
        cols = shape[1]
    if expect_rows is not None and tuple(rows) != expect_rows:
        raise InputError(
            f"{lin.name}: q/k/v rows {rows} do not match heads x head_size {list(expect_rows)} from config.json"
        )
    biases = [f"{p}.bias" in names for p in lin.parts]
    if any(biases) and not all(biases):
        raise UnsupportedConversion(f"{lin.name}: only some of {', '.join(lin.parts)} have a bias; they cannot be fused")
    lp = LinearPlan(lin, QUANT if QUANT in kinds else FLOAT, tuple(rows), cols, all(biases))
    quantized = [p for p, k in zip(lin.parts, kinds) if k == QUANT]
    if not quantized:
        return lp, []
    bad = [(p, reasons[p]) for p in quantized if p in reasons]
    if bad:
        return lp, [(p, reasons.get(p, f"fused into {lin.name} with {bad[0][0]}, which is refused")) for p in quantized]
    if FLOAT in kinds:
        why = f"fused into {lin.name} with a part that is float in the source"
        return lp, [(p, why) for p in quantized]
    why = _shape_refusal(lp, algo, group_size, tp)
    if why is None and pending is not None:
        if algo == FP8 and len(quantized) > 1:
            pending.update({p: f"{lin.name} fuses FP8 projections: their weight and input scales must be equal" for p in quantized})
    elif why is None:
        why = _fp8_scales_refusal(reader, lin, quantized, algo)
    return lp, ([(p, why) for p in quantized] if why else [])


def _shape_refusal(lp: LinearPlan, algo: str, group_size: int | None, tp: int) -> str | None:
    column = lp.linear.parallel == COLUMN
    n_rank = lp.n // tp if column else lp.n
    k_rank = lp.cols if column else lp.cols // tp
    if algo in GROUPWISE:
        # TensorRT-LLM pads groupwise layers whose full in/out features are not multiples of this
        unit = max(64, group_size) * tp
        if lp.n % unit or lp.cols % unit:
            return f"{lp.linear.name} [{lp.n}, {lp.cols}] is not a multiple of {unit} (max(64, group_size) x tp) on both sides; TensorRT-LLM would pad it"
    if algo in BITS:
        if k_rank % K_TILE or n_rank % K_TILE:
            return f"{lp.linear.name}: per-rank shape [{n_rank}, {k_rank}] is not a multiple of 64 on both sides (mixed-GEMM tiles)"
    return None


def _fp8_scales_refusal(reader: SourceReader, lin: Linear, parts: list[str], algo: str) -> str | None:
    """Fused FP8 parts need one weight scale and one input scale: exact only when the parts' are equal."""
    if algo != FP8 or len(parts) == 1:
        return None
    for what, get in (("weight_scale", lambda p: reader.get(reader.modules[p].tensors["weight_scale"])),
                      ("input_scale", lambda p: reader.get(reader.module_extras(p)["input_scale"]))):
        values = [get(p).to(torch.float32).reshape(-1) for p in parts]
        if any(v.numel() != 1 for v in values) or any(not torch.equal(values[0], v) for v in values[1:]):
            shown = ", ".join(f"{float(v.reshape(-1)[0]):g}" for v in values)
            return (f"{lin.name} fuses {len(parts)} FP8 projections with different {what}s ({shown}); one scale "
                    "per fused tensor would need re-quantization")
    return None


def _carried(reader: SourceReader, plan: Layout, names: set[str], refused: list[LinearPlan], target: str) -> None:
    """Every source tensor outside the quantized modules: carried, consumed by a linear, or refused
    (refused linears are not written, but their tensors are theirs: only inspect gets this far)."""
    consumed = set()
    for lp in plan.linears + refused:
        for p in lp.linear.parts:
            consumed.add(f"{p}.bias")
            if lp.mode == FLOAT:
                consumed.add(f"{p}.weight")
            if p in reader.modules:
                consumed.update(reader.module_extras(p).values())
    k_scales = [f"model.layers.{i}.self_attn.{kv}_scale" for i in range(plan.geo.layers) for kv in "kv"]
    if any(t in names for t in k_scales):
        kv = reader.kv_cache_scheme
        if kv is None or kv.type != "float" or kv.num_bits != 8 or kv.strategy != "tensor" or kv.dynamic:
            raise UnsupportedConversion(
                "kv_cache_scheme: only a static per-tensor FP8 KV cache maps to TensorRT-LLM (kv_cache_quant_algo FP8)"
            )
        missing = [t for t in k_scales if t not in names]
        if missing:
            raise InputError(f"{missing[0]}: missing while the KV cache is quantized")
        plan.kv_cache = True
        consumed.update(k_scales)
        plan.notes.append(
            "KV cache: TensorRT-LLM keeps one FP8 scale per layer; attention.kv_cache_scaling_factor = "
            "max(k_scale, v_scale), as TensorRT-LLM's own converters merge them"
        )
    for t in sorted(names - consumed):
        if t == "lm_head.weight":
            continue
        trt = replicated_name(t)
        if trt is not None:
            plan.replicated[t] = trt
        elif IGNORABLE.match(t) or reader.is_quantization_param(t):
            plan.dropped.append(t)
        else:
            raise UnsupportedConversion(
                f"{t}: no counterpart in a TensorRT-LLM {reader.architecture} checkpoint",
                hint=f"The {target} target holds Llama-family decoder layers only; choose another --target.",
            )
