import pytest
import torch

from conftest import FIXTURES


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_device_cuda_without_a_gpu_is_a_clear_error(cli, tmp_path):
    r = cli("repack", FIXTURES / "w4a16-g128", tmp_path / "out", "--target", "dense", "--device", "cuda")
    assert r.code == 2 and "no CUDA device" in r.err
    assert not (tmp_path / "out").exists()


def test_device_auto_falls_back_to_cpu(cli, tmp_path):
    assert cli("repack", FIXTURES / "w4a16-g128", tmp_path / "out", "--target", "dense", "--device", "auto", "-q").code == 0
