"""Every fixture through the real CLI to awq, gptq and marlin: accepted ones repack and verify
exactly, refused ones exit 2 with a one-line error and leave no output; configs, fallbacks,
determinism, and the §0.2 identity qweight == weight_packed^T on real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import equal_bits
from ct_convert.cli import app
from ct_convert.errors import UnsupportedConversion

pack_lib = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
NAMES = [f["name"] for f in json.loads((FIXTURES / "index.json").read_text())["fixtures"]]
INT4_GROUP = {
    "w4a16-g128", "w4a16-sharded", "w4a16-asym-g128", "marlin-ok-w4a16", "moe-w4a16",
    "legacy-0.12.2-w4a16-asym", "legacy-0.8.1-w4a16-asym", "legacy-0.9.4-w4a16-asym",
    "legacy-0.14-marlin24", "legacy-0.8.1-marlin24",
}  # fmt: skip
ACCEPTS = {
    "awq": INT4_GROUP,
    "gptq": INT4_GROUP | {
        "w4a16-channel", "w4a16-asym-channel", "w2a16-g128", "w3a16-g128", "legacy-0.14-w3a16",
        "legacy-0.17-w3a16", "w8a16-g128", "w8a16-naive", "legacy-0.8.1-actorder-group",
    },
    "marlin": {"marlin-ok-w4a16"},
}  # fmt: skip
REQUIRED = {
    "awq": {"quant_method": "awq", "version": "gemm", "bits": 4, "zero_point": True},
    "gptq": {"quant_method": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32"},
    "marlin": {"quant_method": "marlin", "bits": 4, "sym": True, "desc_act": False},
}

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ct_convert.cli", *map(str, args)], capture_output=True, text=True)


def qconfig(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("target", sorted(ACCEPTS))
@pytest.mark.parametrize("name", NAMES)
def test_fixture_repacks_and_verifies_or_is_refused(tmp_path, name, target):
    out = tmp_path / "out"
    res = invoke("repack", FIXTURES / name, out, "--target", target, "--quiet")
    if name not in ACCEPTS[target]:
        assert res.exit_code != 0 and isinstance(res.exception, UnsupportedConversion), res.output
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return
    assert res.exit_code == 0, f"{res.output} {res.exception!r}"
    check = invoke("verify", FIXTURES / name, out, "--json")
    assert check.exit_code == 0, check.output
    report = json.loads(check.stdout)
    assert report["ok"] and report["results"] and all(r["exact"] for r in report["results"])
    qc = qconfig(out)
    assert qc.items() >= REQUIRED[target].items()
    assert isinstance(qc["group_size"], int) and qc["group_size"] != 0
    if target == "awq":
        assert "lm_head" in qc["modules_to_not_convert"]
    if target == "gptq":
        assert qc["desc_act"] is (name == "legacy-0.8.1-actorder-group")
        assert qc["sym"] is ("asym" not in name)
        assert "-:^lm_head$" in qc["dynamic"]


def zero_point_minus_8(tmp_path: Path) -> Path:
    """w4a16-asym-g128 with one signed zero point set to -8 (unsigned 0), packed by the library."""
    src = FIXTURES / "w4a16-asym-g128"
    dst = tmp_path / "asym-zp-8"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight_zero_point"
    n = int(tensors["model.layers.0.self_attn.q_proj.weight_shape"][0])
    z = pack_lib.unpack_from_int32(tensors[name], 4, torch.Size([n, 1]), packed_dim=0)
    assert int(z.min()) > -8
    z[5, 0] = -8
    tensors[name] = pack_lib.pack_to_int32(z, 4, packed_dim=0)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def asym_zp_8(tmp_path):
    return zero_point_minus_8(tmp_path)


def assert_refused(res: subprocess.CompletedProcess, out: Path, *words: str):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and len(lines) <= 2  # the message, then the hint
    for w in words:
        assert w in lines[0]
    assert not out.exists() and not any(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize(
    "name,target,words",
    [
        ("w8a16-g128", "awq", ("8-bit",)),
        ("legacy-0.8.1-actorder-group", "awq", ("act-order",)),
        ("w4a16-g128", "marlin", ("K % 128 == 0 and N % 256 == 0",)),
        ("w4a16-asym-g128", "marlin", ("asymmetric",)),
    ],
)
def test_refusals_through_the_cli(tmp_path, name, target, words):
    out = tmp_path / "out"
    assert_refused(cli("repack", FIXTURES / name, out, "--target", target), out, "model.layers.0", *words)


def test_zero_point_minus_8_refused_by_gptq_v1_only(asym_zp_8, tmp_path):
    out = tmp_path / "v1"
    res = cli("repack", asym_zp_8, out, "--target", "gptq")
    assert_refused(res, out, "q_proj", "GPTQ v1")
    assert "--gptq-format v2" in res.stderr
    for target, extra in (("gptq", ["--gptq-format", "v2"]), ("awq", [])):
        ok = tmp_path / f"ok-{target}"
        assert invoke("repack", asym_zp_8, ok, "--target", target, "--quiet", *extra).exit_code == 0
        assert invoke("verify", asym_zp_8, ok).exit_code == 0
    assert qconfig(tmp_path / "ok-gptq")["checkpoint_format"] == "gptq_v2"


def test_keep_unsupported_dense_lists_fallbacks(tmp_path):
    src = FIXTURES / "mixed-fp8-w4a16"
    attn = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    for target in ("awq", "gptq"):
        out = tmp_path / target
        assert invoke("repack", src, out, "--target", target, "--keep-unsupported", "dense", "--quiet").exit_code == 0
        assert invoke("verify", src, out).exit_code == 0
        qc = qconfig(out)
        with safe_open(out / "model.safetensors", "pt") as f:
            keys = set(f.keys())
        for m in attn:
            assert f"{m}.weight" in keys and f"{m}.qweight" not in keys
            if target == "awq":
                assert m in qc["modules_to_not_convert"]
            else:
                assert "-:^" + m.replace(".", "\\.") + "$" in qc["dynamic"]
        assert "model.layers.0.mlp.down_proj.qweight" in keys
    out = tmp_path / "marlin"
    res = cli("repack", FIXTURES / "marlin-ok-w4a16", out, "--target", "marlin", "--keep-unsupported", "dense", "--quiet")
    assert res.returncode == 0
    assert_refused(cli("repack", src, tmp_path / "m2", "--target", "marlin", "--keep-unsupported", "dense"), tmp_path / "m2")


@pytest.mark.parametrize("name", ["w4a16-g128", "w3a16-g128", "w8a16-g128", "w2a16-g128"])
def test_gptq_qweight_is_weight_packed_transposed(tmp_path, name):
    out = tmp_path / "out"
    assert invoke("repack", FIXTURES / name, out, "--target", "gptq", "--quiet", "--no-verify").exit_code == 0
    src = load_file(FIXTURES / name / "model.safetensors")
    got = load_file(out / "model.safetensors")
    mods = [k.removesuffix(".weight_packed") for k in src if k.endswith(".weight_packed")]
    assert mods
    for m in mods:
        assert equal_bits(got[f"{m}.qweight"], src[f"{m}.weight_packed"].t())


def test_marlin_output_matches_library_codes(tmp_path):
    """B from the library-unpacked codes through the §1.2 construction; s permuted per §1.3."""
    from ct_convert.marlin_layout import marlin_permute_scales, marlin_weights

    name = "marlin-ok-w4a16"
    out = tmp_path / "out"
    assert invoke("repack", FIXTURES / name, out, "--target", "marlin", "--quiet").exit_code == 0
    src = load_file(FIXTURES / name / "model.safetensors")
    got = load_file(out / "model.safetensors")
    m = "model.layers.0.mlp.down_proj"
    n, k = src[f"{m}.weight_shape"].tolist()
    codes = pack_lib.unpack_from_int32(src[f"{m}.weight_packed"], 4, torch.Size([n, k]))
    assert equal_bits(got[f"{m}.B"], marlin_weights((codes.to(torch.int16) + 8).t(), 4))
    scales = src[f"{m}.weight_scale"].t().to(torch.float16)
    assert equal_bits(got[f"{m}.s"], marlin_permute_scales(scales, k, n, 128))
    assert got[f"{m}.B"].shape == (k // 16, 2 * n)


@pytest.mark.parametrize("target,name", [("awq", "w4a16-asym-g128"), ("gptq", "w3a16-g128"), ("marlin", "marlin-ok-w4a16")])
def test_output_bytes_identical_across_runs(tmp_path, target, name):
    outs = [tmp_path / "a", tmp_path / "b"]
    for o in outs:
        assert invoke("repack", FIXTURES / name, o, "--target", target, "--quiet", "--workers", "2").exit_code == 0
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
