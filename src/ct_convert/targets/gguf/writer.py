"""`--target gguf`: one self-contained GGUF (or split parts) for llama.cpp and ollama (gguf.md), and
for a multimodal source the vision tower's mmproj file beside it (mmproj.py).

Every quantized module becomes the ggml block type that holds it exactly (mapping.py), or its
dequantized weight in the source float type (F32 where llama.cpp requires it), listed as a fallback.
The plan comes from headers, the architecture class (architectures/) and a scan of the scales, and
holds the complete metadata; the file is then streamed tensor by tensor through gguf-py (tensor
infos first, data in the same order), stacked MoE experts one expert at a time.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
import torch

from ct_convert import architectures
from ct_convert.architectures import vision
from ct_convert.architectures.base import ModelBase, Part, slot
from ct_convert.bands import carried, pieces, streamed_cost
from ct_convert.errors import InputError, UnsupportedConversion
from ct_convert.parallel import ordered_map
from ct_convert.plan import CARRY, CONSTANT, CONVERTED, DEQUANTIZE, ENCODE, FALLBACK, ModulePlan, Output, Plan, Unit
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.sink import HashingSink
from ct_convert.targets.gguf import facts, hparams, mapping, mmproj, vocab
from ct_convert.targets.writer_base import Files, Progress, RepackOptions, TargetWriter, refuse_online_transforms

OUTPUT_STEM = "model"


@dataclass
class Entry:
    """One GGUF tensor and where its bytes come from."""

    name: str
    kind: str  # "module" (quantized source modules) | "tensor" (carried) | "constant"
    parts: list[str]  # source module or tensor names; experts in expert order
    ggml: str
    shape: tuple[int, ...]  # numpy order: (N, K) or (E, N, K)
    reason: str | None = None  # why a quantized module is written dense
    part: Part | None = None  # how each source becomes (its slice of) this tensor: rows, heads, transpose
    value: Callable[[str, torch.Tensor], torch.Tensor] | None = None  # a carried tensor's stored value (ModelBase.stored_value)
    constant: torch.Tensor | None = None
    order: tuple = ()
    pending: str | None = None  # inspect only: what the scale scan decides

    @property
    def nbytes(self) -> int:
        return facts.nbytes(self.ggml, self.shape)


class GGUFWriter(TargetWriter):

    def fill_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        model, entries, tower_modules, tower_tensors = _layout(plan, reader, opts)
        tower, mm_entries = mmproj.layout(plan, reader, tower_modules, tower_tensors, opts)
        if opts.strict:
            _refuse_fallbacks(entries + mm_entries, "")
        copied = vocab.read_vocab_from(opts.vocab_from) if opts.vocab_from is not None else None
        n_vocab = _n_vocab(entries)
        if plan.inspecting:
            plan.at_repack = vocab.survey(reader.root, opts.vocab_from)
            for e in entries + mm_entries:
                if e.kind == "module" and e.reason is None:
                    e.pending = _pending(reader, e)
        else:
            voc = vocab.load(reader.root, reader.config, n_vocab, copied, opts.strict, model.name)
            _refuse_unloadable_vocab(reader, voc, n_vocab)
            entries = _scan_scales(reader, model, entries)
            mm_entries = _scan_scales(reader, tower, mm_entries)
            if opts.strict:
                _refuse_fallbacks(entries + mm_entries, " (found in its scales)")
        _modules(plan, entries + mm_entries)
        plan.units = _units(reader, entries) + _units(reader, mm_entries)
        if plan.fallbacks:
            kinds = sorted({f["written_as"] for f in plan.fallbacks})
            plan.notes.append(
                f"{len(plan.fallbacks)} quantized module(s) written unquantized ({'/'.join(kinds)}) because no GGUF type "
                f"holds them exactly; see fallbacks (e.g. {plan.fallbacks[0]['module']}: {plan.fallbacks[0]['reason']})"
            )
        if plan.inspecting:
            return
        plan.notes.extend(voc.notes)
        w = _metadata(reader, model, entries, voc, n_vocab)
        if sum(e.nbytes for e in entries) > opts.max_shard_size:
            w.split_max_size = opts.max_shard_size
        outputs = {o.name: o for o in plan.outputs()}
        plan.detail = [_file(w, OUTPUT_STEM, entries, outputs)]
        n = len(plan.detail[0][2])
        if n > 1:
            plan.notes.append(f"split into {n} parts: load the first ({OUTPUT_STEM}-00001-of-{n:05d}.gguf)")
        if tower is not None:  # never split: llama.cpp's clip loader reads one file
            plan.detail.append(_file(mmproj.metadata(reader, tower, _file_type(mm_entries)), mmproj.STEM, mm_entries, outputs))

    def write(self, plan: Plan, reader: SourceReader, out: Path, opts: RepackOptions, progress: Progress) -> Files:
        # every source of every unit, in file order, computed up to `workers` ahead of the writer
        jobs = [(unit, source) for unit in plan.units for source in (unit.sources if len(unit.sources) > 1 else [None])]
        produced = ordered_map(lambda job: _produce(reader, *job), jobs, opts.workers, cost=lambda job: _job_bytes(reader, *job))
        chunks = itertools.chain.from_iterable(produced)
        files: Files = {}
        for w, stem, shards in plan.detail:
            files.update(_write_file(w, out / f"{stem}.gguf", shards, chunks, progress))
        return files


def _file(w: gguf.GGUFWriter, stem: str, entries: list[Entry], outputs: dict[str, Output]) -> tuple:
    """(writer, file stem, entries per part) with every tensor's info added and its Output's file set."""
    for e in entries:
        w.add_tensor_info(e.name, e.shape, np.dtype(np.float32), e.nbytes, raw_dtype=gguf.GGMLQuantizationType[e.ggml])
    files = [p.name for p in w.format_shard_names(Path(f"{stem}.gguf"))]
    for fname, names in zip(files, w.tensors):
        for name in names:
            outputs[name].file = fname
    by_name = {e.name: e for e in entries}
    return w, stem, [[by_name[n] for n in names] for names in w.tensors]


def _write_file(w: gguf.GGUFWriter, path: Path, shards: list[list[Entry]], chunks, progress: Progress) -> Files:
    files: Files = {}
    w.open_output_file(path)
    sinks = w.fout = [HashingSink(f, file) for f, file in zip(w.fout, w.format_shard_names(path))]  # gguf-py writes through these
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for sink, entries in zip(sinks, shards):
            for e in entries:
                w.write_tensor_data(_Stream(e.nbytes, itertools.islice(chunks, len(e.parts) or 1), progress))
            sha, size = sink.finish()
            files[sink.path.name] = {"sha256": sha, "size": size}
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    return files


def _metadata(reader: SourceReader, model: ModelBase, entries: list[Entry], voc: vocab.Vocab, n_vocab: int) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(None, model.name)
    w.add_name(reader.root.name)
    model.add_hparams(w, n_vocab)
    if voc.kind == "none" and not model.writes_vocab_size:
        w.add_vocab_size(n_vocab)
    file_type = _file_type(entries)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add(w, voc)
    return w


def _layout(plan: Plan, reader: SourceReader, opts: RepackOptions) -> tuple[ModelBase, list[Entry], list[str], list[str]]:
    """The text file's entries, and the vision tower's modules and tensors (for mmproj.py)."""
    model = _model(reader)
    tower_cls = vision.lookup(reader.config)
    tower_modules, tower_tensors = [], []
    refuse_online_transforms(reader, "The weights alone are not the model; llama.cpp cannot apply the transform.")
    entries = []
    grouped: dict[str, list[tuple[int, str, str]]] = {}  # gguf name -> [(expert, kind, source)]
    layouts: dict[str, Part] = {}  # gguf name -> how its sources are cut and arranged

    def place(hf_weight: str, kind: str, source: str) -> None:
        parts = model.modify_tensors(hf_weight)
        if parts is None:
            raise UnsupportedConversion(
                f"{source}: no llama.cpp {model.name} tensor corresponds to it",
                hint="llama.cpp rejects files with unknown tensors; this checkpoint has parts the architecture lacks.",
            )
        for p in parts:
            grouped.setdefault(p.name, []).append((-1 if p.expert is None else p.expert, kind, source))
            layouts[p.name] = p

    for name in reader.modules:
        if vision.in_tower(model, tower_cls, name):
            tower_modules.append(name)
            continue
        if model.is_dropped(f"{name}.weight"):
            plan.dropped.append(name)
            continue
        place(f"{name}.weight", "module", name)
    for t in reader.passthrough():
        if reader.is_quantization_param(t):
            plan.dropped.append(t)
        elif vision.in_tower(model, tower_cls, t):
            tower_tensors.append(t)
        elif model.is_dropped(t):
            plan.dropped.append(t)
        else:
            place(t, "tensor", t)
    n_experts = model.expert_count()
    for g, items in grouped.items():
        entries.append(_entry(reader, model, g, sorted(items), layouts[g], n_experts, opts))
    for name, value in model.extra_tensors():
        entries.append(Entry(name, "constant", [], "F32", tuple(value.shape), constant=value))
    entries.sort(key=lambda e: e.order)
    return model, entries, tower_modules, tower_tensors


def _model(reader: SourceReader) -> ModelBase:
    config = reader.config
    cls = architectures.lookup(config)
    if cls is None:
        name = architectures.hf_architecture(config)
        raise UnsupportedConversion(
            f"architecture {name or '(none in config.json)'} is not supported by --target gguf",
            hint=f"Supported: {', '.join(sorted(architectures.ARCHITECTURES))}.",
        )
    hparams.check(reader, cls)  # the numbers the class builds from, before it does
    model = cls.from_config(config)
    model.bind_source(reader.root)
    return model


def _entry(reader: SourceReader, model: ModelBase, g: str, items, part: Part, n_experts, opts: RepackOptions) -> Entry:
    experts = [e for e, _, _ in items]
    kinds = {k for _, k, _ in items}
    sources = [s for _, _, s in items]
    if experts != [-1]:
        if -1 in experts or experts != list(range(n_experts or 0)):
            raise InputError(
                f"{g}: experts {experts[:8]}{'…' if len(experts) > 8 else ''} found, expected 0..{(n_experts or 0) - 1} "
                "(llama.cpp needs every expert of a layer, stacked)"
            )
        if len(kinds) > 1:
            raise UnsupportedConversion(f"{g}: some experts are quantized and others are not; they must share one ggml type")
    kind = kinds.pop()
    order = min(_order_key(reader, s, kind) for s in sources)
    s = slot(g)
    if kind == "tensor":
        meta = reader.tensor_meta(sources[0])
        dtype = meta.torch_dtype
        if dtype not in facts.DENSE_TYPES:
            raise UnsupportedConversion(f"{sources[0]}: a {dtype} tensor has no place in a GGUF")
        one_d = len(meta.shape) <= 1
        ggml = "F32" if one_d or not g.endswith(".weight") or "_norm" in s or s in model.f32_slots else mapping.dense_type(dtype)
        shape = part.shape(tuple(meta.shape))
        shape = shape if len(sources) == 1 else (len(sources), *shape)
        return Entry(g, kind, sources, ggml, shape, part=part, value=model.stored_value, order=order)
    infos = [reader.modules[s] for s in sources]
    choices = {mapping.choose(i, s, model, opts.nvfp4) for i in infos}
    ggml, reason = choices.pop() if len(choices) == 1 else (None, "the experts of this layer map to different types")
    if part.transpose and reason is None:
        reason = "stored transposed per head (llama.cpp's layout), which the quantization groups do not follow"
    if reason is not None:
        ggml = "F32" if s in model.f32_slots else mapping.dense_type(infos[0].dtype)
    shape = part.shape(tuple(infos[0].shape))
    shape = shape if len(infos) == 1 else (len(infos), *shape)
    return Entry(g, "module", sources, ggml, shape, reason=reason, part=part, order=order)


def _rows(shape: tuple[int, ...]) -> int:
    """The row count of a source tensor (its only dimension for 1-D ones)."""
    return shape[-2] if len(shape) > 1 else shape[0]


def _order_key(reader: SourceReader, source: str, kind: str) -> tuple:
    """Source order (file, offset), so reads sweep each shard front to back."""
    t = source if kind == "tensor" else min(reader.modules[source].tensors.values())
    return (1, *reader.order_key(t), source)


def _scan_scales(reader: SourceReader, model: ModelBase, entries: list[Entry]) -> list[Entry]:
    """Confirm quantized types from the stored scales (no codes read) where the headers cannot (what
    inspect calls decided at repack); add NVFP4 `.scale` tensors."""
    extra = []
    for e in entries:
        if e.kind != "module" or e.ggml not in facts.QUANTIZED:
            continue
        if e.ggml != "NVFP4" and _pending(reader, e) is None:
            continue  # fp16 scales and no g_idx: exact from the headers alone
        multipliers = []
        for s in e.parts:
            qw = reader.read(s)
            why = mapping.data_reason(qw, e.ggml)
            if why is not None:
                e.reason = f"{s}: {why}" if len(e.parts) > 1 else why
                e.ggml = "F32" if slot(e.name) in model.f32_slots else mapping.dense_type(qw.dtype)
                break
            if e.ggml == "NVFP4":
                multipliers.append(mapping.nvfp4_multiplier(qw))
        if e.ggml == "NVFP4":
            values = torch.cat(multipliers)
            base = e.name.removesuffix(".weight")
            extra.append(Entry(f"{base}.scale", "constant", [], "F32", tuple(values.shape), constant=values, order=e.order + (1,)))
    return sorted(entries + extra, key=lambda e: e.order)


def _pending(reader: SourceReader, e: Entry) -> str | None:
    """What only the scales of a module entry's sources decide, or None."""
    return next(filter(None, (mapping.at_repack(reader.modules[s], e.ggml) for s in e.parts)), None)


