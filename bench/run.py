"""Benchmark ct-convert against `cp -r` and compressed-tensors' own decompression.

    python bench/run.py --verify    # 24 Llama-3-8B layers, 30000-token vocabulary: 3.2 GB in 3 shards
    python bench/run.py --layers 4 --vocab 128256 --targets gguf,dense   # Llama-3's 1 GB embedding
    python bench/run.py --workers 1,2,4,8,16 --targets gptq,gguf --skip-library   # scaling with cores
    python bench/run.py --device cuda --targets dense,awq,gptq,marlin --skip-library   # GPU repack
    python bench/run.py --experts 128 --layers 4 --targets gguf,mlx,gptq --skip-baselines   # MoE: 128 experts a layer

Reports, per target (and per worker count with --workers): wall time, start-up (interpreter and the
imports a repack makes, measured alone: median of three), work time (wall minus start-up), input
GB/s of the work time, the ratio of work time to `cp -r` of the same checkpoint (median of three
copies), and the peak RSS of the process; for the dense target the same for the library's own
dequantizer (`compressed_tensors.entrypoints.convert.convert_checkpoint` with
`CompressedTensorsDequantizer`), and the time of writing the dense bytes alone. Run on a warm page
cache: each input is read once first, and every timed command starts after the previous output is
deleted and synced (and after --settle seconds). llama.cpp's own route to Q4_0 is bench/llamacpp_route.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import LLAMA3_8B, QWEN3_30B_A3B, build, build_moe  # noqa: E402

MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)
"""

LIBRARY_DEQUANT = """
import sys
from compressed_tensors.entrypoints.convert import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer
convert_checkpoint(sys.argv[1], sys.argv[2], CompressedTensorsDequantizer(sys.argv[1]))
"""

# what a repack imports before it reads anything (the CLI, torch, the target's writer and reader),
# then the way the command leaves (cli.console_script: exit handlers, no interpreter teardown)
STARTUP = """
import atexit, os, sys
import ct_convert.cli
from ct_convert.targets import _module, spec
_module(spec(sys.argv[1]), "writer"), _module(spec(sys.argv[1]), "reader")
atexit._run_exitfuncs()
os._exit(0)
"""

LIBRARY_STARTUP = """
from compressed_tensors.entrypoints.convert import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer
"""

WRITE_BYTES = """
import os, sys
n, path = int(sys.argv[1]), sys.argv[2]
chunk = os.urandom(1 << 24)
with open(path, "wb") as f:
    left = n
    while left > 0:
        f.write(chunk[: min(left, len(chunk))])
        left -= len(chunk)
"""


def measure(cmd: list[str]) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    seconds, rss, rc = out.stdout.split()[-3:]
    if rc != "0":
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n{out.stderr}")
    return float(seconds), int(rss)


