"""CPU time of verification's code-domain comparison, per target, on a small bench source.

    python bench/compare_codes.py --work /tmp/cc                      # 2 Llama-3-8B layers (0.68 GB)
    PYTHONPATH=/path/to/other/src python bench/compare_codes.py --work /tmp/cc   # another commit's readers

Builds the source (bench/synth.py) and each target's output (`repack --no-verify`) once under --work,
then, in one process on one thread, reports per target the best of --repeat passes over the quantized
modules of reading the source, decoding the output (`decode`) and `same_codes`, in CPU seconds, and
one whole `compare` (carried tensors included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import LLAMA3_8B, build  # noqa: E402

from ct_convert.readers.checkpoint import open_checkpoint  # noqa: E402
from ct_convert.source import resolve  # noqa: E402
from ct_convert.targets import open_output  # noqa: E402
from ct_convert.verify import compare, same_codes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--targets", default="awq,marlin,trtllm,gptq")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = args.work / f"src-{args.layers}"
    if not (src / "config.json").exists():
        build(src, **dict(LLAMA3_8B, layers=args.layers, vocab=30000))
    ct = str(Path(sys.executable).parent / "ct-convert")
    for target in args.targets.split(","):
        out = args.work / f"out-{args.layers}-{target}"
        if not out.exists():
            subprocess.run([ct, "repack", str(src), str(out), "--target", target, "--no-verify", "-q"], check=True)
        reader, decoder = open_checkpoint(resolve(str(src), None)), open_output(out)
        modules = [m for m, info in reader.modules.items() if info.is_quantized]
        best = [float("inf")] * 3
        for _ in range(args.repeat):
            spent = [0.0] * 3
            for m in modules:
                t0 = time.process_time()
                source = reader.read(m)
                packed = source.packed_stream
                source._packed = lambda p=packed: p  # read once, here
                t1 = time.process_time()
                decoded = decoder.decode(m)
                t2 = time.process_time()
                if not same_codes(source, decoded):
                    raise SystemExit(f"{target}: {m} not equal in the code domain")
                t3 = time.process_time()
                spent = [spent[0] + t1 - t0, spent[1] + t2 - t1, spent[2] + t3 - t2]
            best = [min(a, b) for a, b in zip(best, spent)]
        t0 = time.process_time()
        ok = all(r.ok for r in compare(reader, decoder, workers=1))
        whole = time.process_time() - t0
        print(f"{target}: read source {best[0]:.2f} s, decode {best[1]:.2f} s, same_codes {best[2]:.2f} s "
              f"(modules {sum(best):.2f} s CPU); whole compare {whole:.2f} s CPU, ok {ok}", flush=True)


if __name__ == "__main__":
    main()
