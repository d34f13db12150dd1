import pytest

from conftest import FIXTURES, FIXTURE_NAMES, fixture_entry

REQUIRED = {"schema", "source", "quant_method", "format", "version", "architecture", "modules", "unquantized", "totals"}
MODULE_KEYS = {"name", "format", "weights", "input_activations", "shape", "sparsity", "targets", "reasons"}
WEIGHT_KEYS = {"num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "actorder"}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_inspect_json_carries_every_key_with_the_right_facts(cli, name):
    r = cli("inspect", FIXTURES / name, "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert REQUIRED <= set(doc)
    assert doc["schema"] == 1 and doc["quant_method"] == "compressed-tensors"
    assert doc["source"] == str(FIXTURES / name)
    assert doc["architecture"]
    assert set(doc["totals"]) == {"tensors", "parameters", "bytes", "dense_bytes"}
    assert doc["totals"]["bytes"] > 0 and doc["totals"]["dense_bytes"] >= doc["totals"]["parameters"]
    names = [m["name"] for m in doc["modules"]]
    assert names == sorted(names)
    entry = fixture_entry(name)
    assert set(entry["modules"]) == set(names)
    for m in doc["modules"]:
        assert MODULE_KEYS <= set(m)
        assert m["format"] != "mixed-precision"
        assert m["targets"]["dense"] is True
        assert set(m["reasons"]) == {t for t, ok in m["targets"].items() if not ok}
        assert all(isinstance(v, str) and "\n" not in v for v in m["reasons"].values())
        facts = entry["modules"][m["name"]]
        assert m["shape"] == facts["shape"]
        if m["weights"] is not None:
            assert WEIGHT_KEYS <= set(m["weights"])
            assert m["weights"]["num_bits"] == facts["num_bits"]
            assert m["weights"]["strategy"] == facts["strategy"]
    assert set(entry["unquantized"]) <= set(doc["unquantized"])


def test_inspect_json_is_the_only_stdout(cli):
    r = cli("inspect", FIXTURES / "w4a16-g128", "--json")
    r.json()  # raises if anything else was printed
    assert r.err == ""


def test_mixed_precision_resolves_per_module(cli):
    doc = cli("inspect", FIXTURES / "mixed-fp8-w4a16", "--json").json()
    assert doc["format"] == "mixed-precision"
    formats = {m["name"].rsplit(".", 1)[-1]: m["format"] for m in doc["modules"]}
    assert formats["q_proj"] == "float-quantized" and formats["down_proj"] == "pack-quantized"


def test_human_output_has_summary_schemes_and_module_rows(cli):
    r = cli("inspect", FIXTURES / "w4a16-asym-g128", "--modules")
    assert r.code == 0, r.err
    for text in ("LlamaForCausalLM", "compressed-tensors", "Schemes", "Modules", "pack-quantized", "down_proj"):
        assert text in r.out


def test_legacy_without_version_says_so(cli):
    r = cli("inspect", FIXTURES / "legacy-0.9.4-w4a16-asym")
    assert r.code == 0
    doc = cli("inspect", FIXTURES / "legacy-0.9.4-w4a16-asym", "--json").json()
    if doc["version"] is None:
        assert "not recorded" in r.out


def test_inspect_a_single_safetensors_file_uses_the_config_beside_it(cli):
    doc = cli("inspect", FIXTURES / "w4a16-g128" / "model.safetensors", "--json").json()
    assert len(doc["modules"]) == 7


def test_online_transform_is_reported(cli):
    doc = cli("inspect", FIXTURES / "transform-online", "--json").json()
    assert doc["online_transforms"]
