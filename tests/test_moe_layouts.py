"""Stacked 3-D expert tensors (compressed-tensors.md §8.5): dim 0 is the expert, each slice packed like 2-D."""

import json

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from safetensors.torch import save_file

from conftest import equal_bits
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve


def test_fused_3d_experts_decode_slice_by_slice(tmp_path):
    e, n, k, gs = 3, 16, 256, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (e, n, k), generator=g, dtype=torch.int8)
    zp = torch.randint(-8, 8, (e, n, k // gs), generator=g, dtype=torch.int8)
    scale = (torch.rand(e, n, k // gs, generator=g) + 0.5).to(torch.bfloat16)
    base = "model.layers.0.mlp.experts.down_proj"
    save_file({
        f"{base}.weight_packed": pack_to_int32(q, 4),
        f"{base}.weight_scale": scale,
        f"{base}.weight_zero_point": pack_to_int32(zp, 4, packed_dim=0),
        f"{base}.weight_shape": torch.tensor([e, n, k]),
        "model.embed_tokens.weight": torch.zeros(8, k, dtype=torch.bfloat16),
    }, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3MoeForCausalLM"], "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0",
                                "config_groups": {"g": {"targets": ["re:.*experts.*"], "weights": {
                                    "num_bits": 4, "symmetric": False, "strategy": "group", "group_size": gs}}}},
    }))
    reader = open_checkpoint(resolve(str(tmp_path)))
    info = reader.modules[base]
    assert info.shape == (e, n, k) and info.format == "pack-quantized"
    got = reader.read(base).dequantize()
    cols = torch.arange(k) // gs
    expected = ((q.float() - zp.float()[..., cols]) * scale.float()[..., cols]).to(torch.bfloat16)
    assert equal_bits(got, expected)
    assert reader.unquantized == ["model.embed_tokens"]
