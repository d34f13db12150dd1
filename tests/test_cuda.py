"""The CUDA path gives exactly the CPU path's bytes. Skipped cleanly on machines without a GPU."""

import json

import pytest
import torch

from conftest import FIXTURES, SAMPLE
from ct_convert.targets import NAMES

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CASES = [(SAMPLE[t], t) for t in NAMES] + [
    ("w4a16-g128", "dense"), ("legacy-0.8.1-actorder-group", "gptq"),
    ("nvfp4a16", "dense"), ("mxfp4a16", "dense"), ("w3a16-g128", "gptq"), ("fp8-block", "dense"),
    ("w3a16-g128", "mlx"), ("legacy-0.14-w3a16", "mlx"), ("mxfp6a16", "mlx"),
]


@pytest.mark.parametrize("fixture,target", CASES)
def test_cuda_output_is_byte_identical_to_cpu(cli, tmp_path, fixture, target):
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    assert cli("repack", FIXTURES / fixture, cpu, "--target", target, "--device", "cpu", "-q").code == 0
    r = cli("repack", FIXTURES / fixture, gpu, "--target", target, "--device", "cuda", "-q")
    assert r.code == 0, r.err
    a = json.loads((cpu / "ct-convert.json").read_text())["files"]
    b = json.loads((gpu / "ct-convert.json").read_text())["files"]
    assert a == b
