"""Facts of TensorRT-LLM's legacy checkpoint that the writer and the reader share (targets.md §4):
names and tensor-parallel splits of the Llama-family layers, and the mixed-GEMM layout's tables."""

from __future__ import annotations

import re

from ct_convert.bitpack import INTERLEAVE

SM_METADATA_KEY = "ct_convert.sm"  # safetensors __metadata__ key: the GPU layout a rank file holds

COLUMN, ROW = "column", "row"  # tensor parallelism: split along N, or along K

# HF projection -> (TensorRT-LLM linear, parallelism). Note gate_proj -> mlp.fc, up_proj -> mlp.gate;
# the projections of one linear are fused along N in this order.
PROJECTIONS = {
    "self_attn.q_proj": ("attention.qkv", COLUMN),
    "self_attn.k_proj": ("attention.qkv", COLUMN),
    "self_attn.v_proj": ("attention.qkv", COLUMN),
    "self_attn.o_proj": ("attention.dense", ROW),
    "mlp.gate_proj": ("mlp.fc", COLUMN),
    "mlp.up_proj": ("mlp.gate", COLUMN),
    "mlp.down_proj": ("mlp.proj", ROW),
}
LINEAR_ORDER = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")
NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_layernorm"}
TOP_LEVEL = {
    "model.embed_tokens.weight": "transformer.vocab_embedding.weight",
    "model.norm.weight": "transformer.ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}
PROJECTION = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")
NORM = re.compile(r"^model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight$")


def fused_index(projection: str) -> int:
    """Position of an HF projection among those fused into its linear (q 0, k 1, v 2)."""
    linear = PROJECTIONS[projection][0]
    return [p for p, (t, _) in PROJECTIONS.items() if t == linear].index(projection)


# CUTLASS mixed-GEMM layout (§4.7): rows of each 16/32-row block are interleaved in this order
ROW_PERMUTATION = {
    8: (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15),
    4: (0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27,
        4, 5, 12, 13, 20, 21, 28, 29, 6, 7, 14, 15, 22, 23, 30, 31),
}  # fmt: skip
# inside each 32-bit register: output slot t holds input element REGISTER_ORDER[t]
REGISTER_ORDER = INTERLEAVE
K_TILE = 64  # ThreadblockK for 16-bit activations
