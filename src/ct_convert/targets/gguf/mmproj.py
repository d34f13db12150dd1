"""The second GGUF of a multimodal source: the vision tower and projector as llama.cpp's
`convert_hf_to_gguf.py --mmproj` writes them (`mmproj-model.gguf`, architectures/vision.py), planned
like the text file: carried tensors in the converter's types, quantized tower modules in their exact
block type or dense with a reason. A tower ct-convert cannot write is listed in dropped_tensors and
said so in the manifest's notes and on stderr; never dropped silently.
"""

from __future__ import annotations

import re

import gguf
import torch

from ct_convert.architectures import hf_architecture, vision
from ct_convert.architectures.base import slot
from ct_convert.architectures.vision import VisionTower
from ct_convert.errors import UnsupportedConversion
from ct_convert.plan import Plan
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.targets.gguf import facts, mapping
from ct_convert.targets.gguf import writer as text  # Entry and the text file's helpers (a cycle: used at call time)
from ct_convert.targets.writer_base import RepackOptions

STEM, FILE = facts.MMPROJ_STEM, facts.MMPROJ_FILE
_LAYER = re.compile(r"\.layers\.(\d+)\.")  # a tower's encoder layers (gguf-py's v.blk.N)


def layout(plan: Plan, reader: SourceReader, modules: list[str], tensors: list[str], opts: RepackOptions):
    """(the tower, its entries) or (None, []) when the source has no tower or it is not written."""
    if not modules and not tensors:
        return None, []
    cls = vision.lookup(reader.config)
    try:
        if cls is None:
            raise UnsupportedConversion(f"ct-convert has no vision tower class for {hf_architecture(reader.config)}")
        tower = cls.from_source(reader.config, reader.root)
        _check_layers(tower, modules + tensors)
        return tower, _entries(plan, reader, tower, modules, tensors, opts)
    except UnsupportedConversion as e:
        message = (
            f"the vision tower and projector ({len(modules)} quantized modules, {len(tensors)} tensors) are not written: {e}. "
            f"llama.cpp's multimodal tools need them as {FILE}; the text model is complete without them (listed in dropped_tensors)"
        )
        if opts.strict:
            raise UnsupportedConversion(message, hint="Drop --strict to write the text model alone.") from None
        plan.dropped.extend(t for m in modules for t in reader.modules[m].tensors.values())
        plan.dropped.extend(tensors)
        plan.notes.append(message)
        plan.warnings.append(message)
        return None, []


def _check_layers(tower: VisionTower, names: list[str]) -> None:
    """The tower's layers are 0..block_count-1, as its config says (a claim of 10^9 layers would size
    gguf-py's name map)."""
    layers = {int(m[1]) for n in names if (m := _LAYER.search(n))}
    if len(layers) != tower.n_layers or (layers and (min(layers), max(layers)) != (0, tower.n_layers - 1)):
        held = f"layers {min(layers)}..{max(layers)} ({len(layers)})" if layers else "no layers"
        raise UnsupportedConversion(f"config.json: vision_config.num_hidden_layers is {tower.n_layers}, but the tower's tensors hold {held}")


def _shape(source: str, shape: tuple, part) -> tuple:
    """A part's shape from its source's; its row order must fit the source's rows."""
    try:
        return part.shape(shape)
    except RuntimeError:  # a row order whose heads do not divide the rows
        raise UnsupportedConversion(f"{source}: its {shape[-2] if len(shape) > 1 else shape[0]} rows do not split into the tower's heads") from None


def _entries(plan: Plan, reader: SourceReader, tower: VisionTower, modules, tensors, opts: RepackOptions) -> list:
    entries = {}

    def add(e) -> None:
        if e.name in entries:
            raise UnsupportedConversion(f"{e.parts[0]} and {entries[e.name].parts[0]} both map to the mmproj tensor {e.name}")
        entries[e.name] = e

    def parts(hf_name: str):
        found = tower.modify_tensors(hf_name)
        if not found:
            raise UnsupportedConversion(f"{hf_name}: no llama.cpp mmproj ({tower.projector_type}) tensor corresponds to it")
        return found

    for m in modules:
        info = reader.modules[m]
        for p in parts(f"{m}.weight"):
            forced = tower.forced_type(f"{m}.weight", p.name)
            if forced is not None:
                # the dequantized weight is exact in F32 (an F16 llama.cpp forces may not hold it)
                ggml, reason = "F32", f"llama.cpp's converter forces {forced} for {p.name}"
            else:
                ggml, reason = mapping.choose(info, slot(p.name), tower, opts.nvfp4)
            shape = _shape(m, tuple(info.shape), p)
            add(text.Entry(p.name, "module", [m], ggml, shape, reason=reason, part=p, order=text._order_key(reader, m, "module")))
    for t in tensors:
        if tower.is_dropped(t):
            plan.dropped.append(t)
            continue
        for p in parts(t):
            add(_carried(reader, tower, t, p, _shape(t, tuple(reader.tensor_meta(t).shape), p)))
    for t in reader.passthrough():
        for p in tower.copies(t):
            n = reader.tensor_meta(t).shape[0]
            if int(p.rows(n).max()) >= n:
                raise UnsupportedConversion(f"{t}: {p.name} is its row {int(p.rows(n).max())}, beyond its {n} rows")
            # one row of a text tensor, written as the 1-D tensor the converter's `data_torch[id]` is
            add(_carried(reader, tower, t, p, tuple(reader.tensor_meta(t).shape[-1:])))
    if not plan.inspecting:
        for e in entries.values():
            _check_narrowing(plan, reader, e)
    return sorted(entries.values(), key=lambda e: e.order)


def _carried(reader: SourceReader, tower: VisionTower, source: str, part, shape: tuple):
    """A float tensor in the type llama.cpp's converter gives it (prepare_tensors' rules)."""
    g = part.name
    meta = reader.tensor_meta(source)
    if meta.torch_dtype not in facts.DENSE_TYPES:
        raise UnsupportedConversion(f"{source}: a {meta.torch_dtype} tensor has no place in a GGUF")
    ggml = tower.forced_type(source, g)
    if ggml is None:
        f32 = len(shape) <= 1 or g.endswith("_norm.weight") or not g.endswith(".weight")
        ggml = "F32" if f32 else mapping.dense_type(meta.torch_dtype)
    order = (*text._order_key(reader, source, "tensor"), g)  # a copied row sorts beside its source
    return text.Entry(g, "tensor", [source], ggml, shape, part=part, value=tower.stored_value, order=order)


def _check_narrowing(plan: Plan, reader: SourceReader, e) -> None:
    """A forced F16 (Gemma-3's input projection) that would round a bf16/f32 value: F32 instead."""
    if e.kind != "tensor" or e.ggml != "F16" or reader.tensor_meta(e.parts[0]).torch_dtype == torch.float16:
        return
    t = reader.get(e.parts[0])
    back = t.to(torch.float16).to(t.dtype)
    if not bool(((back == t) | (torch.isnan(back) & torch.isnan(t))).all()):
        e.ggml = "F32"
        plan.notes.append(f"{e.name}: written F32, not the F16 llama.cpp's converter uses, which would round some of its values")


def metadata(reader: SourceReader, tower: VisionTower, file_type: int | None) -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    w.add_name(reader.root.name)
    tower.add_hparams(w)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w
