"""The `ct-convert` command as installed (`cli.console_script`): it leaves the process without
tearing the interpreter down, so its exit codes and every byte it printed must still come out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import FIXTURES


def command(*args, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    code = "import sys; from ct_convert.cli import console_script; sys.argv[0] = 'ct-convert'; console_script()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)


def test_a_long_document_on_a_pipe_comes_out_whole_with_exit_0():
    r = command("inspect", FIXTURES / "moe-w4a16", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # fails on a truncated document
    assert doc["modules"] and len(r.stdout) > 4096


@pytest.mark.parametrize("args,code,where", [
    (("inspect", "/nonexistent/folder"), 2, "stderr"),
    (("repack",), 2, "stderr"),  # a usage error
    (("--version",), 0, "stdout"),
])
def test_exit_codes_and_messages(args, code, where):
    r = command(*args)
    assert r.returncode == code
    text = getattr(r, where)
    assert text.endswith("\n") and len(text.strip()) > 5


def test_a_mismatch_exits_1_after_its_table(tmp_path):
    out = tmp_path / "out"
    assert command("repack", FIXTURES / "w4a16-g128", out, "--target", "dense", "-q").returncode == 0
    f = out / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.mlp.up_proj.weight"].view(-1)[0] += 1
    save_file(tensors, f, metadata={"format": "pt"})
    r = command("verify", FIXTURES / "w4a16-g128", out)
    assert r.returncode == 1
    assert "MISMATCH" in r.stdout and r.stdout.rstrip().endswith("mismatched")

