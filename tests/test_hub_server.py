"""`inspect` of a repo id that is not cached, against a local stand-in for the Hub (tests/fakehub.py)
reached through HF_ENDPOINT on 127.0.0.1: only headers and tiny tensors travel, revisions are
honoured and pinned to one commit, and a missing repo, a truncated answer or a stalled server each
end in one line on stderr within a bounded time.

huggingface_hub reads HF_ENDPOINT and its timeouts when it is imported, so the commands run in one
child process that imports it once with the test's settings and runs every case in turn; each repo
of the fake Hub stands for one case (its fault is keyed by repo)."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save

from conftest import FIXTURES
from fakehub import FakeHub, serve

MAIN = "1" * 40
V1 = "2" * 40
PAD = 1 << 20  # an extra 1 MiB tensor: the weights are far more than the 100 kB huggingface_hub reads first

CASES = {
    "headers": (["inspect", "acme/tiny", "--json"], {}),
    "revision": (["inspect", "acme/tiny", "--revision", "v1", "--json"], {}),
    "no repo": (["inspect", "acme/nope"], {}),
    "no revision": (["inspect", "acme/tiny", "--revision", "v9"], {}),
    "truncated": (["inspect", "acme/truncated"], {}),
    "truncated tensor": (["inspect", "acme/truncated-tensor"], {}),
    "stalled": (["inspect", "acme/stalled"], {"CT_CONVERT_HUB_TIMEOUT": "2"}),
}

DRIVER = r"""
import contextlib, io, json, os, sys, time
from ct_convert.cli import main

results = {}
for case, (args, env) in json.loads(sys.argv[1]).items():
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["ct-convert", *args]
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    results[case] = {"code": code, "out": out.getvalue(), "err": err.getvalue(), "seconds": time.monotonic() - started}
    os.environ.pop("CT_CONVERT_HUB_TIMEOUT", None)
print(json.dumps(results))
"""


def _repo_files(architecture: str) -> dict[str, bytes]:
    src = FIXTURES / "w4a16-g128"
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = [architecture]
    tensors = load_file(src / "model.safetensors")
    tensors["model.padding.weight"] = torch.zeros(PAD // 2, dtype=torch.bfloat16)
    return {
        "config.json": json.dumps(config).encode(),
        "model.safetensors": save(tensors, metadata={"format": "pt"}),
        "generation_config.json": (src / "generation_config.json").read_bytes(),
    }


@pytest.fixture(scope="module")
def hub():
    h = FakeHub()
    files = _repo_files("LlamaForCausalLM")
    h.add("acme/tiny", "main", MAIN, files)
    h.add("acme/tiny", "v1", V1, _repo_files("MistralForCausalLM"))
    for repo in ("acme/truncated", "acme/truncated-tensor", "acme/stalled"):
        h.add(repo, "main", MAIN, files)
    h.fault["acme/truncated"] = ("truncate", "model.safetensors", 0)
    h.fault["acme/truncated-tensor"] = ("truncate", "model.safetensors", 9)  # header reads start at 0
    h.fault["acme/stalled"] = ("stall", "config.json", 0)
    server, url = serve(h)
    h.url = url
    yield h
    h.release.set()  # let stalled handlers finish
    server.shutdown()


@pytest.fixture(scope="module")
def results(hub, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    # a 1 s metadata timeout makes huggingface_hub give up its first try on the stalled server quickly;
    # it then retries with a fixed 60 s, which CT_CONVERT_HUB_TIMEOUT cuts short
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), NO_PROXY="127.0.0.1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_ETAG_TIMEOUT="1")
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(CASES)], env=env, capture_output=True, text=True,
                       timeout=300, cwd=home)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


def one_error_line(result: dict) -> str:
    assert result["code"] == 2 and result["out"] == ""
    lines = result["err"].strip().splitlines()
    assert "Traceback" not in result["err"] and 1 <= len(lines) <= 2, result["err"]
    assert lines[0].startswith("error: ")
    return lines[0]


def test_inspect_reads_headers_and_tiny_tensors_only(hub, results):
    r = results["headers"]
    assert r["code"] == 0, r["err"]
    doc = json.loads(r["out"])
    assert doc["architecture"] == "LlamaForCausalLM" and len(doc["modules"]) == 7
    raw = hub.repos["acme/tiny"]["main"][1]["model.safetensors"]
    (n,) = struct.unpack("<Q", raw[:8])
    pad_start, pad_stop = (8 + n + o for o in json.loads(raw[8 : 8 + n])["model.padding.weight"]["data_offsets"])
    gets = [g for g in hub.served("acme/tiny", "model.safetensors") if g.ref in ("main", MAIN)]
    assert gets and all(g.stop - g.start < len(raw) for g in gets)
    # huggingface_hub's first 100001-byte read, the 8-byte header length, and the 7 weight_shape tensors
    assert sum(g.stop - g.start for g in gets) <= 100_001 + 8 + 7 * 16
    assert sum(max(0, min(g.stop, pad_stop) - max(g.start, pad_start)) for g in gets) < 100_001  # of 1 MiB


def test_revision_is_read_at_one_commit(hub, results):
    r = results["revision"]
    assert r["code"] == 0, r["err"]
    assert json.loads(r["out"])["architecture"] == "MistralForCausalLM"
    refs = [s.ref for s in hub.log if s.repo == "acme/tiny" and s.ref in ("v1", V1)]
    # the ref is resolved once (config.json), every later request names the commit it resolved to
    assert refs[:2] == ["v1", "v1"] and set(refs[2:]) == {V1}, refs
    assert len(refs) > 4


def test_missing_repo_and_revision_are_one_line(results):
    assert "acme/nope: no such repository" in one_error_line(results["no repo"])
    assert "acme/tiny: no revision 'v9'" in one_error_line(results["no revision"])


def test_truncated_response_is_one_line(results):
    line = one_error_line(results["truncated"])
    assert "acme/truncated: cannot fetch from the Hugging Face Hub: RemoteProtocolError" in line


def test_truncated_tiny_tensor_read_is_one_line(results):
    """ct-convert's own range reads (the weight_shape tensors, after the header) fail the same way."""
    line = one_error_line(results["truncated tensor"])
    assert "acme/truncated-tensor/model.safetensors: cannot read bytes " in line and "RemoteProtocolError" in line


def test_stalled_server_gives_up_in_bounded_time(results):
    r = results["stalled"]
    assert "acme/stalled: the Hugging Face Hub did not answer within 2 s" in one_error_line(r)
    assert r["seconds"] < 10  # huggingface_hub alone would wait 1 + 60 s
