"""The compressed-tensors reader: finds every module, resolves its format and scheme, decodes it.

`open_checkpoint` reads only headers (plus tiny tensors such as `weight_shape`); `read(name)` then
decodes one module, touching only that module's tensors. Targets use it through `SourceReader`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch

from ct_convert.errors import InputError
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.readers import config as cfg
from ct_convert.readers.formats import ModuleTensors, decoder_for
from ct_convert.readers.matching import Clock, GroupTargets, Targets, class_candidates
from ct_convert.readers.sparse import SparseStore
from ct_convert.source import SourceFiles
from ct_convert.tensorstore import TensorMeta

PAYLOADS = ("weight", "weight_packed")
WEIGHT_PARAMS = {
    "weight",
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
    "weight_global_scale",
    "scale_packed",
    "meta",
}
ACTIVATION_PARAMS = {
    "input_scale",
    "input_zero_point",
    "input_global_scale",
    "output_scale",
    "output_zero_point",
}
ATTENTION_PARAMS = {"k_scale", "v_scale", "q_scale", "k_zero_point", "v_zero_point", "q_zero_point"}
ONLINE_LOCATIONS = {"input", "output", "q_attn", "k_cache"}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "half": torch.float16}


class SourceReader(Protocol):
    """What a target may ask of the source (a writer never reaches into files or configs itself)."""

    modules: dict[str, ModuleInfo]  # quantized modules by name, header facts only
    unquantized: list[str]  # 2-D+ weights the config leaves unquantized
    online_transforms: list[str]  # modules with transforms applied at inference (refused everywhere)
    model_dtype: torch.dtype
    config: dict  # config.json
    architecture: str | None  # config.json's first `architectures` name
    kv_cache_scheme: cfg.QuantArgs | None
    root: Path  # the source folder (its name names a GGUF; tokenizer files are read from it)
    config_file: Path | None  # where `config` was read from (errors name it)

    def read(self, module: str) -> QuantizedWeight: ...
    def get(self, tensor: str) -> torch.Tensor: ...
    def bands(self, tensor: str) -> Iterator[torch.Tensor]: ...
    def tensor_meta(self, tensor: str) -> TensorMeta: ...
    def source_bytes(self, module: str) -> int: ...
    def order_key(self, tensor: str) -> tuple: ...
    def passthrough(self) -> list[str]: ...
    def is_quantization_param(self, tensor: str) -> bool: ...
    def module_extras(self, module: str) -> dict[str, str]: ...
    def other_files(self) -> list[Path]: ...
    def total_bytes(self) -> int: ...


@dataclass
class CompressedTensorsReader:
    files: SourceFiles
    qconfig: cfg.QuantizationConfig
    store: SparseStore
    model_dtype: torch.dtype
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    unquantized: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    online_transforms: list[str] = field(default_factory=list)
    _contexts: dict[str, ModuleTensors] = field(default_factory=dict, repr=False)
    _owned: set[str] = field(default_factory=set, repr=False)

    @property
    def config(self) -> dict:
        return self.files.config

    @property
    def root(self) -> Path:
        return self.files.root

    @property
    def config_file(self) -> Path | None:
        return self.files.config_file

    @property
    def kv_cache_scheme(self) -> cfg.QuantArgs | None:
        return self.qconfig.kv_cache_scheme

    def other_files(self) -> list[Path]:
        """Files an output folder takes unchanged (relative to `root`): everything but weights."""
        return self.files.other_files()

    def tensor_meta(self, name: str) -> TensorMeta:
        return self.store.meta(name)

    def source_bytes(self, module: str) -> int:
        """Bytes stored for a module: what reading it costs."""
        return sum(self.store.meta(t).nbytes for t in self.modules[module].tensors.values())

    def order_key(self, name: str) -> tuple:
        """Where a tensor is stored (file, offset): sorting reads by it sweeps each shard front to back."""
        m = self.store.meta(name)
        return (str(m.file), m.offsets[0])

    def total_bytes(self) -> int:
        return self.store.total_bytes()

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    def read(self, name: str) -> QuantizedWeight:
        info = self.modules[name]
        return decoder_for(info.format).decode(self._contexts[name], info)

    def passthrough(self) -> list[str]:
        """Names of every tensor that is not part of a quantized module's weight payload."""
        return [n for n in self.store.names if n not in self._owned]

    def get(self, name: str) -> torch.Tensor:
        return self.store.get(name)

    def bands(self, name: str) -> Iterator[torch.Tensor]:
        """A tensor as consecutive bands of rows: what carrying or comparing a large one reads."""
        return self.store.bands(name)

    @staticmethod
    def is_quantization_param(name: str) -> bool:
        """Activation, KV-cache and attention qparams: meaningless once quantization is removed."""
        return name.rsplit(".", 1)[-1] in ACTIVATION_PARAMS | ATTENTION_PARAMS

    def module_extras(self, name: str) -> dict[str, str]:
        """Activation qparams (suffix -> tensor name) stored with a quantized module."""
        return {s: t for s, t in self._contexts[name].tensors.items() if s in ACTIVATION_PARAMS}

    def totals(self) -> dict:
        names = self.store.base.names
        stored = self.store.total_bytes()
        params = 0
        dense = 0
        for info in self.modules.values():
            n = math.prod(info.shape)
            params += n
            dense += n * info.dtype.itemsize
        for t in self.passthrough():
            if self.is_quantization_param(t):
                continue
            m = self.store.meta(t)
            params += m.numel
            dense += m.numel * m.torch_dtype.itemsize
        return {"tensors": len(names), "parameters": params, "bytes": stored, "dense_bytes": dense}


