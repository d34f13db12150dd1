"""`--target trtllm` (alias `modelopt`): the ModelOpt unified HF checkpoint that TensorRT-LLM's PyTorch
backend loads. Hugging Face tensor names pass through, so any architecture TensorRT-LLM (or vLLM,
SGLang) supports is written; each quantized module gets one `quant_algo` (plan.py), several different
ones make the checkpoint MIXED_PRECISION. The HF folder machinery (shards, streaming, copies) is hf_writer.py's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ct_convert import __version__
from ct_convert.plan import Output, Plan, tensor_output
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.safetensors_out import TensorSpec
from ct_convert.targets.hf_writer import HFWriter
from ct_convert.targets.modelopt import encode, facts
from ct_convert.targets.modelopt.plan import Algorithms, algorithm, build
from ct_convert.targets.writer_base import Files, Progress, RepackOptions, write_json

ACTIVATION_QPARAMS = ("input_scale", "input_global_scale")


class Writer(HFWriter):
    # -- per module ---------------------------------------------------------------------------
    def refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        return algorithm(info)[1]

    def details(self, info: ModuleInfo, opts: RepackOptions) -> dict | None:
        """What `inspect` shows: the quant_algo this module would get (value checks aside)."""
        algo = algorithm(info)[0]
        return algo.entry() if algo else None

    def refusals(self, reader: SourceReader, opts: RepackOptions) -> dict[str, str | None]:
        return self._algorithms.reasons

    def at_repack(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        return self._algorithms.pending.get(info.name)

    def specs(self, info: ModuleInfo, opts: RepackOptions) -> list[TensorSpec]:
        algo = algorithm(info)[0]
        static = algo.quant_algo == facts.FP8 and info.input_activations.get("dynamic") is False
        return encode.specs(info, algo, opts.dtype or info.dtype, static)

    def convert_module(self, reader: SourceReader, qw: QuantizedWeight, opts: RepackOptions) -> dict[str, torch.Tensor]:
        extras = {s: reader.get(t) for s, t in reader.module_extras(qw.name).items() if s in ACTIVATION_QPARAMS}
        algo = algorithm(qw.info)[0]
        if algo.quant_algo == facts.FP8 and qw.info.input_activations.get("dynamic") is not False:
            extras.pop("input_scale", None)
        return encode.tensors(qw, algo, opts.dtype or qw.dtype, extras)

    # -- the checkpoint -----------------------------------------------------------------------
    def fill_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        # the per-module algorithms read a few scalars per module: once per run (write uses them
        # too); inspect decides from headers, leaving those values to repack
        self._algorithms = build(reader, opts, read_values=not plan.inspecting)
        super().fill_plan(plan, reader, opts)
        if plan.inspecting:
            return
        # activation qparams written with their module are not dropped
        plan.dropped = [t for t in plan.dropped if not (t.rsplit(".", 1)[-1] in ACTIVATION_QPARAMS
                                                        and t.rpartition(".")[0] in self._algorithms.algos)]
        plan.notes.extend(self._algorithms.notes)

    def carries(self, reader: SourceReader, name: str) -> bool:
        module, _, suffix = name.rpartition(".")
        if suffix in facts.KV_SCALE_NAMES:
            return True  # renamed by `carried`; build refused any KV cache it cannot hold
        if suffix in ACTIVATION_QPARAMS and module in reader.modules:
            return False  # written with the module by convert_module, or dropped with a fallback
        return super().carries(reader, name)

    def carried(self, reader: SourceReader, name: str, opts: RepackOptions) -> Output:
        attn, _, suffix = name.rpartition(".")
        if suffix in facts.KV_SCALE_NAMES:
            return tensor_output(f"{attn}.{facts.KV_SCALE_NAMES[suffix]}", torch.float32, reader.tensor_meta(name).shape)
        return super().carried(reader, name, opts)

    def write(self, plan: Plan, reader: SourceReader, out: Path, opts: RepackOptions, progress: Progress) -> Files:
        files = super().write(plan, reader, out, opts, progress)
        hf = hf_quant_config(plan, reader, self._algorithms)
        if hf is not None:
            write_json(out, facts.HF_QUANT_CONFIG, hf, files)
        return files

    def quantization_config(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> dict | None:
        hf = hf_quant_config(plan, reader, self._algorithms)
        return None if hf is None else inline_config(hf)


def hf_quant_config(plan: Plan, reader: SourceReader, algorithms: Algorithms) -> dict | None:
    fallbacks = {f["module"] for f in plan.fallbacks}
    quantized = {m: a for m, a in sorted(algorithms.algos.items()) if m not in fallbacks}
    if not quantized and not algorithms.kv_cache:
        return None
    q: dict = {"quant_algo": None, "kv_cache_quant_algo": facts.KV_CACHE_FP8 if algorithms.kv_cache else None}
    kinds = set(quantized.values())
    if len(kinds) == 1:
        q.update(kinds.pop().entry())
    elif kinds:
        q["quant_algo"] = facts.MIXED_PRECISION
        q["quantized_layers"] = {m: a.entry() for m, a in quantized.items()}
    # unquantized linears (lm_head, routers, fallbacks) must not be read as quantized
    q["exclude_modules"] = sorted(set(reader.unquantized) | fallbacks)
    return {
        "producer": {"name": facts.PRODUCER, "version": facts.FORMAT_VERSION},
        "converted_by": f"ct-convert {__version__}",
        "quantization": q,
    }


# -- config.json: ModelOpt's compressed-tensors-style mirror of hf_quant_config.json --------------

def _group_config(algo: str, group_size: int | None) -> dict:
    """The config group ModelOpt's exporter writes for a quant_algo (convert_hf_config.py)."""
    fp = {"dynamic": False, "type": "float"}
    if algo == facts.FP8:
        return {"input_activations": {**fp, "num_bits": 8}, "weights": {**fp, "num_bits": 8}}
    if algo == facts.FP8_PER_CHANNEL_PER_TOKEN:
        return {"input_activations": {**fp, "num_bits": 8}, "weights": {**fp, "num_bits": 8, "strategy": "channel"}}
    if algo == facts.NVFP4:
        return {"input_activations": {**fp, "num_bits": 4, "group_size": group_size},
                "weights": {**fp, "num_bits": 4, "group_size": group_size}}
    if algo == facts.W4A16_NVFP4:
        return {"weights": {**fp, "num_bits": 4, "group_size": group_size}}
    if algo == facts.W4A16_AWQ:
        return {"weights": {"dynamic": False, "num_bits": 4, "type": "int", "group_size": group_size}}
    if algo == facts.W8A16:
        return {"weights": {"dynamic": False, "num_bits": 8, "type": "int"}}
    return {"quant_algo": algo}


