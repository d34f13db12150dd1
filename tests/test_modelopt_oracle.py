"""The ModelOpt target checked against NVIDIA's own code: nvidia-modelopt (a test-only dependency, CPU)
packs and dequantizes the same weights, and our tensors must equal its bytes and values.

* int4: ModelOpt's `pack_int4_in_uint8` on the compressed-tensors library's decompression gives our
  W4A16_AWQ `weight` bytes;
* NVFP4: ModelOpt's `NVFP4QTensor.dequantize` of our `weight`/`weight_scale`/`weight_scale_2` equals the
  compressed-tensors library's decompression (which divides by the reciprocal global scale) bit for bit,
  for every E4M3 block scale and E2M1 code, over many global scales;
* FP8 / FP8 per channel / FP8 128x128 blocks and MXFP4: ModelOpt's dequantizers give the library's
  decompression, and its FP8 quantizer gives our bytes back;
* config: ModelOpt's `process_layer_quant_config` and `convert_hf_quant_config_format` agree with our
  hf_quant_config.json and config.json.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from test_modelopt_repack import LINEARS, repack, shared_global_scales

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # modelopt warns about untested transformers versions
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    quant_utils = pytest.importorskip("modelopt.torch.export.quant_utils")
    convert_hf_config = pytest.importorskip("modelopt.torch.export.convert_hf_config")

from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

from ct_convert.targets.modelopt.plan import weight_scale_2  # noqa: E402


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, with -0.0 read as 0.0 (ModelOpt's E2M1 table has no negative zero; code 0x8 is 0)."""
    t = t + 0.0
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def test_int4_packing_equals_modelopt(cli, tmp_path):
    for fixture in ("w4a16-g128", "moe-w4a16"):
        _, _, out = repack(cli, FIXTURES / fixture, tmp_path / fixture)
        ref = load_file(FIXTURES / fixture / "reference.safetensors")
        for name, w in ref.items():
            m = name.removesuffix(".weight")
            scale = out[f"{m}.weight_scale"].to(torch.float32)
            want = quant_utils.pack_int4_in_uint8(w.to(torch.float32), scale, 128)
            assert want.dtype == torch.uint8 and torch.equal(out[f"{m}.weight"], want), m


def test_int4_packing_of_stacked_experts_equals_modelopt():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from ct_convert.targets.int4_rows import from_stream, pack

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (3, 8, 256), generator=g, dtype=torch.int8)
    scale = torch.rand(3, 8, 2, generator=g) + 0.5
    w = codes.to(torch.float32) * scale.repeat_interleave(128, -1)
    want = quant_utils.pack_int4_in_uint8(w, scale, 128)
    assert torch.equal(pack(codes), want)
    stream = pack_to_int32(codes.reshape(-1, 256), 4).reshape(3, 8, 32)  # what pack-quantized sources hold
    assert torch.equal(from_stream(stream), want)


