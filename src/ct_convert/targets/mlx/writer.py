"""`--target mlx`: the folder mlx-lm loads as it loads its own `mlx_lm.convert -q` output.

Weights are named as mlx-lm's model class holds them after its `sanitize` (MoE experts stacked into
`switch_mlp` layers), each quantized module in the MLX mode that holds it exactly (encode.py), with
config.json's `quantization` block listing per-layer overrides and `false` for layers kept in float.
Work is streamed like the other Hugging Face style targets: shards planned from headers (plus a scan
of the scales and zero points, which decides exactness), modules converted by a bounded pool of
threads, written in order; a stacked expert tensor is written one expert at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ct_convert.bands import carried, streamed_cost
from ct_convert.errors import UnsupportedConversion
from ct_convert.parallel import ordered_map
from ct_convert.plan import CARRY, CONVERTED, DEQUANTIZE, ENCODE, FALLBACK, REFUSED, ModulePlan, Output, Plan, Unit, tensor_output
from ct_convert.qweight import ModuleInfo
from ct_convert.readers.checkpoint import SourceReader, source_order
from ct_convert.safetensors_out import SafetensorsFileWriter, TensorSpec, shard_names, split_shards
from ct_convert.targets.hf_writer import DENSE_FALLBACK
from ct_convert.targets.mlx import facts
from ct_convert.targets.mlx.config import mlx_config, quantization_block
from ct_convert.targets.mlx.encode import Params, choose, data_reason, encode, specs
from ct_convert.targets.writer_base import Files, Progress, RepackOptions, TargetWriter, exact_cast, refuse_online_transforms, copy_other_files, write_json

_HINT = "Pass --keep-unsupported dense to write such modules dequantized, or choose another --target."


@dataclass
class Job:
    """One unit of work, in file order: a module (all its tensors, or one of them for a stacked
    layer's slice), a module dequantized, or a carried tensor."""

    source: str
    kind: str  # "module" | "dense" | "tensor"
    dtype: torch.dtype
    params: Params | None = None
    part: str | None = None  # the one tensor wanted ("weight", "scales", "biases"); None: all
    source_bytes: int = 0  # progress reported when the job is written
    cost: int = 0  # estimated working memory


@dataclass
class OutTensor:
    output: Output  # the plan's record of it (name, dtype, shape, file)
    dtype: torch.dtype
    jobs: list[int]  # indexes into Layout.jobs: one, or one per expert slice when `stacked`
    key: str  # which of the job's results this tensor is
    stacked: bool = False


@dataclass
class Layout:
    """How the plan's outputs are produced: the jobs, in file order, and the config.json facts."""

    tensors: list[OutTensor] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    converted: dict[str, Params] = field(default_factory=dict)  # mlx layer path -> its quantization
    kept_float: set[str] = field(default_factory=set)  # mlx layer paths written in float


@dataclass
class Layer:
    """One mlx-lm linear layer and the source modules it is made of (one, or every expert)."""

    path: str
    modules: list[str]
    stacked: bool
    order: tuple
    params: Params | None = None
    reasons: dict[str, str] = field(default_factory=dict)


def _name_refusal(name: str) -> str | None:
    if name.endswith(".self_attn.kv_b_proj"):
        # deepseek_v3.sanitize dequantizes it, splits and transposes it, and quantizes both halves again
        return "mlx-lm re-quantizes kv_b_proj at load (it splits and transposes it), so it cannot stay exact"
    return None


class Writer(TargetWriter):
    def refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        return _name_refusal(info.name) or choose(info)[1]

    # -- planning ------------------------------------------------------------------------------
    def fill_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        refuse_online_transforms(reader, "The weights alone are not the model; MLX cannot apply the transform.")
        arch = _architecture(reader.config)
        layers = self._layers(reader, arch, opts)
        if not plan.inspecting:  # exactness is decided from the stored scales, which inspect does not read
            self._scan(reader, layers, opts)
        refused = [(m, why) for layer in layers for m, why in layer.reasons.items()]
        if refused and opts.keep_unsupported != DENSE_FALLBACK:
            for m, why in refused:
                plan.modules[m] = ModulePlan(REFUSED, why)
            name, why = refused[0]
            more = f" (and {len(refused) - 1} more modules)" if len(refused) > 1 else ""
            plan.refuse_modules(UnsupportedConversion(f"{name}: cannot be written as {self.name}: {why}{more}", hint=_HINT))
        layout = Layout()
        units = [(layer.order, "layer", layer) for layer in layers]
        for t in reader.passthrough():
            if reader.is_quantization_param(t):
                plan.dropped.append(t)
            else:
                units.append((source_order(reader, t), "tensor", t))
        for _, kind, unit in sorted(units, key=lambda u: u[0]):
            if kind == "tensor":
                self._add_tensor(reader, plan, layout, unit, opts)
            elif unit.params is not None or opts.keep_unsupported == DENSE_FALLBACK:
                self._add_layer(reader, plan, layout, unit, opts)
        for m in reader.unquantized:
            layout.kept_float.add(arch.locate(m)[0])
        shards = split_shards(layout.tensors, opts.max_shard_size, lambda t: t.output.nbytes)
        for fname, shard in zip(shard_names(len(shards)), shards):
            for t in shard:
                t.output.file = fname
        plan.detail = layout

    def _layers(self, reader: SourceReader, arch: facts.Architecture, opts: RepackOptions) -> list[Layer]:
        grouped: dict[str, list[tuple[int | None, str]]] = {}
        for name in reader.modules:
            path, expert = arch.locate(name)
            grouped.setdefault(path, []).append((expert, name))
        n_experts = arch.num_experts(reader.config)
        layers = []
        for path, members in grouped.items():
            experts = sorted(e for e, _ in members if e is not None)
            stacked = bool(experts)
            if stacked and (len(experts) != len(members) or experts != list(range(n_experts or len(experts)))):
                raise UnsupportedConversion(
                    f"{path}: experts {experts[:8]}{'…' if len(experts) > 8 else ''} found, expected 0..{(n_experts or len(experts)) - 1} "
                    "(mlx-lm stacks every expert of a layer into one switch_mlp tensor)"
                )
            modules = [n for _, n in sorted(members, key=lambda m: m[0] if m[0] is not None else -1)]
            infos = [reader.modules[m] for m in modules]
            layer = Layer(path, modules, stacked, min(source_order(reader, t) for i in infos for t in i.tensors.values()))
            for info in infos:
                if len(info.shape) == 3 and path == info.name:  # not even a float copy would load
                    raise UnsupportedConversion(
                        f"{info.name}: experts stacked in one tensor {list(info.shape)} under a name mlx-lm has no layer for",
                        hint="mlx-lm holds experts as switch_mlp.{gate,up,down}_proj; fused gate_up_proj tensors are not split.",
                    )
                why = self.refusal(info, opts)
                if why is not None:
                    layer.reasons[info.name] = why
            chosen = {choose(i)[0] for i in infos}
            if not layer.reasons and len(chosen) > 1:
                layer.reasons = {m: "the experts of this layer are quantized differently; MLX stacks them in one layer" for m in modules}
            if stacked and len({i.shape for i in infos}) > 1:
                raise UnsupportedConversion(f"{path}: its experts have different shapes; mlx-lm stacks them into one tensor")
            if not layer.reasons:
                layer.params = chosen.pop()
            layers.append(layer)
        return layers

    def _scan(self, reader: SourceReader, layers: list[Layer], opts: RepackOptions) -> None:
        """Decide exactness from the stored scales and zero points (codes are not read)."""
        todo = [(layer, m) for layer in layers if layer.params is not None for m in layer.modules]

        def check(item):
            layer, m = item
            info = reader.modules[m]
            return data_reason(reader.read(m), layer.params, opts.dtype or info.dtype)

        for (layer, m), why in zip(todo, ordered_map(check, todo, max(1, opts.workers))):
            if why is not None:
                layer.reasons[m] = why
        for layer in layers:
            if layer.reasons:
                layer.params = None

    def _add_layer(self, reader: SourceReader, plan: Plan, layout: Layout, layer: Layer, opts: RepackOptions) -> None:
        infos = [reader.modules[m] for m in layer.modules]
        dtype = opts.dtype or infos[0].dtype
        lead = (len(infos),) if layer.stacked else ()
        src_bytes = [reader.source_bytes(m) for m in layer.modules]
        reasons = []
        if layer.params is None:
            out_specs = [("weight", dtype, infos[0].shape)]
            for m in layer.modules:
                why = layer.reasons.get(m) or f"another expert of {layer.path} cannot be held exactly"
                plan.fallbacks.append({"module": m, "tensor": f"{layer.path}.weight", "written_as": "dense", "reason": why})
                reasons.append(why)
            layout.kept_float.add(layer.path)
        else:
            out_specs = specs(infos[0], layer.params, dtype)
            layout.converted[layer.path] = layer.params
        pending = _pending(reader, layer.modules, layer.params, dtype) if plan.inspecting else None
        for e, m in enumerate(layer.modules):
            entry = {"tensor": layer.path}
            if layer.params is not None:
                entry.update(layer.params.as_json())
            if layer.stacked:
                entry["expert"] = e
            status = CONVERTED if layer.params is not None else FALLBACK
            plan.modules[m] = ModulePlan(status, None if status == CONVERTED else reasons[e], pending, entry)
        kind = "module" if layer.params is not None else "dense"
        outputs = []

        def job(i: int, part: str | None) -> int:
            out = sum(math.prod(s) * d.itemsize for n, d, s in out_specs if part in (None, n))
            layout.jobs.append(Job(layer.modules[i], kind, dtype, layer.params, part,
                                   src_bytes[i] if part in (None, "weight") else 0,
                                   2 * (src_bytes[i] + out) + math.prod(infos[i].shape)))
            return len(layout.jobs) - 1

        def add(suffix: str, d: torch.dtype, shape, jobs: list[int], stacked: bool) -> None:
            o = tensor_output(f"{layer.path}.{suffix}", d, shape)
            outputs.append(o)
            layout.tensors.append(OutTensor(o, d, jobs, suffix, stacked))

        if not layer.stacked:
            j = job(0, None)
            for suffix, d, shape in out_specs:
                add(suffix, d, tuple(shape), [j], False)
        else:
            for suffix, d, shape in out_specs:
                add(suffix, d, (*lead, *shape), [job(i, suffix) for i in range(len(infos))], True)
        why = "; ".join(dict.fromkeys(reasons)) or None
        plan.units.append(Unit(tuple(layer.modules), outputs, ENCODE if layer.params is not None else DEQUANTIZE, why, sum(src_bytes)))

    def _add_tensor(self, reader: SourceReader, plan: Plan, layout: Layout, name: str, opts: RepackOptions) -> None:
        m = reader.tensor_meta(name)
        dtype = m.torch_dtype
        if opts.dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2:
            dtype = opts.dtype
        layout.jobs.append(Job(name, "tensor", dtype, source_bytes=m.nbytes, cost=streamed_cost(2 * m.nbytes)))
        o = tensor_output(name, dtype, m.shape)
        layout.tensors.append(OutTensor(o, dtype, [len(layout.jobs) - 1], ""))
        plan.units.append(Unit((name,), [o], CARRY, source_bytes=m.nbytes))

    # -- writing -------------------------------------------------------------------------------
    def write(self, plan: Plan, reader: SourceReader, out: Path, opts: RepackOptions, progress: Progress) -> Files:
        layout: Layout = plan.detail
        files: Files = {}
        order = list(dict.fromkeys(j for t in layout.tensors for j in t.jobs))
        results = ordered_map(lambda j: (j, self._run(reader, layout.jobs[j], opts)), order, max(1, opts.workers),
                              cost=lambda j: layout.jobs[j].cost)
        current: dict[int, dict] = {}

        def result(j: int) -> dict[str, torch.Tensor]:
            if j not in current:
                done, tensors = next(results)
                if done != j:
                    raise RuntimeError(f"job {done} arrived where job {j} was planned")
                current.clear()
                current[j] = tensors
                progress(layout.jobs[j].source_bytes)
            return current[j]

        shards = split_shards(layout.tensors, opts.max_shard_size, lambda t: t.output.nbytes)
        names = shard_names(len(shards))
        weight_map: dict[str, str] = {}
        for fname, shard in zip(names, shards):
            fw = SafetensorsFileWriter(out / fname, [TensorSpec(t.output.name, t.dtype, t.output.shape) for t in shard],
                                       metadata=dict(facts.SAFETENSORS_METADATA))
            try:
                for t in shard:
                    if t.stacked:
                        fw.add_stacked(t.output.name, (result(j)[t.key] for j in t.jobs))
                    else:
                        fw.add(t.output.name, result(t.jobs[0])[t.key])
                    weight_map[t.output.name] = fname
                sha = fw.close()
            except BaseException:
                fw.abort()
                raise
            files[fname] = {"sha256": sha, "size": fw.size}
        if len(names) > 1:
            total = sum(t.output.nbytes for t in layout.tensors)
            write_json(out, "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, files)
        block = quantization_block(layout.converted, sorted(layout.kept_float - set(layout.converted)))
        config, added = mlx_config(reader.config, block, str(opts.dtype).removeprefix("torch.") if opts.dtype else None)
        if added:
            plan.notes.append(
                f"config.json: added {', '.join(added)}: mlx-lm's model classes read only the names "
                "transformers used before version 5"
            )
        write_json(out, "config.json", config, files)
        copy_other_files(reader, out, files)
        return files

    @staticmethod
    def _run(reader: SourceReader, job: Job, opts: RepackOptions) -> dict[str, torch.Tensor]:
        if job.kind == "tensor":
            return {"": carried(reader, job.source, lambda t: exact_cast(t, job.dtype, f"tensor {job.source}"), job.dtype)}
        qw = reader.read(job.source)
        if opts.device != "cpu":
            qw = qw.to(opts.device)
        if job.kind == "dense":
            return {"weight": qw.dequantize(job.dtype)}
        return encode(qw, job.params, job.dtype, None if job.part is None else (job.part,))


def _pending(reader: SourceReader, modules: list[str], params: Params | None, dtype: torch.dtype) -> str | None:
    """For `inspect`: what the scan of the stored scales still decides for a layer headers allow
    (symmetric affine codes with scales already in the output dtype and no g_idx need no scan:
    -z*s is then a power of two times a value of that dtype)."""
    if params is None:
        return None
    if params.mode == facts.AFFINE:
        name = str(dtype).removeprefix("torch.")
        infos = [reader.modules[m] for m in modules]
        if all(not i.has_g_idx and "weight_zero_point" not in i.tensors and i.scheme.symmetric and "weight_scale" in i.tensors
               and reader.tensor_meta(i.tensors["weight_scale"]).torch_dtype == dtype for i in infos):
            return None
        return f"whether the stored scales and -z*s are {name} values and g_idx is trivial (read from the data)"
    if params.mode == "nvfp4":
        return "whether the global scale folds exactly into the E4M3 block scales (read from the data)"
    return None


def _architecture(config: dict) -> facts.Architecture:
    arch = facts.architecture(config)
    if arch is None:
        name = (config.get("architectures") or ["?"])[0]
        supported = ", ".join(sorted(facts.ARCHITECTURES))
        raise UnsupportedConversion(
            f"{name} (model_type {config.get('model_type')!r}): not an architecture the mlx target writes",
            hint=f"Supported model types: {supported}. Other names would need renames mlx-lm does not do; "
            "use --target dense and mlx_lm.convert instead.",
        )
    return arch


