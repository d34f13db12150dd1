"""GB/s of the GPU repack kernels against the device's own copy bandwidth (issue #15).

    python bench/cuda_kernels.py --source bench/out/src-24-30000 --json kernels.json

For each of dense, awq, gptq and marlin, one large module of the source (Llama-3-8B's MLP gate, 14336 x
4096) is read on the CPU and its packed words and scales moved to the GPU once (what is timed is the
conversion, not PCIe), then the target's `convert` runs `--reps` times between CUDA synchronizations,
each on a fresh view of the module (codes unpacked on the GPU every time). Reported: bytes read + written per call divided by its time, the same for a
device-to-device copy of 1 GiB (read + write), their ratio (target: >= 0.5), and whether the bytes
equal the CPU path's (`convert` on the CPU copy of the module).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve
from ct_convert.targets import writer_for
from ct_convert.targets.writer_base import RepackOptions


def copy_bandwidth(reps: int) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * reps / (time.perf_counter() - t)


def on_device(qw):
    """The module with its packed words and scales already on the GPU: `.to("cuda")` of it is then
    free, and each call's codes are unpacked there again (what a conversion does)."""
    dev = qw.to("cuda")
    dev.packed_stream  # moved once, kept by `dev`
    return dev


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--module", default="model.layers.0.mlp.gate_proj")
    ap.add_argument("--targets", default="dense,awq,gptq,marlin")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_kernels.py: torch sees no CUDA device (run it on the GPU machine)")
    reader = open_checkpoint(resolve(str(args.source), None))
    copy = copy_bandwidth(args.reps)
    rows = [{"run": "device copy (read + write)", "GB_per_s": round(copy / 1e9, 1), "device": torch.cuda.get_device_name()}]
    print(json.dumps(rows[-1]), flush=True)
    for target in args.targets.split(","):
        writer = writer_for(target)
        opts = RepackOptions(target=target, device="cuda")
        cpu_qw = reader.read(args.module)
        expected = writer.convert(cpu_qw, RepackOptions(target=target, device="cpu"))
        qw = on_device(cpu_qw)
        moved_in = nbytes([qw.packed_stream, qw.scale, qw.zero_point, qw.g_idx])
        got = writer.convert(qw.to("cuda"), opts)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.reps):
            got = writer.convert(qw.to("cuda"), opts)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t) / args.reps
        moved = moved_in + nbytes(got.values())
        same = all(torch.equal(got[k].cpu().contiguous().view(torch.uint8), expected[k].contiguous().view(torch.uint8)) for k in expected)
        rows.append({"run": f"{target} convert", "module": args.module, "ms": round(seconds * 1e3, 3),
                     "GB_per_s": round(moved / seconds / 1e9, 1), "of_copy_bandwidth": round(moved / seconds / copy, 2),
                     "bytes_equal_cpu": same})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
