"""Hostile and corrupt input: every failure is a CTConvertError (one line, exit 2), never a crash.

Hypothesis mutates safetensors headers, config.json and model.safetensors.index.json of real
fixtures; the explicit tests pin each case the README's reliability section lists.
"""

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from badinput import copy_fixture, header, write_with_header
from ct_convert.errors import CTConvertError, InputError
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve

FUZZ = settings(max_examples=int(os.environ.get("CT_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def load_everything(path: Path) -> None:
    """What repack does with a source: open it, decode and dequantize every module, read every other tensor."""
    reader = open_checkpoint(resolve(str(path)))
    for name in reader.modules:
        reader.read(name).dequantize()
    for name in reader.passthrough():
        reader.get(name)


def outcome(path: Path) -> str:
    try:
        load_everything(path)
        return "ok"
    except CTConvertError as e:
        assert str(e) and "\n" not in str(e)
        return "refused"


# -- fuzzing -------------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        src = copy_fixture("w4a16-asym-channel", Path(d) / "src")
        f = src / "model.safetensors"
        raw = bytearray(f.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        edits = data.draw(st.lists(st.tuples(st.integers(0, 8 + n - 1), st.integers(0, 255)), min_size=1, max_size=6))
        for pos, byte in edits:
            raw[pos] = byte
        if data.draw(st.booleans()):
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        f.write_bytes(bytes(raw))
        outcome(src)


ENTRY_EDITS = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["I8", "U8", "F16", "BF16", "F32", "I32", "I64", "F8_E4M3", "BOOL", "X9", 7, None])),
    st.tuples(st.just("shape"), st.lists(st.integers(-2, 2**40), max_size=4) | st.just("[]") | st.just(None)),
    st.tuples(st.just("data_offsets"), st.lists(st.integers(-5, 2**62), min_size=0, max_size=3)),
    st.tuples(st.just("delete"), st.none()),
    st.tuples(st.just("swap_offsets"), st.none()),
)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), ENTRY_EDITS), min_size=1, max_size=4))
def test_fuzz_structured_header_entries(edits):
    with tempfile.TemporaryDirectory() as d:
        src = copy_fixture("w4a16-asym-channel", Path(d) / "src")
        f = src / "model.safetensors"
        hdr, blob = header(f)
        names = sorted(k for k in hdr if k != "__metadata__")
        for which, (field, value) in edits:
            name = names[which % len(names)]
            if name not in hdr:
                continue
            if field == "delete":
                del hdr[name]
            elif field == "swap_offsets":
                other = names[(which + 1) % len(names)]
                if other in hdr:
                    hdr[name]["data_offsets"], hdr[other]["data_offsets"] = hdr[other]["data_offsets"], hdr[name]["data_offsets"]
            else:
                hdr[name][field] = value
        write_with_header(f, hdr, blob)
        outcome(src)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.data(), fixture=st.sampled_from(["w4a16-asym-channel", "nvfp4a16", "mixed-fp8-w4a16", "legacy-0.14-sparse24-fp8-dynamic"]))
def test_fuzz_quantization_config(data, fixture):
    with tempfile.TemporaryDirectory() as d:
        src = copy_fixture(fixture, Path(d) / "src")
        cfg = json.loads((src / "config.json").read_text())
        paths = list(_paths(cfg["quantization_config"]))[1:]
        for _ in range(data.draw(st.integers(1, 3))):
            path = data.draw(st.sampled_from(paths))
            value = data.draw(JSON_VALUES)
            try:  # an earlier edit may have replaced a parent of this path
                node = cfg["quantization_config"]
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = value
            except (TypeError, IndexError, KeyError):
                pass
        (src / "config.json").write_text(json.dumps(cfg))
        outcome(src)


@FUZZ
@given(value=st.one_of(st.text(max_size=40), st.sampled_from(["../model.safetensors", "/etc/passwd", "", ".", "sub/../../x.safetensors", "model-00001-of-00003.safetensors/.."]), st.integers(), st.none()),
       key=st.integers(0, 10**6), drop_map=st.booleans())
