import json

import pytest

from conftest import FIXTURES, FIXTURE_NAMES, fixture_entry
from ct_convert.targets import TABLE

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
        if doc["online_transforms"]:  # repack refuses such a checkpoint for every target
            assert all(ok is False and "online transform" in m["reasons"][t] for t, ok in m["targets"].items())
        else:
            assert m["targets"]["dense"] is True
        assert set(m["targets"]) == {t.name for t in TABLE if t.inspect}
        assert all(ok in (True, False, "decided at repack") for ok in m["targets"].values())
        assert set(m["reasons"]) == {t for t, ok in m["targets"].items() if not ok}
        assert set(m["at_repack"]) == {t for t, ok in m["targets"].items() if ok == "decided at repack"}
        assert all(isinstance(v, str) and "\n" not in v for v in [*m["reasons"].values(), *m["at_repack"].values()])
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


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_inspect_and_repack_agree(cli, tmp_path, name):
    """Both read the target's plan: a module inspect calls convertible is not refused by repack
    (unless its data decides, as inspect said), and a refusal names a module inspect refused too."""
    doc = cli("inspect", FIXTURES / name, "--json").json()
    for t in (t.name for t in TABLE if t.inspect):
        out = tmp_path / t
        r = cli("repack", FIXTURES / name, out, "--target", t, "--no-verify", "-q")
        verdicts = {m["name"]: m["targets"][t] for m in doc["modules"]}
        if all(v is True for v in verdicts.values()):
            assert r.code == 0, (t, r.err)
        if r.code == 0:
            manifest = json.loads((out / "ct-convert.json").read_text())
            fallbacks = {f["module"]: f["reason"] for f in manifest["fallbacks"]}
            for m in doc["modules"]:  # refused by inspect: written as a fallback, for the same reason
                if verdicts[m["name"]] is False:
                    assert fallbacks.get(m["name"]) == m["reasons"][t], (t, m["name"])
        else:
            named = [m for m in verdicts if r.err.startswith(f"error: {m}:")]
            assert all(verdicts[m] is not True for m in named), (t, r.err)
