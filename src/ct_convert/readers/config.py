"""Permissive parsing of `quantization_config`, for every version of the format (compressed-tensors.md §1.1, §2, §7).

The library's 0.20 pydantic models reject configs that older versions wrote (missing keys, `actorder:
group`, sparsity-only configs, string block structures), so every key is defaulted and normalized here;
values are checked against the library's own enums.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ct_convert.errors import InputError
from ct_convert.qweight import WeightScheme
from ct_convert.tensorstore import MAX_TENSORS

QUANT_METHODS = {"compressed-tensors", "sparseml"}
# The values of compressed-tensors' QuantizationStrategy, QuantizationType and CompressionFormat
# enums (test_config checks they still match the installed library). Importing the library pulls in
# transformers and costs ~2 s of start-up, so it is only imported to expand preset names.
STRATEGIES = {"tensor", "channel", "group", "block", "token", "tensor_group", "attn_head"}
TYPES = {"int", "float"}
FORMATS = {
    "dense", "sparse-bitmask", "sparse-24-bitmask", "int-quantized", "float-quantized", "naive-quantized",
    "pack-quantized", "marlin-24", "mixed-precision", "nvfp4-pack-quantized", "mxfp4-pack-quantized",
    "mxfp6-pack-quantized", "mxfp8-quantized",
}
NO_STORAGE_FORMATS = {None, "mixed-precision", "dense", "fakequant"}
# `re:` targets are matched against every module (matching.py): real configs carry a handful. Counted
# repetitions are expanded when a pattern is compiled, so their nested counts are bounded too.
MAX_PATTERNS = 1024
MAX_PATTERN_CHARS = 1024
MAX_REPEAT_PRODUCT = 10_000
_COUNTED_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


@dataclass(frozen=True)
class QuantArgs:
    num_bits: int = 8
    type: str = "int"
    symmetric: bool = True
    strategy: str = "tensor"
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    dynamic: bool | str = False
    actorder: str | None = None
    scale_dtype: str | None = None
    zp_dtype: str | None = None

    def weight_scheme(self) -> WeightScheme:
        return WeightScheme(
            num_bits=self.num_bits,
            type=self.type,
            symmetric=self.symmetric,
            strategy=self.strategy,
            group_size=self.group_size,
            block_structure=self.block_structure,
            actorder=self.actorder,
            scale_dtype=self.scale_dtype,
        )

    def as_json(self) -> dict:
        return {**self.weight_scheme().as_json(), "dynamic": self.dynamic}


@dataclass(frozen=True)
class SchemeGroup:
    name: str
    targets: tuple[str, ...]
    weights: QuantArgs | None
    input_activations: QuantArgs | None
    output_activations: QuantArgs | None
    format: str | None


@dataclass(frozen=True)
class SparsityConfig:
    format: str
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    structure: str  # "2:4", "unstructured", ...


@dataclass
class QuantizationConfig:
    quant_method: str
    version: str | None
    format: str | None
    groups: list[SchemeGroup]
    ignore: list[str]
    kv_cache_scheme: QuantArgs | None
    sparsity: SparsityConfig | None
    transform_config: dict
    moe_sparsity: dict | None
    status: str | None
    raw: dict = field(repr=False, default_factory=dict)

    @property
    def version_tuple(self) -> tuple[int, ...] | None:
        return parse_version(self.version)


def parse_version(v: str | None) -> tuple[int, ...] | None:
    if not v:
        return None
    parts = re.findall(r"\d+", str(v))[:3]
    return tuple(int(p) for p in parts) if parts else None


def locate(config: dict) -> tuple[dict, str] | None:
    """The quantization config dict and the key it was found under, following the §1.1 cascade."""
    for path in (("quantization_config",), ("text_config", "quantization_config"), ("compression_config",)):
        node = config
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return node, ".".join(path)
    return None


def is_compressed_tensors(qc: dict) -> bool:
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method in QUANT_METHODS:
        return True
    # <=0.6 configs under compression_config may omit quant_method but carry the structure
    return not method and ("config_groups" in qc or "sparsity_config" in qc)


def parse(qc: dict, where: str = "config.json") -> QuantizationConfig:
    if not is_compressed_tensors(qc):
        raise InputError(
            f"{where}: quant_method is {qc.get('quant_method')!r}, not 'compressed-tensors'",
            hint="ct-convert reads compressed-tensors checkpoints (llm-compressor output) only.",
        )
    groups = []
    for name, value in _typed(qc.get("config_groups") or {}, dict, f"{where}: config_groups").items():
        groups.extend(_parse_group(str(name), value, where))
    fmt = _norm_format(qc.get("format"), f"{where}: format")
    sparsity = _parse_sparsity(qc.get("sparsity_config"), where)
    kv = qc.get("kv_cache_scheme")
    return QuantizationConfig(
        quant_method="compressed-tensors",
        version=str(qc["version"]) if qc.get("version") is not None else None,
        format=fmt,
        groups=groups,
        ignore=list(_targets(qc.get("ignore") or [], f"{where}: ignore")),
        kv_cache_scheme=parse_args(kv, f"{where}: kv_cache_scheme") if isinstance(kv, dict) else None,
        sparsity=sparsity,
        transform_config=_typed(qc.get("transform_config") or {}, dict, f"{where}: transform_config"),
        moe_sparsity=_typed(qc.get("moe_sparsity_config") or {}, dict, f"{where}: moe_sparsity_config") or None,
        status=qc.get("quantization_status"),
        raw=qc,
    )


def _typed(value, kind: type, where: str):
    if not isinstance(value, kind):
        raise InputError(f"{where}: expected a JSON {'object' if kind is dict else 'list'}, got {type(value).__name__}")
    return value


def _targets(value, where: str) -> tuple[str, ...]:
    """A list of module names, class names and `re:` patterns, bounded before anything is matched."""
    items = _typed(value, list, where)
    if len(items) > MAX_TENSORS:
        raise InputError(f"{where}: {len(items)} entries, more than the {MAX_TENSORS} tensors a checkpoint may hold")
    targets = tuple(str(t) for t in items)
    patterns = [t for t in targets if t.startswith("re:")]
    if len(patterns) > MAX_PATTERNS:
        raise InputError(f"{where}: {len(patterns)} re: patterns, more than the {MAX_PATTERNS} ct-convert matches")
    for t in patterns:
        shown = t if len(t) <= 60 else t[:57] + "..."
        if len(t) > MAX_PATTERN_CHARS:
            raise InputError(f"{where}: pattern {shown!r} is {len(t)} characters long, more than {MAX_PATTERN_CHARS}")
        if _repeat_product(t) > MAX_REPEAT_PRODUCT:
            raise InputError(
                f"{where}: pattern {shown!r} repeats more than {MAX_REPEAT_PRODUCT} times in all "
                "(counted repetitions multiply)"
            )
    return targets


def _repeat_product(pattern: str) -> int:
    """Product of every counted repetition's largest count: an upper bound of how many copies of its
    parts compiling the pattern may make, whether or not the repetitions are nested."""
    product = 1
    for lo, hi in _COUNTED_REPEAT.findall(pattern):
        count = hi or lo
        product *= max(1, int(count)) if count else 1
        if product > MAX_REPEAT_PRODUCT:
            break
    return product


def _parse_group(name: str, value, where: str) -> list[SchemeGroup]:
    if isinstance(value, list):
        return [_preset_group(name, value, where)]
    if not isinstance(value, dict):
        raise InputError(f"{where}: config group {name!r} is neither a scheme nor a preset target list")
    targets = value.get("targets") or []
    if isinstance(targets, str):
        targets = [targets]
    return [
        SchemeGroup(
            name=name,
            targets=_targets(targets, f"{where}: {name}.targets"),
            weights=_opt_args(value.get("weights"), f"{where}: {name}.weights"),
            input_activations=_opt_args(value.get("input_activations"), f"{where}: {name}.input_activations"),
            output_activations=_opt_args(value.get("output_activations"), f"{where}: {name}.output_activations"),
            format=_norm_format(value.get("format"), f"{where}: {name}.format"),
        )
    ]


def _preset_group(name: str, targets: list, where: str) -> SchemeGroup:
    from compressed_tensors.quantization.quant_scheme import is_preset_scheme, preset_name_to_scheme

    if not all(isinstance(t, str) for t in targets):
        raise InputError(f"{where}: config group {name!r}: targets must be strings")
    if not is_preset_scheme(name):
        raise InputError(f"{where}: config group {name!r} lists targets but is not a known preset scheme")
    scheme = preset_name_to_scheme(name, [str(t) for t in targets]).model_dump()
    return SchemeGroup(
        name=name,
        targets=tuple(str(t) for t in targets),
        weights=_opt_args(scheme.get("weights"), f"{where}: {name}"),
        input_activations=_opt_args(scheme.get("input_activations"), f"{where}: {name}"),
        output_activations=_opt_args(scheme.get("output_activations"), f"{where}: {name}"),
        format=None,
    )


def _opt_args(value, where: str) -> QuantArgs | None:
    if value is None:
        return None
    return parse_args(_typed(value, dict, where), where)


def parse_args(d: dict, where: str) -> QuantArgs:
    """One QuantizationArgs dict, defaulting every missing key as 0.20 does."""
    try:
        num_bits = d.get("num_bits", 8)
        if isinstance(num_bits, bool) or float(num_bits) != int(num_bits):
            raise ValueError
        num_bits = int(num_bits)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{where}: num_bits {d.get('num_bits')!r} is not an integer") from None
    qtype = str(d.get("type", "int")).lower()
    if qtype not in TYPES:
        raise InputError(f"{where}: unknown quantization type {d.get('type')!r}")
    if not (1 <= num_bits <= 8 or (qtype == "float" and num_bits == 16)):
        raise InputError(f"{where}: num_bits {num_bits} is out of range 1..8")
    group_size = d.get("group_size")
    if group_size is not None:
        try:
            if isinstance(group_size, bool) or float(group_size) != int(group_size):
                raise ValueError
            group_size = int(group_size)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"{where}: group_size {group_size!r} is not an integer") from None
    strategy = d.get("strategy")
    if strategy is None:
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    strategy = str(strategy).lower()
    if strategy not in STRATEGIES:
        raise InputError(f"{where}: unknown strategy {d.get('strategy')!r}")
    if strategy in ("group", "tensor_group") and (group_size is None or group_size <= 0):
        raise InputError(f"{where}: strategy {strategy} needs a positive group_size, got {group_size!r}")
    return QuantArgs(
        num_bits=num_bits,
        type=qtype,
        symmetric=bool(d.get("symmetric", True)),
        strategy=strategy,
        group_size=group_size,
        block_structure=_block(d.get("block_structure"), where),
        dynamic=d.get("dynamic", False) if d.get("dynamic", False) == "local" else bool(d.get("dynamic", False)),
        actorder=_actorder(d.get("actorder")),
        scale_dtype=_dtype_name(d.get("scale_dtype")),
        zp_dtype=_dtype_name(d.get("zp_dtype")),
    )


def _block(value, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        # <=0.10 wrote "128x128"
        parts = re.split(r"[xX,]", value) if isinstance(value, str) else list(value)
        rows, cols = (int(p) for p in parts)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{where}: block_structure {value!r} is not [rows, cols]") from None
    if rows <= 0 or cols <= 0:
        raise InputError(f"{where}: block_structure {value!r} must be positive")
    return rows, cols


def _actorder(value) -> str | None:
    if value in (None, False, "null"):
        return None
    if value is True:
        return "group"
    v = str(value).lower()
    return {"dynamic": "group", "static": "weight"}.get(v, v)


def _dtype_name(value) -> str | None:
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def _norm_format(value, where: str) -> str | None:
    if value is None:
        return None
    v = str(value).lower().replace("_", "-")
    if v not in FORMATS and v != "fakequant":
        raise InputError(f"{where}: unknown compression format {value!r}")
    return v


def _parse_sparsity(sc, where: str) -> SparsityConfig | None:
    if not sc:
        return None
    _typed(sc, dict, f"{where}: sparsity_config")
    fmt = _norm_format(sc.get("format", "dense"), f"{where}: sparsity_config.format")
    structure = str(sc.get("sparsity_structure") or "unstructured").lower()
    return SparsityConfig(
        format=fmt,
        targets=_targets(sc.get("targets") or [], f"{where}: sparsity_config.targets"),
        ignore=_targets(sc.get("ignore") or [], f"{where}: sparsity_config.ignore"),
        structure=structure,
    )
