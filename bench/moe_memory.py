"""Peak memory of `--target gguf` on a Kimi-K2-shaped checkpoint with many experts per layer.

    python bench/moe_memory.py /work/tmp-ds/moe --experts 384 --moe-layers 4 --hidden 2048 --moe-inter 512

Synthesizes a DeepseekV3ForCausalLM (`model_type: kimi_k2`) W4A16 checkpoint (int4 symmetric group
32 `pack-quantized` routed experts, as Kimi-K2-Thinking ships them; attention, shared experts and the
dense first layer unquantized, as its ignore list has them; MLA, router bias, YaRN) and writes its
safetensors shards by hand, one tensor at a time: the generator keeps a few expert templates and
the shard headers, never a shard. Then runs `ct-convert repack SRC OUT --target gguf --max-shard-size
…` in a child process and reports its wall time and peak RSS (`getrusage(RUSAGE_CHILDREN)`), the
source and output sizes, and the number of output parts. The page cache is whatever the generator
left warm. Delete SRC and OUT afterwards (`--clean`).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TEMPLATES = 8  # distinct random expert modules, cycled: enough that no two neighbours share bytes


def _int4_module(rng: np.random.Generator, n: int, k: int) -> dict[str, tuple[str, list[int], bytes]]:
    """compressed-tensors pack-quantized int4 group 32: int32 words of eight 4-bit codes (offset
    binary, LSB first), bf16 scales (fp16-exact: at most 7 mantissa bits, well inside fp16's range)."""
    scale = (rng.random((n, k // 32), dtype=np.float32) * 0.02 + 0.001).view(np.uint32) >> 16
    return {
        "weight_packed": ("I32", [n, k // 8], rng.integers(0, 2**32, (n, k // 8), dtype=np.uint32).tobytes()),
        "weight_scale": ("BF16", [n, k // 32], scale.astype(np.uint16).tobytes()),
        "weight_shape": ("I64", [2], np.array([n, k], dtype=np.int64).tobytes()),
    }


def _bf16(rng: np.random.Generator, *shape: int, scale: float = 0.02) -> tuple[str, list[int], bytes]:
    v = (rng.standard_normal(shape, dtype=np.float32) * scale).view(np.uint32) >> 16
    return ("BF16", list(shape), v.astype(np.uint16).tobytes())


def _ones(*shape: int) -> tuple[str, list[int], bytes]:
    return ("BF16", list(shape), np.full(shape, 0x3F80, dtype=np.uint16).tobytes())


class _Shard:
    """A safetensors file written from (name, dtype, shape, bytes-maker) entries, bytes made one at a time."""

    def __init__(self):
        self.entries: list[tuple[str, str, list[int], int, object]] = []

    def add(self, name: str, dtype: str, shape: list[int], nbytes: int, make) -> None:
        self.entries.append((name, dtype, shape, nbytes, make))

    def write(self, path: Path) -> int:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, nbytes, _ in self.entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for _, _, _, nbytes, make in self.entries:
                data = make()
                assert len(data) == nbytes
                f.write(data)
        return 8 + len(raw) + offset


def synthesize(out: Path, *, experts: int, moe_layers: int, hidden: int, moe_inter: int, heads: int = 8,
               kv_lora: int = 512, q_lora: int = 768, vocab: int = 4096, seed: int = 0) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    nope, rope, v_dim = 128, 64, 128
    layers = 1 + moe_layers
    templates = {proj: [_int4_module(rng, *shape) for _ in range(TEMPLATES)]
                 for proj, shape in (("gate_proj", (moe_inter, hidden)), ("up_proj", (moe_inter, hidden)), ("down_proj", (hidden, moe_inter)))}
    weight_map, total = {}, 0

    def dense(shard: _Shard, name: str, make_shape: tuple[int, ...], norm: bool = False) -> None:
        n = 2 * int(np.prod(make_shape))
        shard.add(name, "BF16", list(make_shape), n, (lambda s=make_shape: _ones(*s)[2]) if norm else (lambda s=make_shape: _bf16(rng, *s)[2]))

    for layer in range(-1, layers):
        shard, fname = _Shard(), f"model-{layer + 2:05d}-of-{layers + 1:05d}.safetensors"
        if layer == -1:  # embeddings, final norm, head
            dense(shard, "model.embed_tokens.weight", (vocab, hidden))
            dense(shard, "model.norm.weight", (hidden,), norm=True)
            dense(shard, "lm_head.weight", (vocab, hidden))
        else:
            p = f"model.layers.{layer}."
            dense(shard, p + "input_layernorm.weight", (hidden,), norm=True)
            dense(shard, p + "post_attention_layernorm.weight", (hidden,), norm=True)
            dense(shard, p + "self_attn.q_a_proj.weight", (q_lora, hidden))
            dense(shard, p + "self_attn.q_a_layernorm.weight", (q_lora,), norm=True)
            dense(shard, p + "self_attn.q_b_proj.weight", (heads * (nope + rope), q_lora))
            dense(shard, p + "self_attn.kv_a_proj_with_mqa.weight", (kv_lora + rope, hidden))
            dense(shard, p + "self_attn.kv_a_layernorm.weight", (kv_lora,), norm=True)
            dense(shard, p + "self_attn.kv_b_proj.weight", (heads * (nope + v_dim), kv_lora))
            dense(shard, p + "self_attn.o_proj.weight", (hidden, heads * v_dim))
            if layer == 0:
                for proj, shape in (("gate_proj", (4 * hidden, hidden)), ("up_proj", (4 * hidden, hidden)), ("down_proj", (hidden, 4 * hidden))):
                    dense(shard, f"{p}mlp.{proj}.weight", shape)
            else:
                dense(shard, p + "mlp.gate.weight", (experts, hidden))
                shard.add(p + "mlp.gate.e_score_correction_bias", "F32", [experts], 4 * experts,
                          lambda: (rng.standard_normal(experts, dtype=np.float32) * 0.01).tobytes())
                for proj, shape in (("gate_proj", (moe_inter, hidden)), ("up_proj", (moe_inter, hidden)), ("down_proj", (hidden, moe_inter))):
                    dense(shard, f"{p}mlp.shared_experts.{proj}.weight", shape)
                for e in range(experts):
                    for proj in ("gate_proj", "up_proj", "down_proj"):
                        for part, (dtype, shape, data) in templates[proj][(e + layer) % TEMPLATES].items():
                            shard.add(f"{p}mlp.experts.{e}.{proj}.{part}", dtype, shape, len(data), lambda d=data: d)
        total += shard.write(out / fname)
        weight_map.update((name, fname) for name, *_ in shard.entries)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(_config(experts, layers, hidden, moe_inter, heads, kv_lora, q_lora, vocab, nope, rope, v_dim), indent=1))
    return total


def _config(experts, layers, hidden, moe_inter, heads, kv_lora, q_lora, vocab, nope, rope, v_dim) -> dict:
    ignore = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.gate$", "re:model\\.layers\\.0\\.mlp\\..*"]
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 4 * hidden, "moe_intermediate_size": moe_inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "n_routed_experts": experts, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.827, "q_lora_rank": q_lora, "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v_dim,
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "tie_word_embeddings": False, "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}}},
            "ignore": ignore,
        },
    }


def measure(cmd: list[str]) -> tuple[float, int, int]:
    """(seconds, peak RSS bytes, exit code) of a child process."""
    t = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="folder for the synthetic checkpoint (outside the repository)")
    ap.add_argument("--out", type=Path, help="GGUF output folder (default: SRC-gguf)")
    ap.add_argument("--experts", type=int, default=384)
    ap.add_argument("--moe-layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--moe-inter", type=int, default=512)
    ap.add_argument("--max-shard-size", default="1GB")
    ap.add_argument("--no-verify", action="store_true", help="skip the verification repack runs after writing")
    ap.add_argument("--clean", action="store_true", help="delete SRC and OUT afterwards")
    args = ap.parse_args()
    out = args.out or args.src.with_name(args.src.name + "-gguf")
    if out.exists():
        shutil.rmtree(out)
    t = time.perf_counter()
    size = synthesize(args.src, experts=args.experts, moe_layers=args.moe_layers, hidden=args.hidden, moe_inter=args.moe_inter)
    made = time.perf_counter() - t
    gen_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    expert_bytes = 3 * (args.moe_inter * args.hidden // 2 + args.moe_inter * args.hidden // 16)
    cmd = [sys.executable, "-c", "from ct_convert.cli import main; main()", "repack", str(args.src), str(out), "--target", "gguf",
           "--max-shard-size", args.max_shard_size, "--quiet", *(["--no-verify"] if args.no_verify else [])]
    seconds, peak, rc = measure(cmd)
    parts = sorted(out.glob("*.gguf")) if out.exists() else []
    report = {
        "source_bytes": size, "generate_seconds": round(made, 1), "generator_peak_rss": gen_rss,
        "experts_per_layer": args.experts, "moe_layers": args.moe_layers,
        "one_layer_experts_bytes": args.experts * expert_bytes, "one_expert_bytes": expert_bytes,
        "repack_exit": rc, "repack_seconds": round(seconds, 1), "repack_peak_rss": peak,
        "output_bytes": sum(p.stat().st_size for p in parts), "output_parts": len(parts), "verified": not args.no_verify,
    }
    print(json.dumps(report, indent=1))
    if args.clean:
        shutil.rmtree(args.src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
