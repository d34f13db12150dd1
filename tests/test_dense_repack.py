import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, FIXTURE_NAMES, SAMPLE, equal_bits
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve
from ct_convert.targets import NAMES
from ct_convert.targets.reader_base import open_store

REFUSED = {"transform-online"}


@pytest.mark.parametrize("name", sorted(set(FIXTURE_NAMES) - REFUSED))
def test_dense_output_holds_the_library_decompression(cli, tmp_path, name):
    out = tmp_path / "out"
    r = cli("repack", FIXTURES / name, out, "--target", "dense", "--json")
    assert r.code == 0, r.err
    summary = r.json()
    assert summary["verified"] is True and summary["unconverted"] == []
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "compression_config" not in cfg
    store = open_store(out)
    ref = load_file(FIXTURES / name / "reference.safetensors")
    reader = open_checkpoint(resolve(str(FIXTURES / name)))
    for key, want in ref.items():
        got = store.get(key)
        if got.dtype == want.dtype:
            assert equal_bits(got, want), key
        else:
            # the writing library decompressed to another dtype (0.14 sparse-24 fp8 gives fp16 for a bf16 model):
            # the reader matches it there (test_reader_fixtures), and the output holds the same exact value
            # rounded once to the model dtype
            assert equal_bits(got, reader.read(key.removesuffix(".weight")).dequantize(got.dtype)), key
    manifest = json.loads((out / "ct-convert.json").read_text())
    assert manifest["target"] == "dense" and manifest["source"] == str(FIXTURES / name)
    assert set(manifest["files"]) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"ct-convert.json"}


def test_transformers_loads_the_dense_output(cli, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    assert cli("repack", FIXTURES / "w4a16-asym-g128", out, "--target", "dense", "-q").code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = load_file(FIXTURES / "w4a16-asym-g128" / "reference.safetensors")
    sd = model.state_dict()
    for key, want in ref.items():
        assert equal_bits(sd[key], want), key
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_shards_and_index_above_max_shard_size(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("repack", FIXTURES / "w4a16-g128", out, "--target", "dense", "--max-shard-size", "200KB", "-q").code == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(open_store(out).meta(n).nbytes for n in index["weight_map"])
    for shard in shards[:-1]:
        assert (out / shard).stat().st_size <= 200_000 + 4096


def test_non_weight_files_are_copied_unchanged(cli, tmp_path):
    src = FIXTURES / "w4a16-g128"
    out = tmp_path / "out"
    assert cli("repack", src, out, "--target", "dense", "-q").code == 0
    others = [p.name for p in src.iterdir() if p.suffix not in (".safetensors",) and p.name != "config.json"]
    assert others, "the fixture should hold a non-weight file (generation_config.json)"
    for name in others:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert not (out / "reference.safetensors").exists()


def test_dtype_cast_that_would_change_values_is_refused(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("repack", FIXTURES / "w4a16-g128", out, "--target", "dense", "--dtype", "float16")
    # the fixture's lm_head holds bf16 values below fp16's range: casting would silently change them
    assert r.code == 2 and "lm_head.weight" in r.err and "float16" in r.err
    assert len(r.err.strip().splitlines()) <= 2
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_dtype_option_is_applied_and_recorded(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("repack", FIXTURES / "legacy-0.8.1-marlin24", out, "--target", "dense", "--dtype", "float16", "-q").code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "float16"
    assert open_store(out).meta("model.layers.0.mlp.down_proj.weight").dtype == "F16"


def test_existing_output_is_refused_without_force_and_replaced_with_it(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("repack", FIXTURES / "w4a16-g128", out, "--target", "awq", "-q").code == 0
    r = cli("repack", FIXTURES / "w4a16-g128", out, "--target", "dense")
    assert r.code == 2 and "already exists" in r.err and "--force" in r.err
    assert json.loads((out / "ct-convert.json").read_text())["target"] == "awq"
    r = cli("repack", FIXTURES / "w4a16-g128", out, "--target", "dense", "--force", "-q")
    assert r.code == 0 and (out / "model.safetensors").exists()
    assert json.loads((out / "ct-convert.json").read_text())["target"] == "dense"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_activation_and_kv_scales_are_dropped_from_dense_and_listed(cli, tmp_path):
    out = tmp_path / "out"
    assert cli("repack", FIXTURES / "fp8-static", out, "--target", "dense", "-q").code == 0
    manifest = json.loads((out / "ct-convert.json").read_text())
    dropped = manifest["dropped_tensors"]
    assert any(d.endswith("k_scale") for d in dropped) and any(d.endswith("input_scale") for d in dropped)
    assert not any(n.endswith(("k_scale", "input_scale")) for n in open_store(out).names)


def test_online_transforms_are_refused(cli, tmp_path):
    r = cli("repack", FIXTURES / "transform-online", tmp_path / "out", "--target", "dense")
    assert r.code == 2 and "online transform" in r.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", NAMES)
def test_output_is_byte_identical_across_runs_and_worker_counts(cli, tmp_path, target):
    fixture = SAMPLE[target]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("repack", FIXTURES / fixture, a, "--target", target, "--workers", "1", "-q").code == 0
    assert cli("repack", FIXTURES / fixture, b, "--target", target, "--workers", "3", "-q").code == 0
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes() or p.name == "ct-convert.json"
    ma = json.loads((a / "ct-convert.json").read_text())
    mb = json.loads((b / "ct-convert.json").read_text())
    assert ma["files"] == mb["files"]


@pytest.mark.parametrize("name", ["w4a16-g128", "w4a16-asym-g128", "w4a16-asym-channel", "w3a16-g128"])
def test_dense_bands_hold_the_library_decompression(cli, tmp_path, monkeypatch, name):
    """Dequantized weights streamed as bands of rows (ROW_BAND_ELEMENTS patched: bands of 3 rows at
    most, the last one short) equal the library's decompression, as whole weights do."""
    from ct_convert import qweight, tensorstore

    monkeypatch.setattr(qweight, "ROW_BAND_ELEMENTS", 3 * 128 + 1)
    monkeypatch.setattr(tensorstore, "BAND_BYTES", 5 * 128 * 2)  # verification reads the output in bands of 5 rows
    out = tmp_path / "out"
    r = cli("repack", FIXTURES / name, out, "--target", "dense", "--json")
    assert r.code == 0 and r.json()["verified"] is True, r.err
    store = open_store(out)
    for key, want in load_file(FIXTURES / name / "reference.safetensors").items():
        assert equal_bits(store.get(key), want), key


def test_dense_bands_verification_finds_a_changed_last_value(cli, tmp_path, monkeypatch):
    from ct_convert import qweight, tensorstore
    from ct_convert.bands import pieces
    from ct_convert.targets.dense.writer import DenseWriter

    monkeypatch.setattr(qweight, "ROW_BAND_ELEMENTS", 3 * 128 + 1)
    monkeypatch.setattr(tensorstore, "BAND_BYTES", 5 * 128 * 2)
    real = DenseWriter.convert

    def last_value_off_by_one_ulp(self, qw, opts):
        out = real(self, qw, opts)
        if qw.name.endswith("mlp.down_proj"):
            out["weight"] = torch.cat(list(pieces(out["weight"])))
            out["weight"].view(torch.int16)[-1, -1] += 1
        return out

    monkeypatch.setattr(DenseWriter, "convert", last_value_off_by_one_ulp)
    r = cli("repack", FIXTURES / "w4a16-g128", tmp_path / "out", "--target", "dense")
    assert r.code == 1 and "down_proj" in r.err
