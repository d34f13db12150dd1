"""Does the sha256 of the output overlap the conversion? One repack timed with and without hashing.

    python bench/hash_overlap.py --source bench/out/src-24-30000 --targets gptq,gguf

Runs `repack --no-verify` in this process, first as shipped, then with the sha256 of the written
buffers replaced by a no-op (for this measurement only: the manifest of that run is wrong), and reports
per target the wall and CPU seconds of both and the CPU seconds the hashing took alone (sha256 of the
output files' bytes, from the page cache). On two cores the hashing overlaps when
wall(hashed) - wall(unhashed) is well under its own CPU time, i.e. the run takes about
max(convert, hash), not their sum.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import ct_convert.sink as sink
from ct_convert.cli import main as cli_main


class _NoHash:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64


def repack(source: Path, out: Path, target: str, extra: list[str]) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    sys.argv = ["ct-convert", "repack", str(source), str(out), "--target", target, "--no-verify", "-q", *extra]
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        cli_main()
    except SystemExit as e:
        if e.code:
            raise
    return time.perf_counter() - wall, time.process_time() - cpu


def hash_alone(out: Path) -> float:
    cpu = time.process_time()
    for p in sorted(out.rglob("*")):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--targets", default="gptq")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--workers", default=None)
    args = ap.parse_args()
    extra = ["--workers", args.workers] if args.workers else []
    for target in args.targets.split(","):
        out = args.work / f"hash-overlap-{target}"
        repack(args.source, out, target, extra)  # warm: page cache, imports, allocator
        hashed = repack(args.source, out, target, extra)
        alone = hash_alone(out)
        real = sink.HashingSink.__init__

        def unhashed_init(self, *a, **kw):
            real(self, *a, **kw)
            self._sha = _NoHash()

        sink.HashingSink.__init__ = unhashed_init
        try:
            unhashed = repack(args.source, out, target, extra)
        finally:
            sink.HashingSink.__init__ = real
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps({"target": target, "wall_hashed": round(hashed[0], 2), "wall_unhashed": round(unhashed[0], 2),
                          "cpu_hashed": round(hashed[1], 2), "cpu_unhashed": round(unhashed[1], 2),
                          "sha256_cpu_alone": round(alone, 2),
                          "hash_cost_on_wall": round(hashed[0] - unhashed[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
