"""Every fixture decodes to exactly what the compressed-tensors library (the version that wrote it) gives."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, FIXTURE_NAMES, equal_bits, fixture_entry
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve


def _open(name):
    return open_checkpoint(resolve(str(FIXTURES / name)))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_dequantized_weights_equal_library_reference(name):
    reader = _open(name)
    ref = load_file(FIXTURES / name / "reference.safetensors")
    expected = {k.removesuffix(".weight") for k in ref}
    assert expected <= set(reader.modules), f"modules not found: {expected - set(reader.modules)}"
    for module in sorted(expected):
        want = ref[f"{module}.weight"]
        got = reader.read(module).dequantize(want.dtype)
        assert got.shape == want.shape, module
        assert equal_bits(got, want), f"{module}: max diff {(got.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_module_facts_match_what_the_library_wrote(name):
    entry = fixture_entry(name)
    reader = _open(name)
    for module, facts in entry["modules"].items():
        info = reader.modules[module]
        # a sparsity-only module has no quantization format: it reports its sparse storage format
        assert info.format == (facts["format"] or facts["sparsity"]["format"]), module
        assert list(info.shape) == facts["shape"], module
        want_sparsity = facts["sparsity"]["structure"] if facts["sparsity"] else None
        assert info.sparsity == want_sparsity, module
        assert info.has_g_idx == facts["has_g_idx"], module
        if facts.get("num_bits") is not None:
            s = info.scheme
            assert (s.num_bits, s.type, s.symmetric, s.strategy) == (
                facts["num_bits"], facts["type"], facts["symmetric"], facts["strategy"]
            ), module
            assert s.group_size == facts["group_size"], module
    assert set(entry["unquantized"]) <= set(reader.unquantized)


@pytest.mark.parametrize("name", [n for n in FIXTURE_NAMES if fixture_entry(n).get("ct020_misreads")])
def test_old_three_bit_files_that_the_current_library_misreads(name):
    """compressed-tensors 0.20 decodes a <=0.17 3-bit file with the new bit layout; ct-convert does not."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    reader = _open(name)
    ref = load_file(FIXTURES / name / "reference.safetensors")
    module = sorted(k.removesuffix(".weight") for k in ref)[0]
    info = reader.modules[module]
    assert info.layout == "words"
    packed = reader.store.get(f"{module}.weight_packed")
    library_codes = unpack_from_int32(packed, 3, torch.Size(info.shape))
    ours = reader.read(module)
    assert not torch.equal(library_codes, ours.codes)
    assert equal_bits(ours.dequantize(ref[f"{module}.weight"].dtype), ref[f"{module}.weight"])


def test_symmetric_codes_use_the_full_range_including_minus_eight():
    qw = _open("w4a16-g128").read("model.layers.0.mlp.down_proj")
    assert int(qw.codes.min()) == -8 and int(qw.codes.max()) <= 7


def test_reading_one_module_touches_only_its_tensors(monkeypatch):
    reader = _open("w4a16-sharded")
    seen = []
    real_get = reader.store.base.get
    monkeypatch.setattr(reader.store.base, "get", lambda n: seen.append(n) or real_get(n))
    module = "model.layers.0.self_attn.q_proj"
    reader.read(module).dequantize()
    assert seen and all(n.startswith(module + ".") for n in seen)


def test_cross_shard_dependencies_resolve():
    reader = _open("w4a16-sharded")
    files = {
        reader.store.meta(n).file.name
        for info in reader.modules.values()
        for n in info.tensors.values()
    }
    assert len(files) >= 2
    split = [
        m for m, info in reader.modules.items()
        if len({reader.store.meta(n).file for n in info.tensors.values()}) > 1
    ]
    assert split, "the fixture should hold a module whose tensors live in different shards"
    ref = load_file(FIXTURES / "w4a16-sharded" / "reference.safetensors")
    assert equal_bits(reader.read(split[0]).dequantize(), ref[f"{split[0]}.weight"])


def test_online_transform_is_detected():
    assert _open("transform-online").online_transforms


def test_legacy_actorder_g_idx_is_read_and_not_trivial():
    qw = _open("legacy-0.8.1-actorder-group").read("model.layers.0.mlp.down_proj")
    assert qw.g_idx is not None and not qw.has_trivial_g_idx()


def test_unpacked_int8_zero_points_of_0_8():
    reader = _open("legacy-0.8.1-w4a16-asym")
    info = reader.modules["model.layers.0.self_attn.k_proj"]
    assert reader.store.meta(info.tensors["weight_zero_point"]).dtype == "I8"
    assert reader.read(info.name).zero_point is not None
