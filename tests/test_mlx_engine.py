"""mlx-lm end to end (skipped when mlx-lm is not installed): every fixture the mlx target accepts and
one tiny model of every architecture it writes are converted, loaded by `mlx_lm.utils.load_model`
(strict: every tensor name and shape must be what the model class holds), and run on fixed token ids.
The reference is mlx-lm running the same architecture on the dense weights, dequantized from the
source in float32 (never through the MLX writer). Both run in float32, where MLX's
`scales * q + biases` is exact. Measured (largest logit difference relative to the largest logit):
correct outputs 0 for affine layers and at most 3.2e-7 for mxfp4/mxfp6/mxfp8 (another summation
order); one code moved by one step in one layer 8.4e-5 (w8a16) to 1.8e-2 (gemma3_text). The bound,
1e-6, sits between the two. In bf16, MLX rounds every dequantized weight twice (test_mlx.py) and the
logits differ from the bf16 dense model by 0.7e-2 to 4.3e-2 relative, as for any MLX affine model
(mlx_lm.convert's output runs the same kernels); MLX's CPU gather_mm runs dense MoE layers in float32 only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import mlx_models
from conftest import FIXTURES
from test_mlx import ACCEPTED

mx = pytest.importorskip("mlx.core")
mlx_utils = pytest.importorskip("mlx_lm.utils")

from ct_convert.readers.checkpoint import open_checkpoint  # noqa: E402
from ct_convert.source import resolve  # noqa: E402

IDS = [[1, 5, 9, 2, 33, 17, 4, 60, 3, 8, 12, 40]]
CORRECT = 1e-6  # relative to the largest logit; measured: 0 (affine), <= 3.2e-7 (mx modes)
CORRUPT = 1e-4  # one code of o_proj moved one step: measured >= 6.7e-3 over the architectures


def dense_reference(src, out, folder):
    """mlx-lm's model for the output's config with the source's weights dequantized in float32."""
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization")
    config.pop("quantization_config")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    reader = open_checkpoint(resolve(str(src)))
    # layers kept in float hold the library's decompression, rounded to the model dtype
    dense = {f["module"] for f in json.loads((out / "ct-convert.json").read_text())["fallbacks"]}
    weights = {f"{m}.weight": reader.read(m).dequantize(None if m in dense else torch.float32).float().numpy() for m in reader.modules}
    weights.update({t: reader.get(t).float().numpy() for t in reader.passthrough() if not reader.is_quantization_param(t)})
    save_file(weights, folder / "model.safetensors")
    model, _ = mlx_utils.load_model(folder)
    return model


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def converted(cli, src, out, *args):
    r = cli("repack", src, out, "--target", "mlx", "-q", *args)
    assert r.code == 0, r.err
    model, config = mlx_utils.load_model(out)
    model.set_dtype(mx.float32)  # scales and biases widened exactly; the uint32 codes stay
    return model


def check(cli, tmp_path, src, *args):
    out = tmp_path / "out"
    got = logits(converted(cli, src, out, *args))
    want = logits(dense_reference(src, out, tmp_path / "dense"))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= CORRECT * scale
    return out, want, scale


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_fixture_logits_equal_the_dense_model(cli, tmp_path, name):
    check(cli, tmp_path, FIXTURES / name)


@pytest.mark.parametrize("model_type", mlx_models.ARCHS)
def test_every_architecture_loads_under_mlx_lm_names(cli, tmp_path, model_type):
    src = mlx_models.build(tmp_path / "src", model_type)
    out, want, scale = check(cli, tmp_path, src)
    # one code of one layer moved by one step must show
    name = "model.layers.0.self_attn.o_proj.weight"
    from safetensors.torch import load_file, save_file as save_torch

    t = load_file(out / "model.safetensors")
    t[name].view(torch.int32)[0, 0] ^= 1
    save_torch(t, out / "model.safetensors", metadata={"format": "mlx"})
    model, _ = mlx_utils.load_model(out)
    model.set_dtype(mx.float32)
    assert np.abs(logits(model) - want).max() >= CORRUPT * scale


def test_asymmetric_checkpoint(cli, tmp_path):
    check(cli, tmp_path, mlx_models.build(tmp_path / "src", "qwen3_moe", symmetric=False))


@pytest.mark.parametrize("bits,group", [(3, 64), (8, 32), (2, 32)])
def test_other_bit_widths_and_groups(cli, tmp_path, bits, group):
    check(cli, tmp_path, mlx_models.build(tmp_path / "src", "qwen2", bits=bits, group_size=group))


def test_fallback_layers_load_as_float(cli, tmp_path):
    check(cli, tmp_path, FIXTURES / "mixed-fp8-w4a16", "--keep-unsupported", "dense")


def test_mlx_lm_load_generates_with_the_copied_tokenizer(cli, tmp_path):
    """mlx_lm.load (weights, config and tokenizer files) on a fixture shipped with a tokenizer."""
    from mlx_lm import generate, load

    out = tmp_path / "out"
    assert cli("repack", FIXTURES / "gguf" / "qwen3moe-w4a16", out, "--target", "mlx", "-q").code == 0
    model, tokenizer = load(str(out))
    text = generate(model, tokenizer, prompt="The quick brown fox", max_tokens=4)
    assert isinstance(text, str) and len(tokenizer.encode(text)) >= 1


def test_deepseek_kv_b_proj_is_written_in_float_when_asked(cli, tmp_path):
    """mlx-lm splits kv_b_proj at load and quantizes both halves again: refused, or kept in float."""
    src = mlx_models.build(tmp_path / "src", "deepseek_v3", also=("kv_b_proj",))
    r = cli("repack", src, tmp_path / "refused", "--target", "mlx")
    assert r.code == 2 and "kv_b_proj" in r.err
    out, _, _ = check(cli, tmp_path, src, "--keep-unsupported", "dense")
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.layers.1.self_attn.kv_b_proj"] is False


def test_a_float_expert_layer_among_quantized_ones(cli, tmp_path):
    from test_mlx import one_inexact_expert

    check(cli, tmp_path, one_inexact_expert(tmp_path), "--keep-unsupported", "dense")
