"""The shared machinery of targets that write a Hugging Face folder of safetensors shards
(dense, awq, gptq, marlin): a target module only says, per quantized module, which tensors it
emits (`specs`) and how to compute them (`convert`), plus its `quantization_config`.

Work is streamed: shards are planned from header facts, then modules are converted by a bounded
pool of threads (torch releases the GIL in its kernels) and written in order, so memory holds only
the modules in flight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ct_convert.errors import UnsupportedConversion
from ct_convert.output import copy_with_hash, write_bytes_with_hash
from ct_convert.parallel import ordered_map
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.safetensors_out import SafetensorsFileWriter, TensorSpec, shard_names
from ct_convert.targets.writer_base import Progress, RepackOptions, WriteReport, exact_cast

DENSE_FALLBACK = "dense"


@dataclass
class Item:
    """One unit of work: a quantized module, or one tensor carried over."""

    module: str | None
    tensor: str | None
    specs: list[TensorSpec]
    source_bytes: int
    fallback: bool = False


class HFWriter:
    """Base class; subclasses set `name` and implement `refusal`, `specs`, `convert`, `quantization_config`."""

    name = ""

    # -- what a target says -------------------------------------------------------------------
    def refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        raise NotImplementedError

    def specs(self, info: ModuleInfo, opts: RepackOptions) -> list[TensorSpec]:
        """The tensors written for a quantized module, names relative to the module."""
        raise NotImplementedError

    def convert(self, qw: QuantizedWeight, opts: RepackOptions) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def quantization_config(self, reader, report: WriteReport, opts: RepackOptions) -> dict | None:
        raise NotImplementedError

    def check(self, reader, opts: RepackOptions) -> None:
        if reader.online_transforms:
            raise UnsupportedConversion(
                f"{reader.online_transforms[0]}: online transform (applied at inference) in this checkpoint",
                hint="The weights alone are not the model; ct-convert cannot port online transforms yet.",
            )
        self.plan(reader, opts)  # module refusals, from headers alone, before OUTPUT is created

    def carries(self, reader, name: str) -> bool:
        """Whether a tensor outside the quantized modules is written (activation qparams are not)."""
        return not reader.is_quantization_param(name)

    def passthrough_dtype(self, dtype: torch.dtype, opts: RepackOptions) -> torch.dtype:
        if opts.dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2:
            return opts.dtype
        return dtype

    # -- the shared pipeline ------------------------------------------------------------------
    def plan(self, reader, opts: RepackOptions) -> tuple[list[Item], WriteReport]:
        report = WriteReport()
        refused = []
        items_at: dict[str, Item] = {}
        for name, info in reader.modules.items():
            why = self.refusal(info, opts)
            if why and opts.keep_unsupported != DENSE_FALLBACK:
                refused.append((name, why))
                continue
            fallback = why is not None
            specs = (
                [TensorSpec("weight", opts.dtype or info.dtype, info.shape)] if fallback else self.specs(info, opts)
            )
            first = min(info.tensors.values(), key=lambda n: _order_key(reader, n))
            src_bytes = sum(reader.store.meta(t).nbytes for t in info.tensors.values())
            items_at[first] = Item(name, None, [TensorSpec(f"{name}.{s.name}", s.dtype, s.shape) for s in specs], src_bytes, fallback)
            if fallback:
                report.fallbacks.append({"module": name, "written_as": "dense", "reason": why})
        if refused:
            name, why = refused[0]
            more = f" (and {len(refused) - 1} more modules)" if len(refused) > 1 else ""
            raise UnsupportedConversion(
                f"{name}: cannot be written as {self.name}: {why}{more}",
                hint="Pass --keep-unsupported dense to write such modules dequantized, or choose another --target.",
            )
        for t in reader.passthrough():
            if not self.carries(reader, t):
                report.dropped.append(t)
                continue
            m = reader.store.meta(t)
            items_at[t] = Item(None, t, [TensorSpec(t, self.passthrough_dtype(m.torch_dtype, opts), m.shape)], m.nbytes)
        items = [items_at[k] for k in sorted(items_at, key=lambda n: _order_key(reader, n))]
        return items, report

    def write(self, reader, out: Path, opts: RepackOptions, progress: Progress) -> WriteReport:
        items, report = self.plan(reader, opts)
        shards = _split(items, opts.max_shard_size)
        names = shard_names(len(shards))
        weight_map: dict[str, str] = {}
        total = 0
        results = self._produce(reader, items, opts)
        for fname, shard in zip(names, shards):
            specs = [s for it in shard for s in it.specs]
            fw = SafetensorsFileWriter(out / fname, specs)
            try:
                for it in shard:
                    tensors = next(results)
                    for spec in it.specs:
                        fw.add(spec.name, tensors[spec.name])
                        weight_map[spec.name] = fname
                        total += spec.nbytes
                    if it.module is not None:
                        report.modules[it.module] = {"status": "dense" if it.fallback else "converted"}
                    progress(it.source_bytes)
                sha = fw.close()
            except BaseException:
                fw.abort()
                raise
            report.files[fname] = {"sha256": sha, "size": fw.size}
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            self._json(out, "model.safetensors.index.json", index, report)
        self._config(reader, out, opts, report)
        for rel in reader.ckpt.other_files():
            sha, size = copy_with_hash(reader.ckpt.root / rel, out / rel)
            report.files[str(rel)] = {"sha256": sha, "size": size}
        return report

    def _produce(self, reader, items: list[Item], opts: RepackOptions):
        """Yield each item's tensors in order, computing up to `workers` items ahead."""
        workers = max(1, opts.workers)

        def run(it: Item) -> dict[str, torch.Tensor]:
            if it.module is None:
                t = reader.get(it.tensor)
                return {it.tensor: exact_cast(t, it.specs[0].dtype, f"tensor {it.tensor}")}
            qw = reader.read(it.module)
            if opts.device != "cpu":
                qw = qw.to(opts.device)
            if it.fallback:
                produced = {"weight": qw.dequantize(it.specs[0].dtype)}
            else:
                produced = self.convert(qw, opts)
            return {f"{it.module}.{k}": v for k, v in produced.items()}

        return ordered_map(run, items, workers, cost=lambda it: it.source_bytes + sum(s.nbytes for s in it.specs))

    def _config(self, reader, out: Path, opts: RepackOptions, report: WriteReport) -> None:
        config = json.loads(json.dumps(reader.config))
        qc = self.quantization_config(reader, report, opts)
        # drop every place the compressed-tensors config can live, then write the target's own
        config.pop("compression_config", None)
        if isinstance(config.get("text_config"), dict):
            config["text_config"].pop("quantization_config", None)
        config.pop("quantization_config", None)
        if qc is not None:
            config["quantization_config"] = qc
        if opts.dtype is not None:
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(opts.dtype).removeprefix("torch.")
        self._json(out, "config.json", config, report)

    @staticmethod
    def _json(out: Path, name: str, data: dict, report: WriteReport) -> None:
        raw = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        sha, size = write_bytes_with_hash(out / name, raw)
        report.files[name] = {"sha256": sha, "size": size}


def _order_key(reader, name: str):
    """Source order: shard file, then byte offset, so reads sweep each file once, front to back."""
    m = reader.store.meta(name)
    return (str(m.file), m.offsets[0], name)


def _split(items: list[Item], max_bytes: int) -> list[list[Item]]:
    shards: list[list[Item]] = [[]]
    size = 0
    for it in items:
        n = sum(s.nbytes for s in it.specs)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += n
    return shards