def source_order(reader: SourceReader, tensor: str) -> tuple:
    """Source order: shard file, then byte offset (then name), so reads sweep each file once, front to back."""
    return (*reader.order_key(tensor), tensor)


def open_checkpoint(ckpt: SourceFiles) -> CompressedTensorsReader:
    where = str(ckpt.config_file or ckpt.root)
    located = cfg.locate(ckpt.config)
    if located is None:
        raise InputError(
            f"{where}: no quantization_config: this is not a compressed-tensors checkpoint",
            hint="Point ct-convert at a checkpoint written by llm-compressor / compressed-tensors.",
        )
    qc_raw, _ = located
    try:
        qconfig = cfg.parse(qc_raw, where)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        # a value of the wrong JSON type deep inside a group: name the file, never crash
        raise InputError(f"{where}: malformed quantization_config ({type(e).__name__}: {e})") from None
    store = SparseStore(ckpt.store)
    reader = CompressedTensorsReader(ckpt, qconfig, store, _model_dtype(ckpt.config, store))
    _discover(reader, Clock(where))
    return reader


def _model_dtype(config: dict, store) -> torch.dtype:
    for source in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            v = source.get(key)
            if isinstance(v, str) and v.removeprefix("torch.") in _DTYPES:
                return _DTYPES[v.removeprefix("torch.")]
    for name in store.names:
        if name.endswith(".weight"):
            dt = store.meta(name).torch_dtype
            if dt in (torch.bfloat16, torch.float16, torch.float32):
                return dt
    return torch.bfloat16