def _modules(plan: Plan, entries: list[Entry]) -> None:
    """Each source module's fate, as the manifest records it (tensor, type, expert index)."""
    for e in entries:
        if e.kind != "module":
            continue
        for i, s in enumerate(e.parts):
            entry = {"tensor": e.name, "type": e.ggml}
            if len(e.parts) > 1:
                entry["expert"] = i
            reason, pending = e.reason, e.pending
            if s in plan.modules:  # a split: one module in several tensors, a fallback if any of them is
                seen = plan.modules[s]
                entry["tensor"] = [*_listed(seen.manifest["tensor"]), e.name]
                entry["type"] = [*_listed(seen.manifest["type"]), e.ggml]
                reason, pending = seen.reason or reason, seen.at_repack or pending
            plan.modules[s] = ModulePlan(FALLBACK if reason else CONVERTED, reason, pending, entry)
            if e.reason:
                plan.fallbacks.append({"module": s, "tensor": e.name, "written_as": e.ggml, "reason": e.reason})


def _listed(x) -> list:
    return [x] if isinstance(x, str) else x


def _units(reader: SourceReader, entries: list[Entry]) -> list[Unit]:
    """Entries as units of work: the parts of one tensor (experts) are one unit; consecutive tensors
    cut from one source (a split) share one unit, so the source is decoded once."""
    units: list[Unit] = []
    for e in entries:
        out = Output(e.name, e.ggml, e.shape, e.nbytes)
        last = units[-1] if units else None
        if last is not None and len(e.parts) == 1 and last.sources == tuple(e.parts) and last.detail[0].kind == e.kind:
            last.outputs.append(out)
            last.detail.append(e)
            continue
        if e.kind == "constant":
            how, cost = CONSTANT, 0
        elif e.kind == "tensor":
            how, cost = CARRY, sum(reader.tensor_meta(s).nbytes for s in e.parts)
        else:
            how, cost = (DEQUANTIZE if e.reason else ENCODE), sum(reader.source_bytes(s) for s in e.parts)
        units.append(Unit(tuple(e.parts), [out], how, e.reason, cost, [e]))
    return units


