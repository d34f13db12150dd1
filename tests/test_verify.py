import json

import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES


def _dense(cli, tmp_path, name="w4a16-g128"):
    out = tmp_path / "out"
    assert cli("repack", FIXTURES / name, out, "--target", "dense", "-q").code == 0
    return out


def test_verify_passes_on_a_faithful_output(cli, tmp_path):
    out = _dense(cli, tmp_path)
    r = cli("verify", FIXTURES / "w4a16-g128", out, "--json")
    assert r.code == 0
    doc = r.json()
    assert doc["ok"] and all(x["exact"] for x in doc["results"])
    assert {x["module"] for x in doc["results"]} >= {"model.layers.0.mlp.down_proj", "lm_head.weight"}


def test_verify_finds_a_one_ulp_change_and_exits_1(cli, tmp_path):
    out = _dense(cli, tmp_path)
    f = out / "model.safetensors"
    tensors = load_file(f)
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    w.view(torch.int16)[0, 0] += 1
    save_file(tensors, f, metadata={"format": "pt"})
    r = cli("verify", FIXTURES / "w4a16-g128", out)
    assert r.code == 1
    assert "MISMATCH" in r.out and "up_proj" in r.out
    assert cli("verify", FIXTURES / "w4a16-g128", out, "--atol", "1e-2", "-q").code == 0
    # the manifest check sees the rewritten file too
    r = cli("verify", "--manifest", out, "--json")
    assert r.code == 1
    assert r.json()["problems"][0]["file"] == "model.safetensors"


def test_manifest_check_catches_missing_and_extra_files(cli, tmp_path):
    out = _dense(cli, tmp_path)
    assert cli("verify", "--manifest", out).code == 0
    (out / "generation_config.json").unlink()
    (out / "extra.txt").write_text("x")
    r = cli("verify", "--manifest", out, "--json")
    assert r.code == 1
    problems = {p["file"]: p["problem"] for p in r.json()["problems"]}
    assert problems == {"generation_config.json": "missing", "extra.txt": "not in the manifest"}


def test_manifest_records_sha256_and_size_of_every_file(cli, tmp_path):
    import hashlib

    out = _dense(cli, tmp_path)
    manifest = json.loads((out / "ct-convert.json").read_text())
    for rel, entry in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert manifest["modules"]["model.layers.0.mlp.down_proj"]["verified"]["exact"] is True


def test_repack_refuses_to_commit_an_output_that_fails_verification(cli, tmp_path, monkeypatch):
    from ct_convert.bands import pieces
    from ct_convert.targets.dense.writer import DenseWriter

    real = DenseWriter.convert

    def off_by_one_ulp(self, qw, opts):
        out = real(self, qw, opts)
        if qw.name.endswith("o_proj"):
            out["weight"] = torch.cat(list(pieces(out["weight"])))  # the bands the dense writer streams, joined
            out["weight"].view(torch.int16)[0, 0] += 1
        return out

    monkeypatch.setattr(DenseWriter, "convert", off_by_one_ulp)
    r = cli("repack", FIXTURES / "w4a16-g128", tmp_path / "out", "--target", "dense")
    assert r.code == 1 and "o_proj" in r.err
    assert list(tmp_path.iterdir()) == []


def test_verify_usage_errors(cli, tmp_path):
    assert cli("verify", FIXTURES / "w4a16-g128").code == 2
    assert cli("verify", "--manifest", tmp_path / "nope").code == 2