def _discover(r: CompressedTensorsReader, clock: Clock) -> None:
    store, qc = r.store, r.qconfig
    by_module: dict[str, dict[str, str]] = {}
    for name in store.names:
        if "." not in name:
            continue
        prefix, suffix = name.rsplit(".", 1)
        by_module.setdefault(prefix, {})[suffix] = name
    candidates = sorted(
        p for p, t in by_module.items() if any(s in t for s in PAYLOADS) or {"scale_packed", "meta"} <= set(t)
    )
    names = frozenset(candidates)
    weight_groups = [g for g in qc.groups if g.weights is not None]
    classes = class_candidates(weight_groups, names)
    explicit = GroupTargets(weight_groups, clock)
    ignore = Targets(qc.ignore, clock)
    sparsity = _SparsityTargets(qc.sparsity, clock)
    r.online_transforms = _online_transforms(qc, store.names)
    for p in candidates:
        tensors = {s: n for s, n in by_module[p].items() if s in WEIGHT_PARAMS | ACTIVATION_PARAMS}
        sparse = store.sparse_structure(f"{p}.weight")
        inferred = infer_format(store, tensors)
        quantized = inferred != "dense"
        group, how = explicit.explicit_match(p)
        ignored = ignore.ignores(p)
        if sparse and not quantized and not sparsity.targets_module(p, store.meta(f"{p}.weight").shape):
            # <= 0.8 bitmask-compressed every tensor, whatever the config targeted: a storage detail
            sparse = None
        if not quantized and not sparse:
            if "weight_scale" in tensors and not ignored:
                # fake-quantized `dense` format: a quantized module stored as floats on the grid
                group = group or _pick_class_group(p, classes, inferred)
            if group is None or ignored or "weight_scale" not in tensors:
                if group is not None and not ignored:
                    r.warnings.append(f"{p}: the config targets it but it carries no quantization tensors")
                if len(store.meta(f"{p}.weight").shape) >= 2 and p not in r.online_transforms:
                    r.unquantized.append(p)
                continue
        if quantized and group is None:
            group = _pick_class_group(p, classes, inferred)
            if group is None:
                payload = next(tensors[s] for s in ("weight_packed", "weight") if s in tensors)
                raise InputError(
                    f"{p}: its tensors ({payload} is {store.meta(payload).dtype}) look {inferred}, "
                    "which no config group targeting it describes",
                    hint="The quantization_config does not describe this checkpoint (or the file is corrupt).",
                )
        if quantized and ignored:
            r.warnings.append(f"{p}: listed in ignore, but its tensors are quantized; reading it as quantized")
        fmt = _resolve_format(p, group, qc, inferred, sparse, r.warnings)
        mt = ModuleTensors(p, tensors, store, group, qc, r.model_dtype)
        info = decoder_for(fmt).describe(mt, fmt)
        info.sparsity = sparse or info.sparsity or sparsity.declared(p)
        if group is not None and group.input_activations is not None:
            info.input_activations = group.input_activations.as_json()
        r.modules[p] = info
        r._contexts[p] = mt
        r._owned.update(n for s, n in tensors.items() if s in WEIGHT_PARAMS)


class _SparsityTargets:
    """The sparsity_config's targets and ignore list, compiled once."""

    def __init__(self, sc: cfg.SparsityConfig | None, clock: Clock):
        self.sc = sc
        self.targets = Targets(sc.targets if sc else (), clock)
        self.ignore = Targets(sc.ignore if sc else (), clock)

    def declared(self, p: str) -> str | None:
        """A `dense` sparsity_config only declares that stored weights follow a pattern (e.g. 2:4)."""
        sc = self.sc
        if sc is None or sc.structure in ("unstructured", "0:0"):
            return None
        if sc.targets and not self.targets.matches(p) and not _class_only(sc.targets):
            return None
        if self.ignore.matches(p):
            return None
        return sc.structure

    def targets_module(self, p: str, shape) -> bool:
        sc = self.sc
        if sc is None or len(shape) < 2 or self.ignore.matches(p):
            return False
        if not sc.targets or self.targets.matches(p):
            return True
        # class targets: "Linear" does not cover embeddings
        return _class_only(sc.targets) and ("embed" not in p.rsplit(".", 1)[-1] or any("Embedding" in t for t in sc.targets))


def _class_only(targets) -> bool:
    return all(not t.startswith("re:") and "." not in t for t in targets)


