"""Permissive parsing of every quantization_config variant (compressed-tensors.md §1.1, §2, §7)."""

import pytest

from ct_convert.errors import InputError
from ct_convert.readers import config as cfg

W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}


def qc(**kw):
    base = {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": dict(W4)}}}
    base.update(kw)
    return base


def test_omitted_nulls_get_defaults():
    c = cfg.parse(qc(config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}}}))
    w = c.groups[0].weights
    assert (w.type, w.symmetric, w.strategy, w.actorder, w.block_structure, w.dynamic) == ("int", True, "group", None, None, False)
    assert c.version is None and c.format is None and c.ignore == []


@pytest.mark.parametrize("gs,strategy", [(None, "tensor"), (-1, "channel"), (32, "group")])
def test_strategy_inferred_from_group_size(gs, strategy):
    w = cfg.parse_args({"num_bits": 8, "group_size": gs}, "x")
    assert w.strategy == strategy


@pytest.mark.parametrize("value,expected", [(True, "group"), ("group", "group"), ("dynamic", "group"), ("static", "weight"), ("weight", "weight"), (None, None), (False, None)])
def test_actorder_aliases(value, expected):
    assert cfg.parse_args({**W4, "actorder": value}, "x").actorder == expected


def test_block_structure_string_of_old_versions():
    w = cfg.parse_args({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": "128x128"}, "x")
    assert w.block_structure == (128, 128)
    assert cfg.parse_args({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [64, 32]}, "x").block_structure == (64, 32)


def test_compression_config_key_of_0_6_and_text_config():
    inner = {"quant_method": "compressed-tensors", "config_groups": {}}
    assert cfg.locate({"compression_config": inner}) == (inner, "compression_config")
    assert cfg.locate({"text_config": {"quantization_config": inner}}) == (inner, "text_config.quantization_config")
    assert cfg.locate({"quantization_config": inner, "compression_config": {}}) == (inner, "quantization_config")
    assert cfg.locate({}) is None


@pytest.mark.parametrize("method", ["compressed-tensors", "compressed_tensors", "Compressed-Tensors", "sparseml"])
def test_quant_method_spellings(method):
    assert cfg.parse(qc(quant_method=method)).quant_method == "compressed-tensors"


def test_other_quantizers_are_refused():
    with pytest.raises(InputError, match="not 'compressed-tensors'"):
        cfg.parse({"quant_method": "gptq", "bits": 4})


def test_sparsity_only_config():
    c = cfg.parse({"quant_method": "compressed-tensors", "version": "0.14.0",
                   "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["lm_head"], "registry_requires_subclass": False}})
    assert c.groups == [] and c.sparsity.format == "sparse-24-bitmask" and c.sparsity.structure == "2:4"
    assert cfg.parse(qc(sparsity_config={})).sparsity is None


def test_preset_group_is_expanded_with_the_library_presets():
    c = cfg.parse(qc(config_groups={"W4A16": ["Linear"]}))
    w = c.groups[0].weights
    assert (w.num_bits, w.strategy, w.group_size, w.symmetric) == (4, "group", 128, True)
    with pytest.raises(InputError, match="not a known preset"):
        cfg.parse(qc(config_groups={"NOT_A_PRESET": ["Linear"]}))


def test_unknown_keys_are_ignored_and_versions_parse():
    c = cfg.parse(qc(version="0.12.2.dev3", some_future_key=1, config_groups={"g": {"targets": ["Linear"], "weights": {**W4, "observer": "mse", "observer_kwargs": {}, "new": 1}}}))
    assert c.version_tuple == (0, 12, 2)


@pytest.mark.parametrize("bad", [{"num_bits": "four"}, {"num_bits": 9}, {"type": "complex"}, {"strategy": "diagonal"}, {"strategy": "group"}, {"strategy": "block", "block_structure": "big"}])
def test_invalid_args_are_input_errors(bad):
    with pytest.raises(InputError):
        cfg.parse_args({**{"num_bits": 4}, **bad}, "config.json: g.weights")


def test_format_names_are_checked():
    assert cfg.parse(qc(format="pack_quantized")).format == "pack-quantized"
    with pytest.raises(InputError, match="unknown compression format"):
        cfg.parse(qc(format="zip-quantized"))


def test_value_sets_match_the_installed_library_enums():
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationStrategy, QuantizationType

    assert cfg.STRATEGIES == {s.value for s in QuantizationStrategy}
    assert cfg.TYPES == {t.value for t in QuantizationType}
    assert cfg.FORMATS == {f.value for f in CompressionFormat}