def _refuse_fallbacks(entries: list[Entry], where: str) -> None:
    bad = [e for e in entries if e.kind == "module" and e.reason is not None]
    if bad:
        e = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise UnsupportedConversion(
            f"{e.parts[0]}: no exact GGUF block type{where}: {e.reason}; --strict refuses the {e.ggml} fallback{more}",
            hint="Drop --strict to write such tensors unquantized (listed in the manifest).",
        )


def _refuse_unloadable_vocab(reader: SourceReader, voc: vocab.Vocab, n_vocab: int) -> None:
    """llama.cpp sizes token_embd by the token count and refuses a file where they differ."""
    tokens = next((value for key, value, *_ in voc.pairs if key == vocab.T.LIST), None)
    if tokens is not None and len(tokens) != n_vocab:
        raise UnsupportedConversion(
            f"{reader.root}: the tokenizer has {len(tokens)} tokens but the token embedding keeps {n_vocab} rows; "
            "llama.cpp loads a GGUF only with one token per row",
            hint="Pass --vocab-from FILE.gguf with a vocabulary of that size.",
        )


def _n_vocab(entries: list[Entry]) -> int:
    for e in entries:
        if e.name == "token_embd.weight":
            return e.shape[-2]
    raise InputError("the checkpoint has no token embedding (model.embed_tokens.weight)")


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
            for band in pieces(chunk):
                data = band.contiguous().view(torch.uint8).reshape(-1).numpy()
                fp.write(memoryview(data))
                written += data.nbytes
            self._progress(source_bytes)
        if written != self.nbytes:
            raise AssertionError(f"wrote {written} bytes for a tensor planned at {self.nbytes}")