def inline_config(hf: dict) -> dict:
    q = hf["quantization"]
    algo = q.get("quant_algo")
    out: dict = {}
    if algo in (facts.FP8, facts.NVFP4, facts.W4A16_NVFP4):
        out["config_groups"] = {"group_0": {**_group_config(algo, q.get("group_size")), "targets": ["Linear"]}}
    elif algo == facts.MIXED_PRECISION:
        groups: dict[tuple, list[str]] = {}
        for name, entry in q["quantized_layers"].items():
            groups.setdefault(tuple(sorted(entry.items())), []).append(name)
        out["config_groups"] = {
            f"group_{i}": {**_group_config(dict(key)["quant_algo"], dict(key).get("group_size")), "targets": sorted(names)}
            for i, (key, names) in enumerate(groups.items())
        }
        out["quantized_layers"] = q["quantized_layers"]
    out["ignore"] = q.get("exclude_modules") or []
    if algo:
        out["quant_algo"] = algo
    if q.get("group_size") is not None:
        out["group_size"] = q["group_size"]  # read by flat-config readers (vLLM, TensorRT-LLM's inline check)
    if q.get("kv_cache_quant_algo") == facts.KV_CACHE_FP8:
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    out["producer"] = hf["producer"]
    out["quant_method"] = facts.QUANT_METHOD
    return out
