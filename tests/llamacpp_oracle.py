"""llama.cpp's own converter as an oracle for the GGUF target.

`convert_hf_to_gguf.py` from the llama-cpp-python sdist (never copied into this project) is run in a
subprocess on the dequantized dense equivalent of a fixture (`ct-convert repack SRC DENSE --target
dense`); every metadata key/value and every tensor's name, ggml shape, forced type and value hashes
of what it writes are returned, and saved under tests/data/llamacpp/ so that the default suite
compares against llama.cpp without the sdist.

    CT_LLAMA_CPP_SDIST=/tmp/llama-sdist/llama_cpp_python-0.3.36 \\
        .venv/bin/python tests/llamacpp_oracle.py [FIXTURE ...]      # rewrite the expectations

Llama-4's per-expert Linears are fused into transformers' layout first (`fuse_llama4_experts`): llama.cpp
reads no other. What is recorded per tensor: `shape` (ggml ne order), `type` written with `--outtype bf16` (anything but
BF16 there, F32 or F16, is a type llama.cpp forces whatever the file type), `sha256_f32` of the float32 values
written with `--outtype f32`, and `sha256_bf16` of those values rounded to bfloat16 (what a
quantized block, exact in float32, must round to: the compressed-tensors library's own bf16
decompression). Tiny fixture tokenizers are not in llama.cpp's pre-tokenizer table; the converter,
which then refuses, is run with that lookup falling back to "default" (what ct-convert writes for an
unknown fingerprint; "kimi-k2" for the tiktoken fixture, the only name llama.cpp converts a tiktoken
vocabulary for) and the expectation records it as `pre_tokenizer_fallback`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FLOAT_TYPES = {"F32", "F16", "BF16"}
DATA = ROOT / "tests" / "data" / "llamacpp"
SDIST_VERSION = "llama-cpp-python==0.3.36"
LLAMA_CPP_COMMIT = "0c1e5709"  # the llama.cpp tree vendored in that sdist (shared/specs/gguf.md)

# fixture -> (folder under fixtures/, also convert the vision tower with --mmproj, pre-tokenizer name
# the converter falls back to when the tiny tokenizer's fingerprint is unknown)
FIXTURES = {
    "gguf-llama-w4a16": (None, False, "default"),
    # the same model with a fast-only SentencePiece-converted tokenizer.json (gguf-py's LlamaHfVocab)
    "gguf-llama-hftok-w4a16": (None, False, "default"),
    "gguf-qwen2-w4a16": (None, False, "default"),
    "gguf-qwen3-w4a16": (None, False, "default"),
    "qwen3moe-w4a16": ("gguf/qwen3moe-w4a16", False, "default"),
    "deepseek-v3-w4a16": ("gguf/deepseek-v3-w4a16", False, "default"),
    "deepseek-v2-lite-w4a16-g32": ("gguf/deepseek-v2-lite-w4a16-g32", False, "default"),
    # llama.cpp converts a tiktoken vocabulary only for the kimi-k2 pre-tokenizer
    "kimi-k2-w4a16-g32": ("gguf/kimi-k2-w4a16-g32", False, "kimi-k2"),
    "gemma3-text-w4a16-g32": ("gguf/gemma3-text-w4a16-g32", False, "default"),
    "gemma3-vl-w4a16-g32": ("gguf/gemma3-vl-w4a16-g32", True, "default"),
    "glm4moe-mixed-w8a16-w4a16": ("gguf/glm4moe-mixed-w8a16-w4a16", False, "default"),
    "llama4-w4a16": ("gguf/llama4-w4a16", True, "default"),
    "llama4-text-interleaved-w4a16": ("gguf/llama4-text-interleaved-w4a16", False, "default"),
    "mistral3-w4a16": ("gguf/mistral3-w4a16", True, "default"),
    "phi3-w4a16": ("gguf/phi3-w4a16", False, "default"),
}

# Run inside the converter's process: its bundled gguf-py and conversion package, with the BPE
# pre-tokenizer lookup falling back to "default" for fingerprints it does not know.
_BOOTSTRAP = r"""
import json, os, runpy, sys
root, log, fallback = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, root)
from conversion import base
known = base.TextModel.get_vocab_base_pre
def lookup(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        with open(log, "w") as f:
            json.dump({"pre_tokenizer_fallback": fallback}, f)
        return fallback
base.TextModel.get_vocab_base_pre = lookup
sys.argv = [os.path.join(root, "convert_hf_to_gguf.py")] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def sdist_root() -> Path | None:
    """The vendored llama.cpp folder of the unpacked sdist named by CT_LLAMA_CPP_SDIST, if any."""
    top = os.environ.get("CT_LLAMA_CPP_SDIST")
    if not top:
        return None
    for candidate in (Path(top), Path(top) / "vendor" / "llama.cpp"):
        if (candidate / "convert_hf_to_gguf.py").is_file():
            return candidate
    raise FileNotFoundError(f"CT_LLAMA_CPP_SDIST={top}: no convert_hf_to_gguf.py in it or in vendor/llama.cpp")


def fixture_source(name: str) -> Path:
    folder = FIXTURES[name][0]
    if folder is not None:
        return ROOT / "fixtures" / folder
    # the dense architectures are built on the fly by the GGUF fixture script, as the engine test does
    sys.path.insert(0, str(ROOT / "fixtures" / "gguf"))
    from make_gguf_fixtures import build

    out = Path(tempfile.mkdtemp(prefix="ct-oracle-")) / name
    build(name.split("-")[1], "W4A16", str(out))
    if "-hftok-" in name:
        from tiny_tokenizers import sentencepiece_as_tokenizer_json

        for f in ("tokenizer.json", "tokenizer_config.json"):
            (out / f).unlink()
        sentencepiece_as_tokenizer_json(str(out), 320)
    return out


def dense(src: Path, dst: Path) -> None:
    cmd = [sys.executable, "-c", "from ct_convert.cli import main; main()", "repack", str(src), str(dst), "--target", "dense", "--quiet"]
    subprocess.run(cmd, check=True)
    config = json.loads((dst / "config.json").read_text())
    if (config.get("architectures") or [None])[0] in ("Llama4ForConditionalGeneration", "Llama4ForCausalLM"):
        fuse_llama4_experts(dst)


def fuse_llama4_experts(folder: Path) -> None:
    """Per-expert Llama-4 Linears (llm-compressor's layout, what compressed-tensors checkpoints hold)
    as transformers stores them, the only layout llama.cpp's Llama4Model reads:
    `experts.gate_up_proj` [E, hidden, 2·inter] = [gate_e^T | up_e^T] and `experts.down_proj`
    [E, inter, hidden] = down_e^T. The converter transposes and splits them back."""
    import re

    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    per_expert = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name in [n for n in tensors if per_expert.match(n)]:
        prefix, e, proj = per_expert.match(name).groups()
        groups.setdefault(prefix, {})[(int(e), proj)] = tensors.pop(name)
    for prefix, parts in groups.items():
        n = 1 + max(e for e, _ in parts)
        tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")].T, parts[(e, "up")].T], dim=1) for e in range(n)])
        tensors[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")].T for e in range(n)])
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def convert(root: Path, model_dir: Path, out: Path, outtype: str, mmproj: bool = False, fallback: str = "default") -> dict:
    """Run llama.cpp's converter; return what the bootstrap noted (pre-tokenizer fallback)."""
    log = out.with_suffix(".log.json")
    args = [str(model_dir), "--outtype", outtype, "--outfile", str(out)] + (["--mmproj"] if mmproj else [])
    r = subprocess.run([sys.executable, "-c", _BOOTSTRAP, str(root), str(log), fallback, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py {' '.join(args)} failed:\n{r.stderr[-4000:]}")
    return json.loads(log.read_text()) if log.exists() else {}


def _value(field):
    v = field.contents()
    if isinstance(v, float):
        return float(np.float32(v))
    return v


def _type_name(field) -> str:
    import gguf

    names = [gguf.GGUFValueType(t).name for t in field.types]
    return names[0] if len(names) == 1 else f"{names[0]}[{names[-1]}]"


def values_f32(t) -> np.ndarray:
    """float32 values of a GGUF tensor in numpy order (gguf-py's dequantizers; BF16 widened)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    data = np.array(t.data)
    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def sha_f32(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def sha_bf16(a: np.ndarray) -> str:
    """sha256 of the values rounded to bfloat16 (nearest even) and widened back to float32."""
    import torch

    rounded = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).to(torch.float32)
    return sha_f32(rounded.numpy())


def inventory(path: Path) -> dict:
    """Every KV (value and GGUF type) and every tensor (ne shape, type, value hashes) of a GGUF."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {k: {"type": _type_name(f), "value": _value(f)} for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        v = values_f32(t)
        tensors[t.name] = {
            "shape": [int(x) for x in t.shape],
            "type": gguf.GGMLQuantizationType(t.tensor_type).name,
            "sha256_f32": sha_f32(v),
            "sha256_bf16": sha_bf16(v),
        }
    return {"metadata": meta, "tensors": tensors}


def _merge(f32: dict, bf16: dict) -> dict:
    """Values from the f32 run; the type each tensor gets in the bf16 run (F32 = forced by llama.cpp)."""
    out = {"metadata": f32["metadata"], "tensors": {}}
    for name, t in f32["tensors"].items():
        out["tensors"][name] = {**t, "type": bf16["tensors"][name]["type"]}
    for run in (f32, bf16):  # general.file_type depends on --outtype: keep neither
        run["metadata"].pop("general.file_type", None)
    return out


def expectations(name: str, root: Path) -> dict:
    src = fixture_source(name)
    _, mmproj, fallback = FIXTURES[name]
    with tempfile.TemporaryDirectory(prefix="ct-oracle-") as tmp:
        tmp = Path(tmp)
        dense(src, tmp / "dense")
        result = {
            "about": "llama.cpp convert_hf_to_gguf.py on the dense equivalent of the fixture; see tests/llamacpp_oracle.py",
            "llama_cpp": {"sdist": SDIST_VERSION, "commit": LLAMA_CPP_COMMIT},
            "fixture": name,
        }
        runs = {}
        for outtype in ("f32", "bf16"):
            noted = convert(root, tmp / "dense", tmp / f"text-{outtype}.gguf", outtype, fallback=fallback)
            runs[outtype] = inventory(tmp / f"text-{outtype}.gguf")
        result.update(noted)
        result["text"] = _merge(runs["f32"], runs["bf16"])
        if mmproj:
            for outtype in ("f32", "bf16"):
                convert(root, tmp / "dense", tmp / f"mmproj-{outtype}.gguf", outtype, mmproj=True)
                runs[outtype] = inventory(tmp / f"mmproj-{outtype}.gguf")
            result["mmproj"] = _merge(runs["f32"], runs["bf16"])
    return result


def read_ours(path) -> dict:
    """Our GGUF's KVs (as inventory() records them) and its tensors (gguf-py ReaderTensors)."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        meta[k] = {"type": _type_name(f), "value": _value(f)}
    return {"metadata": meta, "tensors": {t.name: t for t in r.tensors}}


def compare_metadata(mine: dict, want: dict, prefix: str = "") -> list[str]:
    """Differences in keys (all but general.*, which hold naming; general.architecture kept), GGUF
    value types and values; only keys starting with `prefix` when given."""

    def keys(m):
        return {k for k in m if k.startswith(prefix) and (not k.startswith("general.") or k == "general.architecture")}

    problems = [f"missing key {k}" for k in sorted(keys(want) - keys(mine))]
    problems += [f"extra key {k}" for k in sorted(keys(mine) - keys(want))]
    for k in sorted(keys(want) & keys(mine)):
        a, b = mine[k], want[k]
        if a["type"] != b["type"]:
            problems.append(f"{k}: type {a['type']}, llama.cpp {b['type']}")
        elif json.loads(json.dumps(a["value"], ensure_ascii=False)) != b["value"]:
            problems.append(f"{k}: {str(a['value'])[:60]!r}, llama.cpp {str(b['value'])[:60]!r}")
    return problems


def compare_tensors(mine: dict, want: dict) -> list[str]:
    """Differences in tensor names, ggml shapes, forced-F32 types and values (see test_gguf_llamacpp)."""
    import gguf

    problems = [f"missing tensor {n}" for n in sorted(set(want) - set(mine))]
    problems += [f"extra tensor {n}" for n in sorted(set(mine) - set(want))]
    for name in sorted(set(want) & set(mine)):
        t, w = mine[name], want[name]
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        shape = [int(x) for x in t.shape]
        if shape != w["shape"]:
            problems.append(f"{name}: shape {shape}, llama.cpp {w['shape']}")
            continue
        if w["type"] != "BF16" and kind != w["type"]:  # a type llama.cpp forces whatever the file type
            problems.append(f"{name}: {kind}, llama.cpp keeps it {w['type']}")
        v = values_f32(t)
        same = sha_f32(v) == w["sha256_f32"] if kind in FLOAT_TYPES else sha_bf16(v) == w["sha256_bf16"]
        if not same:
            problems.append(f"{name}: values differ from llama.cpp's ({kind})")
    return problems


def load(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


def main(argv: list[str]) -> None:
    root = sdist_root()
    if root is None:
        raise SystemExit("set CT_LLAMA_CPP_SDIST to the unpacked llama-cpp-python sdist")
    DATA.mkdir(parents=True, exist_ok=True)
    for name in argv or list(FIXTURES):
        print(f"llama.cpp converter: {name}", flush=True)
        result = expectations(name, root)
        (DATA / f"{name}.json").write_text(json.dumps(result, indent=1, sort_keys=True, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
