"""Facts of the ModelOpt unified HF checkpoint, as NVIDIA's exporter writes it and TensorRT-LLM's
PyTorch backend reads it (sources: NOTES / README "TensorRT-LLM"): file names, `quant_algo` values,
tensor names and dtypes per algorithm, and which modules TensorRT-LLM fuses at load time.

Tensor names are the Hugging Face module names plus a suffix; per quantized linear:

| quant_algo | `weight` | `weight_scale` | other |
|---|---|---|---|
| W4A16_AWQ | U8 [N/2, K]: rows 2j, 2j+1 in the low, high nibble (signed int4) | model dtype [N, K/g] | `pre_quant_scale` [K] |
| W8A16 | I8 [N, K] | model dtype [N] | |
| FP8 | F8_E4M3 [N, K] | F32 [] | `input_scale` F32 [] (static activations) |
| FP8_PER_CHANNEL_PER_TOKEN | F8_E4M3 [N, K] | F32 [N] | |
| FP8_BLOCK_SCALES | F8_E4M3 [N, K] | F32 [ceil(N/128), ceil(K/128)] | |
| NVFP4, W4A16_NVFP4 | U8 [N, K/2]: columns 2j, 2j+1 in the low, high nibble (E2M1) | F8_E4M3 [N, K/16] | `weight_scale_2` F32 [], NVFP4 also `input_scale` F32 [] |
| W4A16_MXFP4 | U8 [N, K/2] as NVFP4 | U8 (E8M0) [N, K/32] | |

Stacked expert tensors keep their leading dimension in front of every shape above.
"""

from __future__ import annotations

HF_QUANT_CONFIG = "hf_quant_config.json"
QUANT_METHOD = "modelopt"  # config.json quantization_config.quant_method
PRODUCER = "modelopt"  # hf_quant_config.json producer.name, what TensorRT-LLM and vLLM key on
FORMAT_VERSION = "0.47.0"  # the nvidia-modelopt release whose export this layout follows

W4A16_AWQ = "W4A16_AWQ"
W8A16 = "W8A16"
FP8 = "FP8"
FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
NVFP4 = "NVFP4"
W4A16_NVFP4 = "W4A16_NVFP4"
W4A16_MXFP4 = "W4A16_MXFP4"
MIXED_PRECISION = "MIXED_PRECISION"
KV_CACHE_FP8 = "FP8"

INT4_GROUP_SIZES = (64, 128)  # TensorRT-LLM's fine-grained fpA_intB kernels run no other
NVFP4_GROUP = 16
MXFP4_GROUP = 32
FP8_BLOCK = 128

# The algorithms whose hf_quant_config entries carry a group size.
GROUPED = (W4A16_AWQ, NVFP4, W4A16_NVFP4, W4A16_MXFP4, FP8_BLOCK_SCALES)
# What each algorithm stores besides `weight` (and `bias`).
SCALES = {
    W4A16_AWQ: ("weight_scale", "pre_quant_scale"),
    W8A16: ("weight_scale",),
    FP8: ("weight_scale", "input_scale"),
    FP8_PER_CHANNEL_PER_TOKEN: ("weight_scale",),
    FP8_BLOCK_SCALES: ("weight_scale",),
    NVFP4: ("weight_scale", "weight_scale_2", "input_scale"),
    W4A16_NVFP4: ("weight_scale", "weight_scale_2"),
    W4A16_MXFP4: ("weight_scale",),
}


def layer_config(quant_algo: str, group_size: int | None) -> dict:
    """One module's entry in `quantized_layers` (and the `quantization` block when all agree)."""
    entry: dict = {"quant_algo": quant_algo}
    if quant_algo in GROUPED:
        entry["group_size"] = group_size
    if quant_algo == W4A16_AWQ:
        entry.update(has_zero_point=False, pre_quant_scale=True)
    return entry


# FP8 KV cache: compressed-tensors `<attn>.k_scale` is ModelOpt's `<attn>.k_proj.k_scale` (ModelOpt
# renames the attention module's k/v bmm quantizers so, whatever the projections are called).
KV_SCALE_NAMES = {"k_scale": "k_proj.k_scale", "v_scale": "v_proj.v_scale"}

# Sibling projections TensorRT-LLM loads into one fused linear (q/k/v, gate/up, an expert's w1/w3,
# MLA's q_a/kv_a): they must share one quantization, and NVFP4 ones one weight_scale_2 and input_scale.
FUSED_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)
