"""`--target gguf`: one self-contained GGUF (or split parts) for llama.cpp and ollama (gguf.md).

Every quantized module becomes the ggml block type that holds it exactly (mapping.py), or its
dequantized weight in the source float type (F32 where llama.cpp requires it), listed as a fallback.
The file is planned from headers plus a scan of the scales, then streamed tensor by tensor through
gguf-py (tensor infos first, data in the same order), stacked MoE experts one expert at a time.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch

from ct_convert.errors import UnsupportedConversion
from ct_convert.parallel import ordered_map
from ct_convert.qweight import ModuleInfo
from ct_convert.sink import HashingSink
from ct_convert.targets.writer_base import Progress, RepackOptions, WriteReport
from ct_convert import architectures
from ct_convert.architectures.base import ModelBase, slot
from ct_convert.targets.gguf import blocks, mapping, vocab

OUTPUT_STEM = "model"
_GUESS = architectures.ARCHITECTURES["LlamaForCausalLM"](1, 1, 1)  # slot lookup for `refusal`, which has no config


@dataclass
class Entry:
    """One GGUF tensor and where its bytes come from."""

    name: str
    kind: str  # "module" (quantized source modules) | "tensor" (carried) | "constant"
    parts: list[str]  # source module or tensor names; experts in expert order
    ggml: str
    shape: tuple[int, ...]  # numpy order: (N, K) or (E, N, K)
    reason: str | None = None  # why a quantized module is written dense
    select: Callable[[int], torch.Tensor] | None = None  # the source rows it holds, given the source's row count
    constant: torch.Tensor | None = None
    order: tuple = ()

    @property
    def nbytes(self) -> int:
        if self.ggml in mapping.QUANTIZED:
            return math.prod(self.shape[:-1]) * blocks.row_bytes(self.ggml, self.shape[-1])
        return math.prod(self.shape) * mapping.TORCH_OF[self.ggml].itemsize


@dataclass
class Layout:
    model: ModelBase
    entries: list[Entry]
    dropped: list[str] = field(default_factory=list)


class GGUFWriter:
    name = "gguf"

    def refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        parts = _GUESS.modify_tensors(re.sub(r"\.layers\.\d+\.", ".layers.0.", f"{info.name}.weight"))
        _, why = mapping.choose(info, slot(parts[0].name) if parts else "", _GUESS, opts.nvfp4)
        return why

    def check(self, reader, opts: RepackOptions) -> None:
        layout = _layout(reader, opts)
        if opts.strict:
            _refuse_fallbacks(layout.entries, "")
        if opts.vocab_from is not None:
            vocab.check_vocab_from(opts.vocab_from)
        vocab.load(reader.ckpt.root, reader.config, _n_vocab(layout), opts.vocab_from, opts.strict)

    def write(self, reader, out: Path, opts: RepackOptions, progress: Progress) -> WriteReport:
        layout = _layout(reader, opts)
        _scan_scales(reader, layout)
        if opts.strict:
            _refuse_fallbacks(layout.entries, " (found in its scales)")
        voc = vocab.load(reader.ckpt.root, reader.config, _n_vocab(layout), opts.vocab_from, opts.strict)
        report = WriteReport(dropped=sorted(layout.dropped))
        w = self._metadata(reader, layout, voc)
        total = sum(e.nbytes for e in layout.entries)
        if total > opts.max_shard_size:
            w.split_max_size = opts.max_shard_size
        for e in layout.entries:
            w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes, raw_dtype=gguf.GGMLQuantizationType[e.ggml])
        path = out / f"{OUTPUT_STEM}.gguf"
        files = w.format_shard_names(path)
        by_name = {e.name: e for e in layout.entries}
        shards = [[by_name[n] for n in names] for names in w.tensors]
        # every part of every tensor, in file order, computed up to `workers` ahead of the writer
        jobs = [(e, part) for entries in shards for e in entries for part in (e.parts or [None])]
        chunks = ordered_map(lambda job: _chunk(reader, *job), jobs, opts.workers, cost=lambda job: _part_bytes(reader, *job))
        w.open_output_file(path)
        sinks = w.fout = [HashingSink(f, file) for f, file in zip(w.fout, files)]  # gguf-py writes through these
        try:
            w.write_header_to_file(path)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for sink, entries in zip(sinks, shards):
                for e in entries:
                    w.write_tensor_data(_Stream(e.nbytes, itertools.islice(chunks, len(e.parts) or 1), progress))
                sha, size = sink.finish()
                report.files[sink.path.name] = {"sha256": sha, "size": size}
        except BaseException:
            for sink in sinks:
                sink.abort()
            raise
        _report(layout, report, voc, len(files))
        return report

    def _metadata(self, reader, layout: Layout, voc: vocab.Vocab) -> gguf.GGUFWriter:
        w = gguf.GGUFWriter(None, layout.model.name)
        w.add_name(reader.ckpt.root.name)
        layout.model.add_hparams(w, _n_vocab(layout))
        file_type = _file_type(layout.entries)
        if file_type is not None:
            w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add(w, voc)
        return w


def _layout(reader, opts: RepackOptions) -> Layout:
    config = reader.config
    model = _model(config)
    if reader.online_transforms:
        raise UnsupportedConversion(
            f"{reader.online_transforms[0]}: online transform (applied at inference) in this checkpoint",
            hint="The weights alone are not the model; llama.cpp cannot apply the transform.",
        )
    layout = Layout(model, [])
    grouped: dict[str, list[tuple[int, str, str]]] = {}  # gguf name -> [(expert, kind, source)]
    selects = {}  # gguf name -> its row selection

    def place(hf_weight: str, kind: str, source: str) -> None:
        parts = model.modify_tensors(hf_weight)
        if parts is None:
            raise UnsupportedConversion(
                f"{source}: no llama.cpp {model.name} tensor corresponds to it",
                hint="llama.cpp rejects files with unknown tensors; this checkpoint has parts the architecture lacks.",
            )
        for p in parts:
            grouped.setdefault(p.name, []).append((-1 if p.expert is None else p.expert, kind, source))
            selects[p.name] = p.select

    for name in reader.modules:
        place(f"{name}.weight", "module", name)
    for t in reader.passthrough():
        if reader.is_quantization_param(t) or model.is_dropped(t):
            layout.dropped.append(t)
            continue
        place(t, "tensor", t)
    n_experts = model.expert_count()
    for g, items in grouped.items():
        layout.entries.append(_entry(reader, model, g, sorted(items), selects[g], n_experts, opts))
    for name, value in model.extra_tensors():
        layout.entries.append(Entry(name, "constant", [], "F32", tuple(value.shape), constant=value))
    layout.entries.sort(key=lambda e: e.order)
    return layout


def _model(config: dict) -> ModelBase:
    cls = architectures.lookup(config)
    if cls is None:
        name = architectures.hf_architecture(config)
        raise UnsupportedConversion(
            f"architecture {name or '(none in config.json)'} is not supported by --target gguf",
            hint=f"Supported: {', '.join(sorted(architectures.ARCHITECTURES))}.",
        )
    return cls.from_config(config)


def _entry(reader, model: ModelBase, g: str, items, select, n_experts, opts: RepackOptions) -> Entry:
    experts = [e for e, _, _ in items]
    kinds = {k for _, k, _ in items}
    sources = [s for _, _, s in items]
    if experts != [-1]:
        if -1 in experts or experts != list(range(n_experts or 0)):
            raise UnsupportedConversion(
                f"{g}: experts {experts[:8]}{'…' if len(experts) > 8 else ''} found, expected 0..{(n_experts or 0) - 1} "
                "(llama.cpp needs every expert of a layer, stacked)"
            )
        if len(kinds) > 1:
            raise UnsupportedConversion(f"{g}: some experts are quantized and others are not; they must share one ggml type")
    kind = kinds.pop()
    order = min(_order_key(reader, s, kind) for s in sources)
    s = slot(g)
    if kind == "tensor":
        meta = reader.store.meta(sources[0])
        dtype = meta.torch_dtype
        if dtype not in mapping.DENSE_TYPES:
            raise UnsupportedConversion(f"{sources[0]}: a {dtype} tensor has no place in a GGUF")
        one_d = len(meta.shape) <= 1
        ggml = "F32" if one_d or not g.endswith(".weight") or "_norm" in s or s in model.f32_slots else mapping.dense_type(dtype)
        shape = _selected(tuple(meta.shape), select)
        shape = shape if len(sources) == 1 else (len(sources), *shape)
        return Entry(g, kind, sources, ggml, shape, select=select, order=order)
    infos = [reader.modules[s] for s in sources]
    choices = {mapping.choose(i, s, model, opts.nvfp4) for i in infos}
    ggml, reason = choices.pop() if len(choices) == 1 else (None, "the experts of this layer map to different types")
    if reason is not None:
        ggml = "F32" if s in model.f32_slots else mapping.dense_type(infos[0].dtype)
    shape = _selected(tuple(infos[0].shape), select)
    shape = shape if len(infos) == 1 else (len(infos), *shape)
    return Entry(g, "module", sources, ggml, shape, reason=reason, select=select, order=order)


def _rows(shape: tuple[int, ...]) -> int:
    """The row count of a source tensor (its only dimension for 1-D ones)."""
    return shape[-2] if len(shape) > 1 else shape[0]


def _selected(shape: tuple[int, ...], select) -> tuple[int, ...]:
    """A source shape with its rows narrowed to `select` (a split part)."""
    if select is None:
        return shape
    n = len(select(_rows(shape)))
    return (*shape[:-2], n, shape[-1]) if len(shape) > 1 else (n,)


def _order_key(reader, source: str, kind: str) -> tuple:
    """Source order (file, offset), so reads sweep each shard front to back."""
    t = source if kind == "tensor" else min(reader.modules[source].tensors.values())
    m = reader.store.meta(t)
    return (1, str(m.file), m.offsets[0], source)


def _scan_scales(reader, layout: Layout) -> None:
    """Confirm quantized types from the stored scales (no codes read); add NVFP4 `.scale` tensors."""
    extra = []
    for e in layout.entries:
        if e.kind != "module" or e.ggml not in mapping.QUANTIZED:
            continue
        multipliers = []
        for s in e.parts:
            qw = reader.read(s)
            why = mapping.data_reason(qw, e.ggml)
            if why is not None:
                e.reason = f"{s}: {why}" if len(e.parts) > 1 else why
                e.ggml = "F32" if slot(e.name) in layout.model.f32_slots else mapping.dense_type(qw.dtype)
                break
            if e.ggml == "NVFP4":
                multipliers.append(mapping.nvfp4_multiplier(qw))
        if e.ggml == "NVFP4":
            values = torch.cat(multipliers)
            base = e.name.removesuffix(".weight")
            extra.append(Entry(f"{base}.scale", "constant", [], "F32", tuple(values.shape), constant=values, order=e.order + (1,)))
    layout.entries.extend(extra)
    layout.entries.sort(key=lambda e: e.order)


def _refuse_fallbacks(entries: list[Entry], where: str) -> None:
    bad = [e for e in entries if e.kind == "module" and e.reason is not None]
    if bad:
        e = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise UnsupportedConversion(
            f"{e.parts[0]}: no exact GGUF block type{where}: {e.reason}; --strict refuses the {e.ggml} fallback{more}",
            hint="Drop --strict to write such tensors unquantized (listed in the manifest).",
        )


def _n_vocab(layout: Layout) -> int:
    for e in layout.entries:
        if e.name == "token_embd.weight":
            return e.shape[-2]
    raise UnsupportedConversion("the checkpoint has no token embedding (model.embed_tokens.weight)")


def _file_type(entries: list[Entry]) -> int | None:
    """general.file_type (informational): the type holding most bytes among 2-D+ weights."""
    sizes: dict[str, int] = {}
    for e in entries:
        if len(e.shape) >= 2:
            sizes[e.ggml] = sizes.get(e.ggml, 0) + e.nbytes
    top = max(sizes, key=sizes.get) if sizes else None
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "MXFP4": "MOSTLY_MXFP4_MOE"}
    member = names.get(top, f"MOSTLY_{top}")
    return int(gguf.LlamaFileType[member]) if member in gguf.LlamaFileType.__members__ else None


class _Stream:
    """Duck-typed array for `GGUFWriter.write_tensor_data`: writes its chunks one after another."""

    def __init__(self, nbytes: int, chunks: Iterator[tuple[torch.Tensor, int]], progress: Progress):
        self.nbytes = nbytes
        self._chunks = chunks
        self._progress = progress

    def tofile(self, fp) -> None:
        written = 0
        for chunk, source_bytes in self._chunks:
            data = chunk.contiguous().view(torch.uint8).reshape(-1).numpy()
            fp.write(memoryview(data))
            written += data.nbytes
            self._progress(source_bytes)
        if written != self.nbytes:
            raise AssertionError(f"wrote {written} bytes for a tensor planned at {self.nbytes}")


def _part_bytes(reader, e: Entry, part: str | None) -> int:
    """Working memory of one part: its source bytes and the float32 of its weight (codes, fallbacks)."""
    if part is None:
        return 0
    if e.kind == "tensor":
        return 2 * reader.store.meta(part).nbytes
    return 4 * math.prod(reader.modules[part].shape)


def _chunk(reader, e: Entry, part: str | None) -> tuple[torch.Tensor, int]:
    """One part of a GGUF tensor (a module, a carried tensor or one expert) and its source bytes."""
    if e.kind == "constant":
        return e.constant.to(torch.float32), 0
    if e.kind == "tensor":
        t = reader.get(part).to(mapping.TORCH_OF[e.ggml])
        rows = e.select(_rows(tuple(t.shape))) if e.select else None
        if rows is not None:
            t = t.index_select(-2 if t.dim() > 1 else 0, rows)
        return t, reader.store.meta(part).nbytes
    qw = reader.read(part)
    rows = e.select(_rows(qw.shape)) if e.select else None
    return mapping.encode(qw, e.ggml, rows), sum(reader.store.meta(t).nbytes for t in qw.info.tensors.values())


def _report(layout: Layout, report: WriteReport, voc: vocab.Vocab, n_files: int) -> None:
    for e in layout.entries:
        if e.kind != "module":
            continue
        for i, s in enumerate(e.parts):
            entry = {"status": "dense" if e.reason else "converted", "tensor": e.name, "type": e.ggml}
            if len(e.parts) > 1:
                entry["expert"] = i
            report.modules[s] = entry
            if e.reason:
                report.fallbacks.append({"module": s, "tensor": e.name, "written_as": e.ggml, "reason": e.reason})
    if report.fallbacks:
        kinds = sorted({f["written_as"] for f in report.fallbacks})
        report.notes.append(
            f"{len(report.fallbacks)} quantized module(s) written unquantized ({'/'.join(kinds)}) because no GGUF type "
            f"holds them exactly; see fallbacks (e.g. {report.fallbacks[0]['module']}: {report.fallbacks[0]['reason']})"
        )
    report.notes.extend(voc.notes)
    if n_files > 1:
        report.notes.append(f"split into {n_files} parts: load the first ({OUTPUT_STEM}-00001-of-{n_files:05d}.gguf)")


Writer = GGUFWriter
