"""One fused linear -> its tensors on every rank, per quant_algo (targets.md §4.3–§4.6)."""

from __future__ import annotations

import torch

from ct_convert.readers.checkpoint import SourceReader
from ct_convert.safetensors_out import TensorSpec
from ct_convert.targets.trtllm_legacy import plan as planning
from ct_convert.targets.trtllm_legacy.facts import ROW
from ct_convert.targets import int4_rows
from ct_convert.targets.trtllm_legacy.mixed_gemm import preprocess_weights_for_mixed_gemm
from ct_convert.targets.trtllm_legacy.tp import column_shard, row_shard
from ct_convert.targets.writer_base import exact_cast


def rank_shape(plan: planning.Layout, lp: planning.LinearPlan) -> tuple[int, int]:
    if lp.linear.parallel == planning.COLUMN:
        return lp.n // plan.tp, lp.cols
    return lp.n, lp.cols // plan.tp


def linear_specs(plan: planning.Layout, lp: planning.LinearPlan, rank: int) -> list[TensorSpec]:
    n, k = rank_shape(plan, lp)
    dt, name = plan.dtype, lp.linear.name
    bias_rows = n if lp.linear.parallel == planning.COLUMN else lp.n
    if lp.mode != planning.QUANT:
        specs = [("weight", dt, (n, k))]
    elif plan.algo == planning.W4A16_AWQ:
        g = k // plan.group_size
        specs = [("weight", torch.int8, (n // 2, k)), ("weights_scaling_factor", dt, (n, g)),
                 ("prequant_scaling_factor", dt, (k,))]
    elif plan.algo == planning.W4A16_GPTQ:
        g = k // plan.group_size
        specs = [("weight", dt, (k, n // 4)), ("weights_scaling_factor", dt, (g, n)), ("zero", dt, (g, n))]
    elif plan.algo in (planning.W4A16, planning.W8A16):
        specs = [("weight", torch.int8, (k, n * planning.BITS[plan.algo] // 8)), ("per_channel_scale", dt, (n,))]
    elif plan.algo == planning.FP8:
        specs = [("weight", torch.float8_e4m3fn, (n, k)), ("weights_scaling_factor", torch.float32, (1,)),
                 ("activation_scaling_factor", torch.float32, (1,))]
    else:
        raise AssertionError(plan.algo)
    if lp.bias:
        specs.append(("bias", dt, (bias_rows,)))
    return [TensorSpec(f"{name}.{s}", d, shape) for s, d, shape in specs]


def _shard(plan: planning.Layout, lp: planning.LinearPlan, parts: list[torch.Tensor], rank: int) -> torch.Tensor:
    """Parts in HF orientation ([N_p, ...]); column: split N per part; row: split the last dim."""
    if lp.linear.parallel == planning.COLUMN:
        return column_shard(parts, plan.tp, rank)
    return row_shard(parts[0], plan.tp, rank)


def encode_linear(reader: SourceReader, plan: planning.Layout, lp: planning.LinearPlan) -> list[dict[str, torch.Tensor]]:
    name, dt = lp.linear.name, plan.dtype
    parts = lp.linear.parts
    biases = [exact_cast(reader.get(f"{p}.bias"), dt, f"tensor {p}.bias") for p in parts] if lp.bias else None
    if lp.mode == planning.FLOAT:
        weights = [exact_cast(reader.get(f"{p}.weight"), dt, f"tensor {p}.weight") for p in parts]
        per_rank = [{"weight": _shard(plan, lp, weights, r)} for r in range(plan.tp)]
    elif lp.mode == planning.DENSE:
        weights = [reader.read(p).dequantize(dt) if p in reader.modules
                   else exact_cast(reader.get(f"{p}.weight"), dt, f"tensor {p}.weight") for p in parts]
        per_rank = [{"weight": _shard(plan, lp, weights, r)} for r in range(plan.tp)]
    else:
        per_rank = _quantized(reader, plan, lp)
    for r, tensors in enumerate(per_rank):
        if biases is not None:
            tensors["bias"] = column_shard(biases, plan.tp, r) if lp.linear.parallel == planning.COLUMN else biases[0]
    return [{f"{name}.{k}": v.contiguous() for k, v in t.items()} for t in per_rank]


def _quantized(reader: SourceReader, plan: planning.Layout, lp: planning.LinearPlan) -> list[dict[str, torch.Tensor]]:
    qws = [reader.read(p) for p in lp.linear.parts]
    algo, dt = plan.algo, plan.dtype
    if algo == planning.FP8:
        extras = reader.module_extras(lp.linear.parts[0])
        wscale = qws[0].scale.to(torch.float32).reshape(-1)[:1]
        ascale = reader.get(extras["input_scale"]).to(torch.float32).reshape(-1)[:1]
        codes = [q.codes for q in qws]
        return [{"weight": _shard(plan, lp, codes, r), "weights_scaling_factor": wscale,
                 "activation_scaling_factor": ascale} for r in range(plan.tp)]
    streams = _whole_word_streams(plan, lp, qws) if algo == planning.W4A16_AWQ else None
    codes = [q.codes for q in qws] if not streams else None
    scales = [exact_cast(q.group_scales(), dt, f"{q.name}.weight_scale") for q in qws]
    zeros = [q.group_zero_points() for q in qws] if algo == planning.W4A16_GPTQ else None
    out = []
    for r in range(plan.tp):
        s = _shard(plan, lp, codes, r) if codes else None  # int8 [n, k]
        per_channel = algo not in planning.GROUPWISE and lp.linear.parallel == ROW
        scale = scales[0] if per_channel else _shard(plan, lp, scales, r)  # [n, G]: a row split keeps whole channels
        if algo == planning.W4A16_AWQ:
            packed = int4_rows.from_stream(_shard(plan, lp, streams, r)) if streams else int4_rows.pack(s)
            out.append({"weight": packed.view(torch.int8), "weights_scaling_factor": scale,
                        "prequant_scaling_factor": torch.ones(packed.shape[1], dtype=dt)})
        elif algo == planning.W4A16_GPTQ:
            weight = preprocess_weights_for_mixed_gemm(s.t().contiguous(), 4, plan.sm).view(dt)
            z = _shard(plan, lp, zeros, r)
            # (8 - z_unsigned) == -z_signed, negated as an integer (a float negation would make -0.0 of
            # a zero offset, where the converters' int x float product gives +0.0); the product in fp32
            # of the model-dtype scale, rounded once
            zero = ((-z.to(torch.int16)).to(torch.float32) * scale.to(torch.float32)).to(dt)
            out.append({"weight": weight, "weights_scaling_factor": scale.t(), "zero": zero.t()})
        else:
            bits = planning.BITS[algo]
            out.append({"weight": preprocess_weights_for_mixed_gemm(s.t().contiguous(), bits, plan.sm),
                        "per_channel_scale": scale.reshape(-1)})
    return out


def _whole_word_streams(plan: planning.Layout, lp: planning.LinearPlan, qws: list) -> list[torch.Tensor] | None:
    """The parts' packed 4-bit streams when every rank's slice of them is whole words (8 codes), so
    W4A16_AWQ's bytes come from them without unpacking; None otherwise."""
    k = qws[0].shape[-1]
    share = k // plan.tp if lp.linear.parallel == ROW else k
    if share % 8:
        return None
    streams = [q.packed_stream for q in qws]
    return streams if all(s is not None for s in streams) else None