def _nvfp4_scheme(activations: bool) -> QuantizationScheme:
    args = dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True)
    return QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**args, dynamic=False),
        input_activations=QuantizationArgs(**args, dynamic="local") if activations else None,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_scale_2_dequantizes_like_compressed_tensors(dtype):
    """Every E2M1 code in a block of every positive E4M3 scale, under 60 global scales: ModelOpt's
    dequantization with our weight_scale_2 equals the compressed-tensors library's with the global divisor."""
    scales = torch.arange(1, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(1, -1)
    codes = torch.arange(16, dtype=torch.uint8).repeat(126).reshape(1, -1)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    gen = torch.Generator().manual_seed(1)
    amax = torch.cat([torch.rand(56, generator=gen) * 100, torch.tensor([2688.0, 1.0, 0.03125, 448.0])])
    tried = 0
    for g in (2688.0 / amax).to(torch.float32):
        w2 = weight_scale_2(g.reshape(1), dtype)
        if w2 is None:
            continue  # refused by the writer: checked to be rare below
        tried += 1
        # the library's arithmetic in float32 (its decompressor always returns bf16), rounded once to dtype
        x = unpack_fp4_from_uint8(packed, 1, codes.shape[1], dtype=torch.float32)
        ct = dequantize(x, scales.to(torch.float32), args=_nvfp4_scheme(False).weights, global_scale=g.reshape(1),
                        dtype=torch.float32).to(dtype)
        mo = qtensor.NVFP4QTensor(codes.shape, dtype, packed).dequantize(
            dtype=dtype, scale=scales, double_scale=w2.reshape(()), block_sizes={-1: 16})
        assert torch.equal(bits(mo), bits(ct)), float(g)
    assert tried >= 55


def test_nvfp4_outputs_dequantize_to_the_library_reference(cli, tmp_path):
    # fused projections of the fixture have different global scales and fall back; o_proj / down_proj convert
    for fixture in ("nvfp4", "nvfp4a16"):
        _, _, out = repack(cli, FIXTURES / fixture, tmp_path / fixture, "--keep-unsupported", "dense")
        ref = load_file(FIXTURES / fixture / "reference.safetensors")
        for m in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
            w = out[f"{m}.weight"]
            mo = qtensor.NVFP4QTensor(torch.Size([w.shape[0], 2 * w.shape[1]]), torch.bfloat16, w).dequantize(
                dtype=torch.bfloat16, scale=out[f"{m}.weight_scale"], double_scale=out[f"{m}.weight_scale_2"],
                block_sizes={-1: 16})
            assert torch.equal(bits(mo), bits(ref[f"{m}.weight"])), m


def test_nvfp4_shared_scales_dequantize_to_the_library(cli, tmp_path):
    src = shared_global_scales(FIXTURES / "nvfp4", tmp_path / "src")
    _, _, out = repack(cli, src, tmp_path / "o")
    state = load_file(src / "model.safetensors")
    for m in LINEARS:
        ct = NVFP4PackedCompressor.decompress(
            {s: state[f"{m}.{s}"] for s in ("weight_packed", "weight_scale", "weight_global_scale")}, _nvfp4_scheme(True)
        )["weight"]
        w = out[f"{m}.weight"]
        mo = qtensor.NVFP4QTensor(torch.Size([w.shape[0], 2 * w.shape[1]]), torch.bfloat16, w).dequantize(
            dtype=torch.bfloat16, scale=out[f"{m}.weight_scale"], double_scale=out[f"{m}.weight_scale_2"],
            block_sizes={-1: 16})
        assert torch.equal(bits(mo), bits(ct.to(torch.bfloat16))), m


def test_fp8_layouts_equal_modelopt(cli, tmp_path):
    cases = {"fp8-static": None, "fp8-dynamic": "channel", "fp8-block": {-1: 128, -2: 128}}
    for fixture, kind in cases.items():
        _, _, out = repack(cli, FIXTURES / fixture, tmp_path / fixture)
        for name, ref in load_file(FIXTURES / fixture / "reference.safetensors").items():
            m = name.removesuffix(".weight")
            w, s = out[f"{m}.weight"], out[f"{m}.weight_scale"]
            t = qtensor.FP8QTensor(w.shape, torch.bfloat16, w)
            if kind is None:
                mo = t.dequantize(dtype=torch.bfloat16, scale=s)
                again = quant_utils.to_quantized_weight(ref.to(torch.float32), s, "fp8")
            elif kind == "channel":
                mo = t.dequantize(dtype=torch.bfloat16, scale=s[:, None])
                again = quant_utils.to_quantized_weight(ref.to(torch.float32), s, "fp8_pc_pt")
            else:
                mo = t.dequantize(dtype=torch.bfloat16, scale=s, block_sizes=kind)
                again = None
            assert torch.equal(bits(mo), bits(ref)), m
            if again is not None:  # ModelOpt quantizing the library's weights gives our bytes
                assert torch.equal(again.view(torch.uint8), w.view(torch.uint8)), m


def test_mxfp4_dequantizes_to_the_library_reference(cli, tmp_path):
    _, _, out = repack(cli, FIXTURES / "mxfp4a16", tmp_path / "o")
    for name, ref in load_file(FIXTURES / "mxfp4a16" / "reference.safetensors").items():
        m = name.removesuffix(".weight")
        w = out[f"{m}.weight"]
        mo = qtensor.MXFP4QTensor(torch.Size([w.shape[0], 2 * w.shape[1]]), torch.bfloat16, w).dequantize(
            dtype=torch.bfloat16, scale=out[f"{m}.weight_scale"], block_sizes={-1: 32})
        assert torch.equal(bits(mo), bits(ref)), m


def test_config_equals_modelopts(cli, tmp_path):
    formats = {"w4a16-g128": {m: "int4_awq" for m in LINEARS},
               "fp8-dynamic": {m: "fp8_pc_pt" for m in LINEARS},
               "mixed-fp8-w4a16": {m: ("fp8_pc_pt" if "self_attn" in m else "int4_awq") for m in LINEARS}}
    for fixture, per_layer in formats.items():
        hf, cfg, _ = repack(cli, FIXTURES / fixture, tmp_path / fixture)
        layers = {}
        for m, fmt in sorted(per_layer.items()):
            layers[f"{m}.quantization"] = fmt
            layers[f"{m}.awq_block_size"] = 128 if fmt == "int4_awq" else 0
        want = quant_utils.process_layer_quant_config(layers)
        ours = {k: v for k, v in hf["quantization"].items() if k not in ("exclude_modules", "kv_cache_quant_algo")}
        want = {k: v for k, v in want.items() if k not in ("exclude_modules", "kv_cache_quant_algo")}
        assert ours == want, fixture
        inline = convert_hf_config.convert_hf_quant_config_format(hf)
        assert inline.items() <= cfg["quantization_config"].items(), fixture
