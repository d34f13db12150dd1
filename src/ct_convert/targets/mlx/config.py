"""config.json as mlx-lm reads it (writer side): the `quantization` block that `mlx_lm.convert`
writes (mirrored as `quantization_config`), and the pre-transformers-5 keys mlx-lm's model classes
read.

transformers >= 5 saves `rope_parameters` instead of `rope_theta` / `rope_scaling`, and
`num_local_experts` instead of Qwen-MoE's `num_experts`. Several mlx-lm 0.32 classes read only the
old keys and either fail (qwen3_moe: `rope_theta`, `num_experts` required) or silently fall back to
a default (llama: rope_theta 10000), so the old keys are added from the new ones when missing.
"""

from __future__ import annotations

import json
from collections import Counter

from ct_convert.targets.mlx.encode import Params


def quantization_block(converted: dict[str, Params], kept_float: list[str]) -> dict | None:
    """Global group_size/bits/mode (the most common), an entry for every layer that differs, and
    `false` for every linear layer kept in float; None when nothing is quantized."""
    if not converted:
        return None
    counts = Counter(converted.values())
    top = max(counts, key=lambda p: (counts[p], p.bits, p.group_size, p.mode))
    block: dict = top.as_json()
    for path, p in sorted(converted.items()):
        if p != top:
            block[path] = p.as_json()
    for path in sorted(kept_float):
        block[path] = False
    return block


def legacy_keys(config: dict) -> list[str]:
    """Add the keys mlx-lm reads where only their transformers-5 forms exist; returns what was added."""
    added = []
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        full, local = rope.get("full_attention"), rope.get("sliding_attention")
        if isinstance(full, dict):  # per layer type (Gemma 3)
            if isinstance(local, dict) and "rope_local_base_freq" not in config and "rope_theta" in local:
                config["rope_local_base_freq"] = local["rope_theta"]
                added.append("rope_local_base_freq (from rope_parameters)")
            rope = full
        for key in ("rope_theta", "partial_rotary_factor"):
            if key not in config and key in rope:
                config[key] = rope[key]
                added.append(f"{key} (from rope_parameters)")
        if "rope_scaling" not in config:  # glm4_moe requires the key; null means none
            scaled = rope.get("rope_type", "default") != "default"
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} if scaled else None
            added.append("rope_scaling (from rope_parameters)")
    if config.get("model_type") in ("qwen3_moe", "qwen2_moe") and "num_experts" not in config and "num_local_experts" in config:
        config["num_experts"] = config["num_local_experts"]
        added.append("num_experts (from num_local_experts)")
    return added


def mlx_config(source: dict, block: dict | None, dtype_name: str | None) -> tuple[dict, list[str]]:
    config = json.loads(json.dumps(source))
    config.pop("compression_config", None)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    if block is not None:
        config["quantization"] = block
        config["quantization_config"] = block  # mlx_lm.convert mirrors it (mlx-lm #957)
    if dtype_name is not None:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name
    return config, legacy_keys(config)
