"""`--target trtllm`: a TensorRT-LLM checkpoint (config.json + rank{r}.safetensors) for trtllm-build.

Not an HF folder: q/k/v are fused, tensors renamed and split per tensor-parallel rank. Every rank file's
header is planned from header facts first; then fused linears are produced one at a time and each
rank's shard is streamed into its file, so memory holds one fused linear (one layer's q/k/v at most).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ct_convert.output import copy_with_hash, write_bytes_with_hash
from ct_convert.safetensors_out import SafetensorsFileWriter, TensorSpec
from ct_convert.targets.writer_base import Progress, RepackOptions, WriteReport, exact_cast
from ct_convert.targets.trtllm_legacy import plan as planning
from ct_convert.targets.trtllm_legacy.encode import encode_linear, linear_specs
from ct_convert.targets.trtllm_legacy.names import trtllm_config
from ct_convert.targets.trtllm_legacy.tp import column_shard

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass
class Item:
    specs: list[list[TensorSpec]]  # per rank
    produce: Callable[[], list[dict[str, torch.Tensor]]]  # per rank: name -> tensor
    source_bytes: int


class TRTLLMWriter:
    name = "trtllm"

    def refusal(self, info, opts: RepackOptions) -> str | None:
        return planning.module_refusal(info, opts)

    def check(self, reader, opts: RepackOptions) -> None:
        planning.build(reader, opts)

    def write(self, reader, out: Path, opts: RepackOptions, progress: Progress) -> WriteReport:
        plan = planning.build(reader, opts)
        report = WriteReport(dropped=list(plan.dropped), notes=list(plan.notes))
        items = _items(reader, plan)
        # the SM is recorded for readers (TensorRT-LLM ignores safetensors metadata)
        meta = {"format": "pt", "ct_convert.sm": str(plan.sm) if plan.sm is not None else ""}
        writers = [SafetensorsFileWriter(out / f"rank{r}.safetensors", [s for it in items for s in it.specs[r]], meta)
                   for r in range(plan.tp)]
        try:
            for it in items:
                produced = it.produce()
                for r, fw in enumerate(writers):
                    for spec in it.specs[r]:
                        fw.add(spec.name, produced[r][spec.name])
                progress(it.source_bytes)
            for r, fw in enumerate(writers):
                report.files[f"rank{r}.safetensors"] = {"sha256": fw.close(), "size": fw.size}
        except BaseException:
            for fw in writers:
                fw.abort()
            raise
        fallback = {m for m, _ in plan.fallbacks}
        for name in reader.modules:
            report.modules[name] = {"status": "dense" if name in fallback else "converted"}
        report.fallbacks = [{"module": m, "written_as": "dense", "reason": why} for m, why in plan.fallbacks]
        report.notes.extend(_notes(plan))
        config = trtllm_config(reader.config, plan.geo, DTYPE_NAMES[plan.dtype], plan.tp, _quantization(plan), _biases(plan))
        raw = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        sha, size = write_bytes_with_hash(out / "config.json", raw)
        report.files["config.json"] = {"sha256": sha, "size": size}
        for rel in reader.ckpt.other_files():
            sha, size = copy_with_hash(reader.ckpt.root / rel, out / rel)
            report.files[str(rel)] = {"sha256": sha, "size": size}
        return report


def _quantization(plan: planning.Plan) -> dict:
    return {
        "quant_algo": plan.algo,
        "kv_cache_quant_algo": "FP8" if plan.kv_cache else None,
        "group_size": plan.group_size or 128,
        "has_zero_point": plan.algo == planning.W4A16_GPTQ,
        "pre_quant_scale": plan.algo == planning.W4A16_AWQ,
        "exclude_modules": plan.exclude_modules,
    }


def _biases(plan: planning.Plan) -> dict:
    def has(suffix):
        return any(lp.bias for lp in plan.linears if lp.linear.name.endswith(suffix))

    return {"attn": has("attention.qkv") or has("attention.dense"), "mlp": has("mlp.fc") or has("mlp.proj")}


def _notes(plan: planning.Plan) -> list[str]:
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


def _items(reader, plan: planning.Plan) -> list[Item]:
    """Every tensor of every rank file, in file order: embedding, each layer, ln_f, lm_head."""
    by_trt = {trt: src for src, trt in plan.replicated.items()}
    items = []

    def replicated(src: str, trt: str) -> None:
        m = reader.store.meta(src)
        dt = _carried_dtype(m.torch_dtype, plan.dtype)
        spec = TensorSpec(trt, dt, m.shape)

        def produce():
            t = _cast(reader.get(src), dt, src)
            return [{trt: t}] * plan.tp

        items.append(Item([[spec]] * plan.tp, produce, m.nbytes))

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


def _linear_item(reader, plan: planning.Plan, lp: planning.LinearPlan) -> Item:
    specs = [linear_specs(plan, lp, r) for r in range(plan.tp)]
    src = 0
    for p in lp.linear.parts:
        if p in reader.modules:
            src += sum(reader.store.meta(t).nbytes for t in reader.modules[p].tensors.values())
    return Item(specs, lambda: encode_linear(reader, plan, lp), src)


def _kv_item(reader, plan: planning.Plan, layer: int) -> Item:
    name = f"transformer.layers.{layer}.attention.kv_cache_scaling_factor"
    spec = TensorSpec(name, torch.float32, (1,))

    def produce():
        k = reader.get(f"model.layers.{layer}.self_attn.k_scale").to(torch.float32).reshape(-1)
        v = reader.get(f"model.layers.{layer}.self_attn.v_scale").to(torch.float32).reshape(-1)
        return [{name: torch.maximum(k[:1], v[:1])}] * plan.tp

    return Item([[spec]] * plan.tp, produce, 0)


def _lm_head_item(reader, plan: planning.Plan) -> Item:
    v, h = plan.geo.vocab, plan.geo.hidden
    specs = [[TensorSpec("lm_head.weight", plan.dtype, (v // plan.tp, h))] for _ in range(plan.tp)]

    def produce():
        if plan.lm_head == "module":
            w = reader.read("lm_head").dequantize(plan.dtype)
        else:
            src = "lm_head.weight" if plan.lm_head == "tensor" else "model.embed_tokens.weight"
            w = _cast(reader.get(src), plan.dtype, src)
        return [{"lm_head.weight": column_shard([w], plan.tp, r)} for r in range(plan.tp)]

    return Item(specs, produce, 0)


Writer = TRTLLMWriter
