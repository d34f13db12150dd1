"""The shared machinery of targets that write a Hugging Face folder of safetensors shards
(dense, awq, gptq, marlin): a target module only says, per quantized module, whether it can hold it
(`refusal`), which tensors it emits (`specs`) and how to compute them (`convert`), plus its
`quantization_config`.

Work is streamed: shards are planned from header facts, then modules are converted by a bounded
pool of threads (torch releases the GIL in its kernels) and written in order, so memory holds only
the modules in flight.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ct_convert.bands import carried, streamed_cost
from ct_convert.errors import UnsupportedConversion
from ct_convert.parallel import ordered_map
from ct_convert.plan import CARRY, CONVERTED, DEQUANTIZE, ENCODE, FALLBACK, REFUSED, ModulePlan, Output, Plan, Unit, tensor_output
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.readers.checkpoint import SourceReader, source_order
from ct_convert.safetensors_out import SafetensorsFileWriter, TensorSpec, shard_names, split_shards
from ct_convert.targets.writer_base import Files, Progress, RepackOptions, TargetWriter, exact_cast, refuse_online_transforms, copy_other_files, write_json

DENSE_FALLBACK = "dense"


class HFWriter(TargetWriter):
    """Base class; subclasses set `name` and implement `refusal`, `specs`, `convert`, `quantization_config`."""

    # -- what a target says -------------------------------------------------------------------
    def refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        """Why this module cannot be written exactly (header facts only), or None."""
        raise NotImplementedError

    def at_repack(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        """For `inspect`: what `convert` checks on the data of a module headers allow, or None."""
        return None

    def specs(self, info: ModuleInfo, opts: RepackOptions) -> list[TensorSpec]:
        """The tensors written for a quantized module, names relative to the module."""
        raise NotImplementedError

    def convert(self, qw: QuantizedWeight, opts: RepackOptions) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def convert_module(self, reader: SourceReader, qw: QuantizedWeight, opts: RepackOptions) -> dict[str, torch.Tensor]:
        """`convert`, for targets that also need a module's activation qparams from the reader."""
        return self.convert(qw, opts)

    def refusals(self, reader: SourceReader, opts: RepackOptions) -> dict[str, str | None]:
        """Per module: why it cannot be written exactly, or None. Header facts by default; a target
        whose refusals depend on tensor values (a scale's exact reciprocal) overrides this."""
        return {name: self.refusal(info, opts) for name, info in reader.modules.items()}

    def details(self, info: ModuleInfo, opts: RepackOptions) -> dict | None:
        """For `inspect`: what the module becomes in this target, where it says more than yes or no."""
        return None

    def quantization_config(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> dict | None:
        raise NotImplementedError

    def check_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        """Refuse what only the whole plan shows (a subclass's checks across modules)."""

    def carries(self, reader: SourceReader, name: str) -> bool:
        """Whether a tensor outside the quantized modules is written (activation qparams are not)."""
        return not reader.is_quantization_param(name)

    def passthrough_dtype(self, dtype: torch.dtype, opts: RepackOptions) -> torch.dtype:
        if opts.dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2:
            return opts.dtype
        return dtype

    def carried(self, reader: SourceReader, name: str, opts: RepackOptions) -> Output:
        """The output a carried tensor becomes (its name, in the target's dtype)."""
        m = reader.tensor_meta(name)
        return tensor_output(name, self.passthrough_dtype(m.torch_dtype, opts), m.shape)

    # -- the shared pipeline ------------------------------------------------------------------
    def fill_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        refuse_online_transforms(reader, "The weights alone are not the model; ct-convert cannot port online transforms yet.")
        refused = []
        units_at: dict[str, Unit] = {}  # keyed by the first tensor read, to sort in source order
        reasons = self.refusals(reader, opts)
        for name, info in reader.modules.items():
            why = reasons[name]
            if why and opts.keep_unsupported != DENSE_FALLBACK:
                plan.modules[name] = ModulePlan(REFUSED, why)
                refused.append((name, why))
                continue
            if why:
                outputs = [tensor_output(f"{name}.weight", opts.dtype or info.dtype, info.shape)]
                plan.modules[name] = ModulePlan(FALLBACK, why)
                plan.fallbacks.append({"module": name, "written_as": "dense", "reason": why})
            else:
                outputs = [tensor_output(f"{name}.{s.name}", s.dtype, s.shape) for s in self.specs(info, opts)]
                plan.modules[name] = ModulePlan(CONVERTED, at_repack=self.at_repack(info, opts) if plan.inspecting else None,
                                                details=self.details(info, opts) if plan.inspecting else None)
            first = min(info.tensors.values(), key=lambda n: source_order(reader, n))
            units_at[first] = Unit((name,), outputs, DEQUANTIZE if why else ENCODE, why, reader.source_bytes(name))
        if refused:
            name, why = refused[0]
            more = f" (and {len(refused) - 1} more modules)" if len(refused) > 1 else ""
            plan.refuse_modules(UnsupportedConversion(
                f"{name}: cannot be written as {self.name}: {why}{more}",
                hint="Pass --keep-unsupported dense to write such modules dequantized, or choose another --target.",
            ))  # fmt: skip
        for t in reader.passthrough():
            if not self.carries(reader, t):
                plan.dropped.append(t)
                continue
            units_at[t] = Unit((t,), [self.carried(reader, t, opts)], CARRY, source_bytes=reader.tensor_meta(t).nbytes)
        plan.units = [units_at[k] for k in sorted(units_at, key=lambda n: source_order(reader, n))]
        self.check_plan(plan, reader, opts)
        shards = split_shards(plan.units, opts.max_shard_size, lambda u: sum(o.nbytes for o in u.outputs))
        for fname, shard in zip(shard_names(len(shards)), shards):
            for o in (o for u in shard for o in u.outputs):
                o.file = fname
        plan.detail = list(zip(shard_names(len(shards)), shards))

    def write(self, plan: Plan, reader: SourceReader, out: Path, opts: RepackOptions, progress: Progress) -> Files:
        files: Files = {}
        weight_map: dict[str, str] = {}
        total = 0
        results = self._produce(reader, plan.units, opts)
        for fname, shard in plan.detail:
            fw = SafetensorsFileWriter(out / fname, [TensorSpec(o.name, o.torch_dtype, o.shape) for u in shard for o in u.outputs])
            try:
                for unit in shard:
                    tensors = next(results)
                    for o in unit.outputs:
                        fw.add(o.name, tensors[o.name])
                        weight_map[o.name] = fname
                        total += o.nbytes
                    progress(unit.source_bytes)
                sha = fw.close()
            except BaseException:
                fw.abort()
                raise
            files[fname] = {"sha256": sha, "size": fw.size}
        if len(plan.detail) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            write_json(out, "model.safetensors.index.json", index, files)
        self._config(plan, reader, out, opts, files)
        copy_other_files(reader, out, files)
        return files

    def _produce(self, reader: SourceReader, units: list[Unit], opts: RepackOptions):
        """Yield each unit's tensors in order, computing up to `workers` units ahead."""
        workers = max(1, opts.workers)

        def run(unit: Unit) -> dict[str, torch.Tensor]:
            (source,) = unit.sources
            if unit.how == CARRY:
                (o,) = unit.outputs
                return {o.name: carried(reader, source, lambda t: exact_cast(t, o.torch_dtype, f"tensor {source}"), o.torch_dtype)}
            qw = reader.read(source)
            if opts.device != "cpu":
                qw = qw.to(opts.device)
            if unit.how == DEQUANTIZE:
                produced = {"weight": qw.dequantized_bands(unit.outputs[0].torch_dtype)}
            else:
                produced = self.convert_module(reader, qw, opts)
            return {f"{source}.{k}": v for k, v in produced.items()}

        def cost(u: Unit) -> int:
            whole = u.source_bytes + sum(o.nbytes for o in u.outputs)
            return streamed_cost(whole) if u.how == CARRY else whole

        return ordered_map(run, units, workers, cost=cost)

    def _config(self, plan: Plan, reader: SourceReader, out: Path, opts: RepackOptions, files: Files) -> None:
        config = json.loads(json.dumps(reader.config))
        qc = self.quantization_config(plan, reader, opts)
        # drop every place the compressed-tensors config can live, then write the target's own
        config.pop("compression_config", None)
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop("quantization_config", None)
        config.pop("quantization_config", None)
        if qc is not None:
            config["quantization_config"] = qc
        if opts.dtype is not None:
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(opts.dtype).removeprefix("torch.")
        write_json(out, "config.json", config, files)

