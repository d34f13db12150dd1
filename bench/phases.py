"""Time a repack's two phases apart, writing and verification (wall and CPU seconds of each), and
compare two checkouts in the same minutes: on a machine whose speed drifts by tens of percent from
hour to hour, interleaved runs are what tells a change from the weather.

    python bench/phases.py SRC --targets gguf,awq --rounds 3
    python bench/phases.py SRC --targets gguf --rounds 3 --against /other/checkout/src   # A/B

SRC is a compressed-tensors checkpoint (bench/run.py --keep leaves one under its --work folder). Each
run writes to a fresh folder next to SRC, deleted and synced after it. Prints one line per run and a
median table: write s, verify s and verification's share of the write (what `--no-verify` saves).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
from ct_convert.commands import repack as R
timed = {}
def clock(name, fn):
    def run(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            timed[name] = (round(time.perf_counter() - t, 3), round(time.process_time() - c, 3))
    return run
R._verify_into = clock("verify", R._verify_into)
writer_for = R.writer_for
def timed_writer(target):
    w = writer_for(target)
    w.write = clock("write", w.write)
    return w
R.writer_for = timed_writer
from ct_convert.cli import main
sys.argv = ["ct-convert", "repack", sys.argv[1], sys.argv[2], "--target", sys.argv[3], "-q"]
try:
    main()
except SystemExit as e:
    if e.code:
        raise
print(json.dumps(timed))
"""


def run(src: Path, target: str, pythonpath: str | None) -> dict:
    out = src.parent / f"phases-{target}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), target], env=env, capture_output=True, text=True, check=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("--targets", default="gptq,awq,marlin,gguf,mlx,trtllm,trtllm-legacy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--against", help="another checkout's src folder, run interleaved with this one")
    args = ap.parse_args()
    sides = {"this": None} | ({"against": args.against} if args.against else {})
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for target in args.targets.split(","):
            for side, path in sides.items():
                t = run(args.src, target, path)
                results.setdefault((target, side), []).append(t)
                print(json.dumps({"round": r, "target": target, "side": side, **t}), flush=True)
    print("| target | side | write s (CPU s) | verify s (CPU s) | verify / write |")
    print("|---|---|---|---|---|")
    for (target, side), runs in results.items():
        med = lambda phase, i: statistics.median(x[phase][i] for x in runs)  # noqa: E731
        share = statistics.median(x["verify"][0] / x["write"][0] for x in runs)
        print(f"| {target} | {side} | {med('write', 0):.2f} ({med('write', 1):.2f}) | {med('verify', 0):.2f} ({med('verify', 1):.2f}) | +{100 * share:.0f} % |")


if __name__ == "__main__":
    main()
