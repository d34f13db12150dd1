"""The code's shape, enforced: the target table is the one list of targets, writers and readers of a
target stay independent algorithms (an import-graph check), the source readers know no target, and a
target reads only the options the table says it takes."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

from ct_convert.targets import NAMES, TABLE, TARGETS
from ct_convert.targets.writer_base import RepackOptions, TargetWriter

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "ct_convert"
COMMON_OPTIONS = {"target", "dtype", "device", "max_shard_size", "workers", "verify"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports(name: str) -> set[str]:
    """ct_convert modules one module imports (anywhere in it, function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m in MODULES}


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for m in imports(todo.pop()) - seen:
            seen.add(m)
            todo.append(m)
    return seen


WRITER_SIDE = {"ct_convert.targets.writer_base", "ct_convert.targets.hf_writer", "ct_convert.targets.int_writer"}
READER_SIDE = {"ct_convert.targets.reader_base"}


@pytest.mark.parametrize("spec", TABLE, ids=lambda t: t.name)
def test_a_targets_reader_and_writer_never_import_each_other(spec):
    pkg = f"ct_convert.targets.{spec.package}"
    reads, writes = closure(f"{pkg}.reader"), closure(f"{pkg}.writer")
    # the reader reaches no writer code: of its own package only the shared facts
    assert not reads & WRITER_SIDE
    assert not {m for m in reads if m.endswith(".writer")}
    assert {m for m in reads if m.startswith(pkg + ".")} <= {f"{pkg}.facts"}
    # and the writer no reader
    assert not writes & READER_SIDE
    assert not {m for m in writes if m.endswith(".reader") and m.startswith("ct_convert.targets.")}


def test_source_readers_know_no_target():
    for name in MODULES:
        if name.startswith("ct_convert.readers"):
            assert not {m for m in imports(name) if m.startswith("ct_convert.targets")}, name


def test_hub_and_source_import_one_way():
    assert "ct_convert.hub" in imports("ct_convert.source")
    assert "ct_convert.source" not in closure("ct_convert.hub")


def test_targets_reach_the_source_through_its_interface():
    """Writers use SourceReader, never the reader's files, store or parsed config."""
    for name, path in MODULES.items():
        if not name.startswith("ct_convert.targets"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "reader":
                assert node.attr not in ("store", "files", "qconfig", "ckpt") and not node.attr.startswith("_"), (name, node.attr)


@pytest.mark.parametrize("spec", TABLE, ids=lambda t: t.name)
def test_each_table_entry_is_a_complete_target(spec):
    writer = importlib.import_module(f"ct_convert.targets.{spec.package}.writer").Writer(spec.name)
    assert isinstance(writer, TargetWriter) and writer.name == spec.name
    reader = importlib.import_module(f"ct_convert.targets.{spec.package}.reader")
    assert callable(reader.detect) and callable(reader.open)
    fields = {f.name for f in dataclasses.fields(RepackOptions)}
    assert set(spec.options) <= fields - COMMON_OPTIONS


@pytest.mark.parametrize("spec", TABLE, ids=lambda t: t.name)
def test_a_target_reads_only_the_options_it_declares(spec):
    read = set()
    for path in (PKG / "targets" / spec.package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "opts":
                read.add(node.attr)
    assert read <= COMMON_OPTIONS | set(spec.options), read - COMMON_OPTIONS - set(spec.options)


def test_every_target_specific_option_belongs_to_a_target():
    fields = {f.name for f in dataclasses.fields(RepackOptions)}
    assert fields - COMMON_OPTIONS == {o for t in TABLE for o in t.options}


def test_the_cli_offers_exactly_the_table():
    from ct_convert.cli import Target

    assert {t.value for t in Target} == {n for t in TABLE for n in (t.name, *t.aliases)}
    assert NAMES == tuple(TARGETS)
