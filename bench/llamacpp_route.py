"""llama.cpp's own route to a Q4_0 GGUF, timed beside ct-convert's on the same checkpoint.

    python bench/llamacpp_route.py                  # the 24-layer, 3.2 GB checkpoint of bench/run.py
    python bench/llamacpp_route.py --layers 4       # quicker

llama.cpp's route is `convert_hf_to_gguf.py` (which dequantizes compressed-tensors itself) to a BF16
GGUF, then `llama-quantize … Q4_0`. Both come from the `llama-cpp-python` sdist on the package index:
this script downloads it, builds `llama-quantize` with CMake and makes a venv for the converter (it
needs transformers and sentencepiece), all under `--cache` (outside the repository, reused). Nothing of
llama.cpp is kept in this project.

The converter needs a vocabulary, so the checkpoint gets a tiny SentencePiece `tokenizer.model`
(trained here); both tools read the same folder. Reported: wall time and peak RSS of each step and of
ct-convert (`--target gguf`, with and without verification; its start-up, measured alone, beside), and how many Q4_0 blocks of the two
GGUFs are byte-identical (re-quantization picks its own scales, so most are not; ct-convert's are the
source's codes and scales, which `verify` checks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import measure, startup, warm  # noqa: E402
from synth import LLAMA3_8B, build  # noqa: E402

SDIST = "llama-cpp-python==0.3.36"
CONVERTER_PACKAGES = ["torch==2.13.0", "transformers==5.18.0", "sentencepiece==0.2.2", "numpy", "safetensors", "protobuf"]

TRAIN_SP = """
import io, sys, sentencepiece as spm
text = " ".join(f"token{i} word{i % 97} part{i % 31}" for i in range(4000))
buf = io.BytesIO()
spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split(" ")), model_writer=buf, vocab_size=256,
                               model_type="bpe", character_coverage=1.0)
open(sys.argv[1], "wb").write(buf.getvalue())
"""


def sh(cmd: list[str], **kw) -> None:
    subprocess.run(cmd, check=True, **kw)


def llama_cpp_tree(cache: Path) -> Path:
    tree = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if not tree.is_dir():
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(cache)])
        with tarfile.open(cache / "llama_cpp_python-0.3.36.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    return tree


def llama_quantize(cache: Path, tree: Path) -> Path:
    build_dir = cache / "llama-build"
    exe = build_dir / "bin" / "llama-quantize"
    if not exe.exists():
        sh(["cmake", "-S", str(tree), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"])
        sh(["cmake", "--build", str(build_dir), "--target", "llama-quantize", f"-j{os.cpu_count() or 1}"])
    return exe


def converter_python(cache: Path) -> Path:
    venv = cache / "venv-llamacpp"
    py = venv / "bin" / "python"
    if not (venv / ".ok").exists():
        sh([sys.executable, "-m", "venv", str(venv)])
        sh([str(py), "-m", "pip", "install", "-q", CONVERTER_PACKAGES[0]])  # the CPU wheel first: no CUDA build
        sh([str(py), "-m", "pip", "install", "-q", *CONVERTER_PACKAGES[1:]])
        (venv / ".ok").touch()
    return py


def source_with_vocab(synth_src: Path, folder: Path, py: Path) -> Path:
    """The synthetic checkpoint's files hard-linked into `folder`, plus a SentencePiece tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in synth_src.iterdir():
        dst = folder / f.name
        if not dst.exists():
            os.link(f, dst)
    if not (folder / "tokenizer.model").exists():
        sh([str(py), "-c", TRAIN_SP, str(folder / "tokenizer.model")], capture_output=True)
    return folder


def q4_0_blocks(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: np.asarray(t.data).reshape(-1, 18) for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=30000)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ct-convert-bench")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    tree = llama_cpp_tree(args.cache)
    quantize = llama_quantize(args.cache, tree)
    py = converter_python(args.cache)
    synth_src = args.work / f"src-{args.layers}-{args.vocab}"
    if not (synth_src / "config.json").exists():
        build(synth_src, **dict(LLAMA3_8B, layers=args.layers, vocab=args.vocab))
    src = source_with_vocab(synth_src, args.work / f"src-{args.layers}-{args.vocab}-vocab", py)
    size = warm(src)
    rows = []

    def run(label: str, cmd: list[str]) -> float:
        seconds, rss = measure(cmd)
        rows.append({"run": label, "seconds": round(seconds, 2), "peak_rss_MB": round(rss / 1e6)})
        print(json.dumps(rows[-1]), flush=True)
        return seconds

    bf16, q4 = args.work / "llamacpp-bf16.gguf", args.work / "llamacpp-q4_0.gguf"
    t1 = run("llama.cpp convert_hf_to_gguf.py --outtype bf16",
             [str(py), str(tree / "convert_hf_to_gguf.py"), str(src), "--outtype", "bf16", "--outfile", str(bf16)])
    t2 = run("llama.cpp llama-quantize Q4_0", [str(quantize), str(bf16), str(q4), "Q4_0"])
    rows.append({"run": "llama.cpp route total", "seconds": round(t1 + t2, 2)})
    print(json.dumps(rows[-1]), flush=True)
    bf16.unlink()

    ct = str(Path(sys.executable).parent / "ct-convert")
    ours = args.work / "ct-gguf"
    start = startup("gguf")
    for label, extra in (("ct-convert gguf --no-verify", ["--no-verify"]), ("ct-convert gguf (verified)", [])):
        shutil.rmtree(ours, ignore_errors=True)
        t = run(label, [ct, "repack", str(src), str(ours), "--target", "gguf", "-q", *extra])
        rows[-1].update(speedup_vs_llama_cpp=round((t1 + t2) / t, 2), startup_s=round(start, 2), work_s=round(t - start, 2))
        print(json.dumps({k: rows[-1][k] for k in ("run", "speedup_vs_llama_cpp", "startup_s", "work_s")}), flush=True)

    theirs_blocks, our_blocks = q4_0_blocks(q4), q4_0_blocks(ours / "model.gguf")
    common = sorted(set(theirs_blocks) & set(our_blocks))
    equal = sum(int((theirs_blocks[n] == our_blocks[n]).all(axis=1).sum()) for n in common)
    total = sum(len(our_blocks[n]) for n in common)
    result = {"checkpoint_GB": round(size / 1e9, 3), "q4_0_tensors_compared": len(common),
              "q4_0_blocks_equal": equal, "q4_0_blocks": total}
    print(json.dumps(result), flush=True)
    q4.unlink()
    if args.json:
        args.json.write_text(json.dumps({**result, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
