"""`--target trtllm-legacy`: a TensorRT-LLM checkpoint (config.json + rank{r}.safetensors) for trtllm-build.

Not an HF folder: q/k/v are fused, tensors renamed and split per tensor-parallel rank. Every rank file's
header is planned from header facts first; then fused linears are produced in order, up to `--workers`
ahead within parallel.ordered_map's memory budget, and each rank's shard is streamed into its file, so
memory holds a few fused linears (one layer's q/k/v at most each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ct_convert.bands import Bands, carried
from ct_convert.parallel import ordered_map
from ct_convert.plan import CARRY, CONVERTED, DEQUANTIZE, ENCODE, FALLBACK, ModulePlan, Plan, Unit, tensor_output
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.safetensors_out import SafetensorsFileWriter, TensorSpec
from ct_convert.targets.trtllm_legacy import plan as planning
from ct_convert.targets.trtllm_legacy.encode import encode_linear, linear_specs
from ct_convert.targets.trtllm_legacy.facts import SM_METADATA_KEY
from ct_convert.targets.trtllm_legacy.names import trtllm_config
from ct_convert.targets.trtllm_legacy.tp import column_shard
from ct_convert.targets.writer_base import Files, Progress, RepackOptions, TargetWriter, exact_cast, copy_other_files, write_json

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
Produce = Callable[[], list[dict[str, torch.Tensor]]]  # a unit's tensors, per rank: name -> tensor


class TRTLLMWriter(TargetWriter):

    def fill_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        layout = planning.build(plan, reader, opts)
        fallback = dict(layout.fallbacks)
        for name, info in reader.modules.items():
            if name in plan.modules:  # refused
                continue
            pending = layout.at_repack.get(name)
            if plan.inspecting and name not in fallback and layout.algo != planning.FP8 and info.dtype != layout.dtype:
                pending = "; ".join(filter(None, (pending, f"every scale must be exact in {DTYPE_NAMES.get(layout.dtype, layout.dtype)}")))
            plan.modules[name] = ModulePlan(FALLBACK if name in fallback else CONVERTED, fallback.get(name), pending)
        plan.fallbacks = [{"module": m, "written_as": "dense", "reason": why} for m, why in layout.fallbacks]
        plan.dropped = list(layout.dropped)
        plan.notes = list(layout.notes) + _notes(layout)
        plan.units = _units(reader, layout)
        plan.detail = layout
        if plan.inspecting:
            plan.at_repack = _cast_checks(reader, layout)

    def write(self, plan: Plan, reader: SourceReader, out: Path, opts: RepackOptions, progress: Progress) -> Files:
        layout = plan.detail
        files: Files = {}
        # the SM is recorded for readers (TensorRT-LLM ignores safetensors metadata)
        meta = {"format": "pt", SM_METADATA_KEY: str(layout.sm) if layout.sm is not None else ""}
        ranks = [f"rank{r}.safetensors" for r in range(layout.tp)]
        specs = [[TensorSpec(o.name, o.torch_dtype, o.shape) for o in plan.outputs() if o.file == f] for f in ranks]
        writers = [SafetensorsFileWriter(out / f, s, meta) for f, s in zip(ranks, specs)]
        try:
            cost = lambda u: u.source_bytes + sum(o.nbytes for o in u.outputs)  # noqa: E731
            for unit, produced in ordered_map(lambda u: (u, u.detail()), plan.units, max(1, opts.workers), cost=cost):
                for o in unit.outputs:
                    writers[ranks.index(o.file)].add(o.name, produced[ranks.index(o.file)][o.name])
                progress(unit.source_bytes)
            for f, fw in zip(ranks, writers):
                files[f] = {"sha256": fw.close(), "size": fw.size}
        except BaseException:
            for fw in writers:
                fw.abort()
            raise
        config = trtllm_config(reader.config, layout.geo, DTYPE_NAMES[layout.dtype], layout.tp, _quantization(layout), _biases(layout))
        write_json(out, "config.json", config, files)
        copy_other_files(reader, out, files)
        return files


def _cast_checks(reader: SourceReader, layout: planning.Layout) -> str | None:
    """For `inspect`: what the exact casts of carried float tensors to the model dtype decide, or None."""
    dtypes = set()
    for t in _carried_floats(layout):
        dt = reader.tensor_meta(t).torch_dtype
        if dt.is_floating_point and dt.itemsize >= 2 and dt != layout.dtype:
            dtypes.add(DTYPE_NAMES.get(dt, str(dt)))
    if not dtypes:
        return None
    return f"the {'/'.join(sorted(dtypes))} tensors carried over must be exact in {DTYPE_NAMES[layout.dtype]}"


def _carried_floats(layout: planning.Layout):
    """The source tensors cast to the model dtype: norms and embeddings, biases, float linears, lm_head."""
    yield from layout.replicated
    for lp in layout.linears:
        if lp.bias:
            yield from (f"{p}.bias" for p in lp.linear.parts)
        if lp.mode == planning.FLOAT:
            yield from (f"{p}.weight" for p in lp.linear.parts)
    if layout.lm_head != "module":
        yield "lm_head.weight" if layout.lm_head == "tensor" else "model.embed_tokens.weight"


def _unit(sources, specs: list[list[TensorSpec]], how: str, produce: Produce, source_bytes: int, reason: str | None = None) -> Unit:
    outputs = [tensor_output(s.name, s.dtype, s.shape, f"rank{r}.safetensors") for r, rank in enumerate(specs) for s in rank]
    return Unit(tuple(sources), outputs, how, reason, source_bytes, produce)


def _quantization(plan: planning.Layout) -> dict:
    return {
        "quant_algo": plan.algo,
        "kv_cache_quant_algo": "FP8" if plan.kv_cache else None,
        "group_size": plan.group_size or 128,
        "has_zero_point": plan.algo == planning.W4A16_GPTQ,
        "pre_quant_scale": plan.algo == planning.W4A16_AWQ,
        "exclude_modules": plan.exclude_modules,
    }


def _biases(plan: planning.Layout) -> dict:
    def has(suffix):
        return any(lp.bias for lp in plan.linears if lp.linear.name.endswith(suffix))

    return {"attn": has("attention.qkv") or has("attention.dense"), "mlp": has("mlp.fc") or has("mlp.proj")}


def _notes(plan: planning.Layout) -> list[str]:
    notes = []
    if plan.algo == planning.FP8 and any(len(lp.linear.parts) > 1 and lp.mode == planning.QUANT for lp in plan.linears):
        notes.append("FP8 fused q/k/v: q, k and v had the same weight_scale and input_scale, written unchanged as "
                     "weights_scaling_factor / activation_scaling_factor (no re-quantization)")
    if plan.algo == planning.FP8:
        notes.append("FP8 gate_proj/up_proj: separate linears in the checkpoint (mlp.fc / mlp.gate), each with its own "
                     "scales; if trtllm-build fuses the gated MLP it rescales them itself")
    if plan.algo == planning.W4A16_GPTQ:
        notes.append(f"W4A16_GPTQ: mixed-GEMM layout for sm{plan.sm}; zero = (8 - z) * scale rounded once to "
                     f"{DTYPE_NAMES[plan.dtype]}, as TensorRT-LLM's converters compute it")
    if plan.algo == planning.W4A16_AWQ:
        notes.append("W4A16_AWQ: prequant_scaling_factor is all ones (llm-compressor folds AWQ smoothing into the weights)")
    return notes


def _units(reader: SourceReader, plan: planning.Layout) -> list[Unit]:
    """Every tensor of every rank file, in file order: embedding, each layer, ln_f, lm_head."""
    by_trt = {trt: src for src, trt in plan.replicated.items()}
    items = []

    def replicated(src: str, trt: str) -> None:
        m = reader.tensor_meta(src)
        dt = _carried_dtype(m.torch_dtype, plan.dtype)
        spec = TensorSpec(trt, dt, m.shape)

        def produce():
            t = carried(reader, src, lambda x: _cast(x, dt, src), dt)  # a large one as bands, read per rank
            return [{trt: t}] * plan.tp

        items.append(_unit([src], [[spec]] * plan.tp, CARRY, produce, m.nbytes))

    if "transformer.vocab_embedding.weight" in by_trt:
        replicated(by_trt["transformer.vocab_embedding.weight"], "transformer.vocab_embedding.weight")
    by_layer: dict[int, list] = {}
    for lp in plan.linears:
        by_layer.setdefault(lp.linear.layer, []).append(lp)
    for layer in range(plan.geo.layers):
        pre = f"transformer.layers.{layer}"
        for lp in by_layer.get(layer, []):
            if lp.linear.name.endswith("attention.qkv") and f"{pre}.input_layernorm.weight" in by_trt:
                replicated(by_trt[f"{pre}.input_layernorm.weight"], f"{pre}.input_layernorm.weight")
            if lp.linear.name.endswith("mlp.fc") and f"{pre}.post_layernorm.weight" in by_trt:
                replicated(by_trt[f"{pre}.post_layernorm.weight"], f"{pre}.post_layernorm.weight")
            items.append(_linear_item(reader, plan, lp))
        if plan.kv_cache:
            items.append(_kv_item(reader, plan, layer))
    if "transformer.ln_f.weight" in by_trt:
        replicated(by_trt["transformer.ln_f.weight"], "transformer.ln_f.weight")
    items.append(_lm_head_item(reader, plan))
    return items


def _carried_dtype(dtype: torch.dtype, model: torch.dtype) -> torch.dtype:
    return model if dtype.is_floating_point and dtype.itemsize >= 2 else dtype


def _cast(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    return exact_cast(t, dtype, f"tensor {what}") if t.dtype != dtype else t


def _linear_item(reader: SourceReader, plan: planning.Layout, lp: planning.LinearPlan) -> Unit:
    specs = [linear_specs(plan, lp, r) for r in range(plan.tp)]
    src = sum(reader.source_bytes(p) for p in lp.linear.parts if p in reader.modules)
    how = {planning.QUANT: ENCODE, planning.DENSE: DEQUANTIZE, planning.FLOAT: CARRY}[lp.mode]
    reason = "; ".join(why for m, why in plan.fallbacks if m in lp.linear.parts) or None
    return _unit(lp.linear.parts, specs, how, lambda: encode_linear(reader, plan, lp), src, reason)


def _kv_item(reader: SourceReader, plan: planning.Layout, layer: int) -> Unit:
    name = f"transformer.layers.{layer}.attention.kv_cache_scaling_factor"
    spec = TensorSpec(name, torch.float32, (1,))

    def produce():
        k = reader.get(f"model.layers.{layer}.self_attn.k_scale").to(torch.float32).reshape(-1)
        v = reader.get(f"model.layers.{layer}.self_attn.v_scale").to(torch.float32).reshape(-1)
        return [{name: torch.maximum(k[:1], v[:1])}] * plan.tp

    scales = [f"model.layers.{layer}.self_attn.{kv}_scale" for kv in "kv"]
    return _unit(scales, [[spec]] * plan.tp, ENCODE, produce, 0)


def _lm_head_item(reader: SourceReader, plan: planning.Layout) -> Unit:
    v, h = plan.geo.vocab, plan.geo.hidden
    specs = [[TensorSpec("lm_head.weight", plan.dtype, (v // plan.tp, h))] for _ in range(plan.tp)]

    def produce():
        if plan.lm_head == "module":
            w = reader.read("lm_head").dequantize(plan.dtype)
            return [{"lm_head.weight": column_shard([w], plan.tp, r)} for r in range(plan.tp)]
        src = "lm_head.weight" if plan.lm_head == "tensor" else "model.embed_tokens.weight"
        w = carried(reader, src, lambda x: _cast(x, plan.dtype, src), plan.dtype)
        if isinstance(w, torch.Tensor):
            return [{"lm_head.weight": column_shard([w], plan.tp, r)} for r in range(plan.tp)]
        return [{"lm_head.weight": _row_range(w, r * (v // plan.tp), (r + 1) * (v // plan.tp))} for r in range(plan.tp)]

    source = {"module": "lm_head", "tensor": "lm_head.weight", "tied": "model.embed_tokens.weight"}[plan.lm_head]
    how = DEQUANTIZE if plan.lm_head == "module" else CARRY
    return _unit([source], specs, how, produce, 0, dict(plan.fallbacks).get("lm_head") if plan.lm_head == "module" else None)


Writer = TRTLLMWriter


def _row_range(whole: Bands, start: int, stop: int) -> Bands:
    """Rows [start, stop) of a banded tensor, as bands (each rank's vocabulary slice of lm_head)."""

    def produce():
        at = 0
        for band in whole:
            lo, hi = max(start, at), min(stop, at + band.shape[0])
            if lo < hi:
                yield band[lo - at:hi - at]
            at += band.shape[0]

    return Bands(whole.dtype, (stop - start, *whole.shape[1:]), produce)