def infer_format(store, tensors: dict[str, str]) -> str:
    """The storage format that these tensors can only have come from (§8.2 step 3)."""

    def dtype(s):
        return store.meta(tensors[s]).dtype if s in tensors else None

    if "weight_packed" in tensors:
        if "scale_packed" in tensors and "meta" in tensors:
            return "marlin-24"
        if dtype("weight_packed") == "I32":
            return "pack-quantized"
        if "weight_global_scale" in tensors:
            return "nvfp4-pack-quantized"
        if dtype("weight_scale") == "U8":
            packed_cols = store.meta(tensors["weight_packed"]).shape[-1]
            scale_cols = store.meta(tensors["weight_scale"]).shape[-1]
            return "mxfp6-pack-quantized" if packed_cols * 4 == scale_cols * 32 * 3 else "mxfp4-pack-quantized"
        return "nvfp4-pack-quantized"
    w = dtype("weight")
    if w == "F8_E4M3":
        return "mxfp8-quantized" if dtype("weight_scale") == "U8" else "float-quantized"
    if w == "I8":
        return "int-quantized" if "input_scale" in tensors else "naive-quantized"
    return "dense"


_FAMILY = {
    "pack-quantized": "packed",
    "nvfp4-pack-quantized": "nvfp4",
    "mxfp4-pack-quantized": "mxfp4",
    "mxfp6-pack-quantized": "mxfp6",
    "mxfp8-quantized": "mxfp8",
    "naive-quantized": "raw",
    "int-quantized": "raw",
    "float-quantized": "raw",
    "marlin-24": "marlin24",
    "dense": "dense",
    "sparse-bitmask": "dense",
    "sparse-24-bitmask": "dense",
}


def _resolve_format(p, group, qc, inferred: str, sparse: str | None, warnings: list[str]) -> str:
    declared = group.format if group and group.format else None
    if declared is None and qc.format not in cfg.NO_STORAGE_FORMATS:
        declared = qc.format
    if inferred == "dense":
        if sparse and not (group and group.weights):
            return "sparse-24-bitmask" if sparse == "2:4" else "sparse-bitmask"
        return "dense"
    if declared and _FAMILY.get(declared) == _FAMILY[inferred]:
        return declared
    if declared and declared not in ("dense", "fakequant"):
        warnings.append(f"{p}: config says {declared} but the tensors are {inferred}; reading them as {inferred}")
    return inferred


def _pick_class_group(p: str, classes, inferred: str):
    consistent = [g for g in classes if _consistent(g.weights, inferred)]
    if not consistent:
        return None
    leaf = p.rsplit(".", 1)[-1].lower()
    for g in consistent:
        if any("embed" in t.lower() for t in g.targets) and "embed" in leaf:
            return g
    return consistent[-1]  # CT semantics: a later group wins a target string they share


def _consistent(args: cfg.QuantArgs, inferred: str) -> bool:
    if inferred in ("pack-quantized", "marlin-24"):
        return args.type == "int"
    if inferred in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        return args.type == "float" and args.num_bits == 4
    if inferred == "mxfp6-pack-quantized":
        return args.type == "float" and args.num_bits == 6
    if inferred in ("float-quantized", "mxfp8-quantized"):
        return args.type == "float" and args.num_bits == 8
    if inferred in ("int-quantized", "naive-quantized"):
        return args.type == "int"
    return True


def _online_transforms(qc: cfg.QuantizationConfig, names: list[str]) -> list[str]:
    """Tensors of online transforms (§2.6): matrices applied at inference, not fused into weights."""
    groups = (qc.transform_config or {}).get("config_groups") or {}
    suffixes = set()
    for scheme_name, scheme in groups.items():
        for apply in (scheme or {}).get("apply") or []:
            loc = str((apply or {}).get("location", ""))
            if loc in ONLINE_LOCATIONS:
                suffixes.add(f".{scheme_name}_{loc}.weight")
    return sorted({n.rsplit(".", 1)[0] for n in names if any(n.endswith(s) for s in suffixes)})
