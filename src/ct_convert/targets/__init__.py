"""The targets ct-convert writes: THE table, and how a target is found from it.

Each target is one package `ct_convert.targets.<package>` holding `writer.py` (a `Writer` class:
`plan` and `write`, see writer_base.py) and `reader.py` (`detect(folder, config)` and `open(folder)`,
the independent reader `verify` uses), plus the facts both share. Everything that lists targets reads
this table: the CLI's `--target` choices, `inspect`'s columns, output detection in `verify`, and the
tests' matrices. Adding a target is its package, its tests and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ct_convert.errors import InputError, UnsupportedConversion
from ct_convert.jsonfile import load_json


@dataclass(frozen=True)
class TargetSpec:
    name: str  # the --target value, and the name in manifests and `inspect`
    package: str  # ct_convert.targets.<package>
    options: tuple[str, ...] = ()  # the target-specific RepackOptions fields (CLI flags) it reads
    aliases: tuple[str, ...] = ()  # other --target values accepted for it
    inspect: bool = True  # a column of `inspect`
    detect_order: int = 1  # `verify` asks readers in this order (ties: table order); lower first


TABLE: tuple[TargetSpec, ...] = (
    TargetSpec("dense", "dense"),
    TargetSpec("awq", "awq", options=("keep_unsupported",)),
    TargetSpec("gptq", "gptq", options=("gptq_format", "keep_unsupported")),
    TargetSpec("marlin", "marlin", options=("keep_unsupported",)),
    # detect_order 0: these folders also hold a config.json and safetensors the dense reader would
    # claim (ModelOpt's has a quantization_config of its own, trtllm-build's and an all-float MLX one none)
    TargetSpec("trtllm", "modelopt", options=("approx_input_scales", "keep_unsupported"), aliases=("modelopt",), detect_order=0),
    TargetSpec("trtllm-legacy", "trtllm_legacy", options=("tp_size", "sm", "keep_unsupported"), detect_order=0),
    TargetSpec("gguf", "gguf", options=("strict", "vocab_from", "nvfp4")),
    TargetSpec("mlx", "mlx", options=("keep_unsupported",), detect_order=0),
)
TARGETS: dict[str, TargetSpec] = {t.name: t for t in TABLE}
NAMES: tuple[str, ...] = tuple(TARGETS)
_BY_ANY_NAME = {n: t for t in TABLE for n in (t.name, *t.aliases)}


def spec(name: str) -> TargetSpec:
    try:
        return _BY_ANY_NAME[name]
    except KeyError:
        raise UnsupportedConversion(f"unknown target {name!r}", hint=f"Choose one of: {', '.join(sorted(TARGETS))}.") from None


def _module(t: TargetSpec, part: str):
    return importlib.import_module(f"{__name__}.{t.package}.{part}")


def writer_for(name: str):
    """The target's writer (an instance of its `writer.Writer`)."""
    t = spec(name)
    return _module(t, "writer").Writer(t.name)


def open_output(folder: Path, source_architecture: str | None = None):
    """The reader of whichever target wrote `folder`, asked in detection order. `source_architecture`
    (config.json's HF name, when the source is known) tells readers that map names by architecture
    which class wrote them."""
    if not folder.exists():
        raise InputError(f"{folder}: no such output folder")
    config = _config(folder)
    for t in sorted(TABLE, key=lambda t: t.detect_order):
        reader = _module(t, "reader")
        if reader.detect(folder, config):
            return reader.open(folder, source_architecture)
    raise InputError(f"{folder}: not a checkpoint ct-convert can read back (no known layout detected)")


def _config(folder: Path):
    """The output's config.json as parsed, read once for every detector; None if absent or unreadable."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return load_json(path)
    except InputError:
        return None