def test_fuzz_index(value, key, drop_map):
    with tempfile.TemporaryDirectory() as d:
        src = copy_fixture("w4a16-sharded", Path(d) / "src")
        idx = json.loads((src / "model.safetensors.index.json").read_text())
        names = sorted(idx["weight_map"])
        idx["weight_map"][names[key % len(names)]] = value
        if drop_map:
            idx["weight_map"] = value
        (src / "model.safetensors.index.json").write_text(json.dumps(idx))
        outcome(src)


# -- each listed case, pinned ----------------------------------------------------------------------

def refused(path) -> str:
    with pytest.raises(InputError) as e:
        load_everything(path)
    return str(e.value)


def test_header_length_past_the_end(tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    assert "runs past the end" in refused(src)


def test_huge_declared_header_size(tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 2**63) + f.read_bytes()[8:])
    assert "exceeds" in refused(src)


def test_overlapping_offsets(tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    hdr, blob = header(f)
    names = sorted((v["data_offsets"][0], k) for k, v in hdr.items() if k != "__metadata__")
    a, b = names[0][1], names[1][1]
    hdr[b]["data_offsets"] = [hdr[a]["data_offsets"][0], hdr[a]["data_offsets"][0] + (hdr[b]["data_offsets"][1] - hdr[b]["data_offsets"][0])]
    write_with_header(f, hdr, blob)
    msg = refused(src)
    assert "model.safetensors" in msg


def test_out_of_range_offsets(tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    hdr, blob = header(f)
    last = max((k for k in hdr if k != "__metadata__"), key=lambda k: hdr[k]["data_offsets"][1])
    hdr[last]["data_offsets"][1] += 4096
    write_with_header(f, hdr, blob)
    assert last in refused(src)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_scales(tmp_path, value):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.mlp.down_proj.weight_scale"][3, 1] = value
    save_file(t, f)
    assert "down_proj.weight_scale" in refused(src) and "NaN or Inf" in refused(src)


def test_zero_size_tensors(tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.mlp.down_proj.weight_scale"] = torch.zeros(0, 2, dtype=torch.bfloat16)
    save_file(t, f)
    assert "down_proj.weight_scale" in refused(src)


def test_duplicate_tensor_names_across_shards(tmp_path):
    src = copy_fixture("w4a16-sharded", tmp_path / "src")
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    a = load_file(src / shards[0])
    b = load_file(src / shards[1])
    stolen = sorted(a)[0]
    b[stolen] = a[stolen]
    save_file(b, src / shards[1])
    msg = refused(src)
    assert stolen in msg and "twice" in msg


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/hostname", "sub/../../outside.safetensors"])
def test_index_entries_pointing_outside_the_folder(tmp_path, target):
    src = copy_fixture("w4a16-sharded", tmp_path / "src")
    (tmp_path / "outside.safetensors").write_bytes((src / sorted(src.glob("*.safetensors"))[0].name).read_bytes())
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    name = sorted(idx["weight_map"])[0]
    idx["weight_map"][name] = target
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert "outside the checkpoint folder" in refused(src) or "leaves the checkpoint folder" in refused(src)


def test_symlinked_shard_leaving_the_folder(tmp_path):
    src = copy_fixture("w4a16-sharded", tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    moved = tmp_path / "elsewhere.safetensors"
    shard.rename(moved)
    os.symlink(moved, shard)
    assert "leaves the checkpoint folder" in refused(src)


def test_dtype_mismatch_of_a_payload(tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.mlp.down_proj.weight_packed"] = t["model.layers.0.mlp.down_proj.weight_packed"].view(torch.float32)
    save_file(t, f)
    msg = refused(src)
    assert "down_proj.weight_packed is F32" in msg


def test_codes_out_of_range_for_naive_int(tmp_path):
    src = copy_fixture("w8a8-int", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    for g in cfg["quantization_config"]["config_groups"].values():
        g["weights"]["num_bits"] = 4  # int8 codes now exceed the declared 4-bit range
    (src / "config.json").write_text(json.dumps(cfg))
    assert "outside the 4-bit range" in refused(src)