def warm(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return total


def startup(target: str | None) -> float:
    """Interpreter and import time of a repack to `target` (None: of the library's dequantizer): the
    median of three runs."""
    cmd = [sys.executable, "-c", STARTUP, target] if target else [sys.executable, "-c", LIBRARY_STARTUP]
    return sorted(measure(cmd)[0] for _ in range(3))[1]


def fingerprint(out: Path) -> str | None:
    """A digest of the output's files (sha256 and size of each, from its manifest): equal digests, equal bytes."""
    manifest = out / "ct-convert.json"
    if not manifest.exists():
        return None
    files = json.loads(manifest.read_text())["files"]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def free_page_reporting() -> str:
    """Whether this (virtual) machine hands freed memory back to its host: with virtio-balloon free page
    reporting on, memory freed and left idle for some seconds is slow to touch again (the host faults it
    back in), so a run's time depends on how long its memory sat free before it: see --settle."""
    p = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    if not p.exists():
        return "absent"
    return "off" if int(p.read_text()) > 10 else "on"  # an order above the largest (10) reports nothing


def check_cuda() -> None:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
    if subprocess.run([sys.executable, "-c", probe]).returncode != 0:
        raise SystemExit("--device cuda: torch sees no CUDA device here (a CPU-only torch, or no GPU); "
                         "run on a GPU machine with a CUDA build of torch (bench/gpu_scaling.sh)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", "--embedding-rows", type=int, default=30000,
                    help="rows of the embedding and lm_head: 30000 keeps every tensor under 256 MB, Llama-3's "
                         "128256 makes each a 1 GB carried tensor")
    ap.add_argument("--experts", type=int, default=0,
                    help="a Qwen3-30B-A3B-shaped MoE source with this many experts per layer (128 in the real model) "
                         "instead of the Llama-3-8B-shaped one; --layers and --vocab apply (--vocab 151936 is its own)")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--targets", default="dense,awq,gptq,marlin")
    ap.add_argument("--verify", action="store_true", help="also time the default repack with verification")
    ap.add_argument("--workers", default="", help="comma-separated --workers values to run each target with "
                                                  "(default: ct-convert's own, one per core)")
    ap.add_argument("--device", default=None, help="pass --device to ct-convert (cuda: fails at once without CUDA)")
    ap.add_argument("--skip-library", action="store_true")
    ap.add_argument("--skip-baselines", action="store_true", help="no dense-bytes write and no library run")
    ap.add_argument("--keep", action="store_true", help="keep the last output of each run (for byte comparisons)")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait before each timed command (cp included) after deleting the previous "
                         "output and syncing, so every command starts from the same memory state (30: freed "
                         "memory cold on a machine with free page reporting on)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    if args.device == "cuda":
        check_cuda()

    work = args.work
    src = work / (f"src-moe{args.experts}-{args.layers}-{args.vocab}" if args.experts else f"src-{args.layers}-{args.vocab}")
    if not (src / "config.json").exists():
        if args.experts:
            print(f"building a {args.layers}-layer Qwen3-30B-A3B-shaped W4A16 checkpoint, {args.experts} experts a layer, in {src} ...", flush=True)
            build_moe(src, **dict(QWEN3_30B_A3B, layers=args.layers, vocab=args.vocab, experts=args.experts))
        else:
            print(f"building a {args.layers}-layer Llama-3-8B-shaped W4A16 checkpoint in {src} ...", flush=True)
            build(src, **dict(LLAMA3_8B, layers=args.layers, vocab=args.vocab))
    size = warm(src)
    ct = [str(Path(sys.executable).parent / "ct-convert")]
    rows = []

    def run(label: str, cmd: list[str], out: Path | None, start: float = 0.0, **extra):
        if out is not None and out.exists():
            shutil.rmtree(out)
        os.sync()  # the previous run's dirty pages would otherwise be written back during this one
        time.sleep(args.settle)
        seconds, rss = measure(cmd)
        work_s = seconds - start
        rows.append({"run": label, "seconds": round(seconds, 2), "startup_s": round(start, 2), "work_s": round(work_s, 2),
                     "input_GB_per_s": round(size / work_s / 1e9, 2), "work_ratio_to_cp": round(work_s / cp_seconds, 2),
                     "peak_rss_MB": round(rss / 1e6), **extra})
        if out is not None:
            rows[-1]["output"] = fingerprint(out)
        print(json.dumps(rows[-1]), flush=True)
        if out is not None and not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    cp_out = work / "cp"
    cp_runs = []
    for _ in range(3):  # an in-kernel copy varies run to run: take the median of three
        shutil.rmtree(cp_out, ignore_errors=True)
        os.sync()
        time.sleep(args.settle)
        cp_runs.append(measure(["cp", "-r", str(src), str(cp_out)])[0])
    shutil.rmtree(cp_out)
    cp_seconds = sorted(cp_runs)[1]
    print(json.dumps({"checkpoint_GB": round(size / 1e9, 3), "cp_seconds": round(cp_seconds, 2),
                      "cp_runs": [round(x, 2) for x in cp_runs], "cores": os.cpu_count(),
                      "free_page_reporting": free_page_reporting(), "settle_s": args.settle}), flush=True)
    device = ["--device", args.device] if args.device else []
    for target in args.targets.split(","):
        start = startup(target)
        for workers in args.workers.split(",") if args.workers else [None]:
            opts = [*device, *(["--workers", workers] if workers else [])]
            tag = "".join(f" {o}" for o in opts)
            out = work / f"out-{target}{'-w' + workers if workers else ''}"
            run(f"ct-convert {target}{tag} --no-verify", [*ct, "repack", str(src), str(out), "--target", target, "--no-verify", "-q", *opts],
                out, start, workers=workers)
            if args.verify:
                run(f"ct-convert {target}{tag} (verified)", [*ct, "repack", str(src), str(out), "--target", target, "-q", *opts],
                    out, start, workers=workers)
    if not args.skip_baselines:
        dense_out = work / "dense-size"
        subprocess.run([*ct, "repack", str(src), str(dense_out), "--target", "dense", "--no-verify", "-q"], check=True)
        dense_bytes = sum(p.stat().st_size for p in dense_out.glob("*.safetensors"))
        shutil.rmtree(dense_out)
        blob = work / "dense.bin"
        run("write the dense bytes (baseline)", [sys.executable, "-c", WRITE_BYTES, str(dense_bytes), str(blob)], None,
            dense_bytes=dense_bytes)
        blob.unlink(missing_ok=True)
        if not args.skip_library:
            lib_out = work / "out-library"
            run("compressed-tensors dequantizer", [sys.executable, "-c", LIBRARY_DEQUANT, str(src), str(lib_out)], lib_out,
                startup(None))
    if args.json:
        args.json.write_text(json.dumps({"checkpoint_bytes": size, "cp_seconds": cp_seconds, "settle_s": args.settle,
                                         "free_page_reporting": free_page_reporting(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