def _job_bytes(reader: SourceReader, unit: Unit, source: str | None) -> int:
    """Working memory of one job: its source bytes and the float32 of its weight (codes, fallbacks)."""
    if unit.how == CONSTANT:
        return 0
    sources = unit.sources if source is None else (source,)
    if unit.how == CARRY:
        whole = sum(2 * reader.tensor_meta(s).nbytes for s in sources)
        return streamed_cost(whole) if _streamed(unit) else whole
    return sum(4 * math.prod(reader.modules[s].shape) for s in sources)


def _produce(reader: SourceReader, unit: Unit, source: str | None) -> list[tuple[torch.Tensor, int]]:
    """The chunks of one job and their source bytes: one expert of a stacked tensor (`source`), or
    every tensor of a unit from its one source, decoded once."""
    if unit.how == CONSTANT:
        return [(e.constant.to(torch.float32), 0) for e in unit.detail]
    part = source if source is not None else unit.sources[0]
    if unit.how == CARRY:
        cost = reader.tensor_meta(part).nbytes
        if _streamed(unit):
            e = unit.detail[0]
            return [(carried(reader, part, lambda t: _carried(part, t, e), facts.TORCH_OF[e.ggml]), cost)]
        t = reader.get(part)
        picked = [_carried(part, t, e) for e in unit.detail]
    else:
        qw = reader.read(part)
        picked = [_encoded(qw, e) for e in unit.detail]
        cost = reader.source_bytes(part)
    return [(chunk, cost if i == 0 else 0) for i, chunk in enumerate(picked)]


def _streamed(unit: Unit) -> bool:
    """A carried tensor written whole and in row order (one entry, no split): read, converted and
    written band by band when large (a stored value such as Gemma's 1 + w is elementwise); a split
    one is read whole."""
    p = unit.detail[0].part
    return len(unit.detail) == 1 and p.select is None and p.heads is None and not p.transpose


def _carried(source: str, t: torch.Tensor, e: Entry) -> torch.Tensor:
    t = e.part.arrange(t)
    if e.value is not None:
        t = e.value(source, t)
    return t.to(facts.TORCH_OF[e.ggml])


def _encoded(qw, e: Entry) -> torch.Tensor:
    """A module's part as bytes: blocks of its picked rows (a 3-D view of them is the same bytes), or
    the float values of a dense fallback arranged as the part says (the only way to transpose)."""
    if e.ggml in facts.QUANTIZED:
        return mapping.encode(qw, e.ggml, e.part.rows(_rows(qw.shape)))
    return e.part.arrange(qw.dequantize(facts.TORCH_OF[e.ggml])).contiguous().view(torch.uint8)


Writer = GGUFWriter
