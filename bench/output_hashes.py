"""Fingerprint every output ct-convert writes, to prove a refactor changes no byte.

    python bench/output_hashes.py --out /tmp/before.json          # on the old code
    python bench/output_hashes.py --out /tmp/after.json           # on the new code
    python bench/output_hashes.py --compare /tmp/before.json /tmp/after.json
    python bench/output_hashes.py --files-only --compare /tmp/before.json /tmp/after.json

To fingerprint another commit's code on the same sources, run this script from this checkout with
PYTHONPATH pointing at that commit's src/ (a `git worktree add /tmp/base COMMIT`); --targets limits
the runs to targets both commits have. --files-only compares exit codes and the `files` sections only
(what must not change), not refusal wording, manifests or `inspect`.

Runs `repack` for every fixture (and a few synthetic or edited sources the tests use: tensor-parallel
Llama/Qwen2 checkpoints, the GGUF architectures, sources whose config or scales were edited) x every
target x the option combinations the tests use (--gptq-format, --tp-size, --sm, --nvfp4, --strict,
--keep-unsupported, --dtype, --max-shard-size, --vocab-from), in-process, and records per run the
exit code, the first stderr line of a refusal, the `files` section of ct-convert.json (sha256 and
size of every file) and the rest of the manifest; `inspect --json` of every source is recorded too.

Synthetic sources are built once into --sources (their generators are not all reproducible across
processes), so both runs read the very same bytes; pass the same --sources to both.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TARGETS = ("dense", "awq", "gptq", "marlin", "trtllm", "trtllm-legacy", "gguf", "mlx")

# per target: option lists run on every source (the tests' combinations)
VARIANTS = {
    "dense": [[], ["--dtype", "float16"]],
    "awq": [[], ["--keep-unsupported", "dense"]],
    "gptq": [[], ["--gptq-format", "v2"], ["--keep-unsupported", "dense"], ["--gptq-format", "v2", "--keep-unsupported", "dense"]],
    "marlin": [[], ["--keep-unsupported", "dense"]],
    "trtllm": [[], ["--keep-unsupported", "dense"], ["--approx-input-scales"], ["--dtype", "float16"]],
    "trtllm-legacy": [[], ["--sm", "80"], ["--sm", "89"], ["--sm", "90"], ["--sm", "100"], ["--tp-size", "2"],
                      ["--tp-size", "2", "--sm", "80"], ["--tp-size", "4"], ["--keep-unsupported", "dense"],
                      ["--keep-unsupported", "dense", "--sm", "80"], ["--dtype", "float16", "--sm", "80"]],
    "gguf": [[], ["--nvfp4"], ["--strict"], ["--nvfp4", "--strict"]],
    "mlx": [[], ["--keep-unsupported", "dense"], ["--dtype", "float16"]],
}


def fixture_sources() -> dict[str, Path]:
    index = json.loads((FIXTURES / "index.json").read_text())["fixtures"]
    out = {f["name"]: FIXTURES / f["name"] for f in index}
    out["gguf/qwen3moe-w4a16"] = FIXTURES / "gguf" / "qwen3moe-w4a16"
    return out


def build_sources(folder: Path) -> None:
    """Synthetic and edited sources, written once."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(ROOT / "tests"), str(FIXTURES / "gguf"), str(FIXTURES)]

    def once(name, make):
        dst = folder / name
        if not (dst / ".done").exists():
            shutil.rmtree(dst, ignore_errors=True)
            make(dst)
            (dst / ".done").write_text("")

    # generators imported only when a source is missing: a run of another commit's code then reuses
    # the sources without importing this checkout's tests
    def make_checkpoint(*args):
        from test_trtllm_tp import make_checkpoint

        make_checkpoint(*args)

    def build(*args):
        from make_gguf_fixtures import build

        build(*args)

    for scheme, arch in (("sym-g128", "LlamaForCausalLM"), ("asym-g128", "Qwen2ForCausalLM"), ("asym-g128", "MistralForCausalLM"),
                         ("channel4", "LlamaForCausalLM"), ("channel8", "Qwen2ForCausalLM"), ("fp8", "LlamaForCausalLM")):
        once(f"tp-{scheme}-{arch}", lambda d, s=scheme, a=arch: make_checkpoint(d, s, a))

    for arch, preset in (("llama", "W4A16"), ("llama", "W4A16_ASYM"), ("llama", "W8A16"), ("qwen2", "W4A16"),
                         ("qwen3", "W4A16"), ("qwen3moe", "W8A16")):
        once(f"gguf-{arch}-{preset}", lambda d, a=arch, p=preset: build(a, p, str(d)))

    def edited(name, fixture, config=None, tensors=None):
        def make(dst):
            shutil.copytree(FIXTURES / fixture, dst)
            if config:
                cfg = json.loads((dst / "config.json").read_text())
                config(cfg)
                (dst / "config.json").write_text(json.dumps(cfg))
            if tensors:
                t = load_file(dst / "model.safetensors")
                tensors(t)
                save_file(t, dst / "model.safetensors", metadata={"format": "pt"})

        once(name, make)

    def arch(name):
        return lambda cfg: cfg.__setitem__("architectures", [name])

    for a in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM", "DeepseekV3ForCausalLM", "Phi3ForCausalLM"):
        edited(f"edit-w4a16-g128-{a}", "w4a16-g128", config=arch(a))
    edited("edit-w8a16-g128-Qwen3ForCausalLM", "w8a16-g128", config=arch("Qwen3ForCausalLM"))

    def weight_only(cfg):
        cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None

    edited("edit-w8a8-int-weight-only", "w8a8-int", config=weight_only)

    def equal_fp8_scales(t):
        for a, b in (("k_proj", "q_proj"), ("v_proj", "q_proj"), ("up_proj", "gate_proj")):
            grp = "self_attn" if a in ("k_proj", "v_proj") else "mlp"
            t[f"model.layers.0.{grp}.{a}.weight_scale"] = t[f"model.layers.0.{grp}.{b}.weight_scale"].clone()

    edited("edit-fp8-static-equal-scales", "fp8-static", tensors=equal_fp8_scales)

    def tiny_scale(t):
        s = t["model.layers.0.mlp.down_proj.weight_scale"]
        s[0, 0] = (1 + 2.0**-7) * 2.0**-20
        t["model.layers.0.mlp.down_proj.weight_scale"] = s

    edited("edit-w4a16-g128-fp16-inexact-scale", "w4a16-g128", tensors=tiny_scale)

    def llama3_rope(cfg):
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}

    edited("edit-w4a16-g128-llama3-rope", "w4a16-g128", config=llama3_rope)
    del torch


class Runner:
    def __init__(self, work: Path):
        self.work = work

    def cli(self, *args) -> tuple[int, str, str]:
        from ct_convert.cli import _state, main

        old = sys.argv
        sys.argv = ["ct-convert", *map(str, args)]
        _state["debug"] = False
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = old
        return code, out.getvalue(), err.getvalue()

    def repack(self, src: Path, target: str, opts: list[str], keep: Path | None = None) -> dict:
        out = keep or self.work / "out"
        shutil.rmtree(out, ignore_errors=True)
        code, stdout, stderr = self.cli("repack", src, out, "--target", target, "--json", *opts)
        rec: dict = {"code": code}
        if code != 0:
            rec["stderr"] = stderr.strip().splitlines()[0] if stderr.strip() else ""
            rec["output_exists"] = out.exists()
        else:
            manifest = json.loads((out / "ct-convert.json").read_text())
            rec["files"] = manifest.pop("files")
            rec["manifest"] = manifest
            summary = json.loads(stdout)
            summary.pop("seconds", None)
            rec["summary"] = summary
        if keep is None:
            shutil.rmtree(out, ignore_errors=True)
        return rec


def collect(sources_dir: Path, work: Path, targets: tuple[str, ...]) -> dict:
    build_sources(sources_dir)
    sources = fixture_sources()
    sources.update({p.name: p for p in sorted(sources_dir.iterdir()) if (p / ".done").exists()})
    r = Runner(work)
    results: dict = {"repack": {}, "inspect": {}}
    vocab = sources_dir / "vocab-from"
    if not (vocab / "model.gguf").exists():  # an input of the --vocab-from runs: written once
        rec = r.repack(sources["gguf/qwen3moe-w4a16"], "gguf", [], keep=vocab)
        assert rec["code"] == 0, rec
    started = time.monotonic()
    for name, src in sources.items():
        code, stdout, stderr = r.cli("inspect", src, "--json")
        results["inspect"][name] = json.loads(stdout) if code == 0 else {"code": code, "stderr": stderr.strip().splitlines()[:1]}
        if code == 0:
            results["inspect"][name].pop("source", None)
        for target in targets:
            for opts in VARIANTS[target]:
                results["repack"][f"{name} | {target} {' '.join(opts)}".strip()] = r.repack(src, target, opts)
        print(f"{name}: {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    extra = [
        ("w4a16-g128", "dense", ["--max-shard-size", "200KB"]),
        ("gguf/qwen3moe-w4a16", "gguf", ["--max-shard-size", "100KB"]),
        ("gguf/qwen3moe-w4a16", "gguf", ["--vocab-from", str(vocab / "model.gguf")]),
        ("w4a16-g128", "gguf", ["--vocab-from", str(vocab / "model.gguf")]),
        ("w4a16-g128", "awq", ["--max-shard-size", "100KB"]),
        ("w4a16-g128", "dense", ["--dtype", "bfloat16"]),
        ("w4a16-g128", "gptq", ["--dtype", "float16"]),
    ]
    for name, target, opts in extra:
        if target not in targets:
            continue
        key = f"{name} | {target} {' '.join(opts)}".replace(str(vocab), "VOCAB")
        results["repack"][key] = r.repack(sources[name], target, opts)
    return results


def compare(a: dict, b: dict, files_only: bool = False) -> int:
    bad = 0
    for section in ("repack",) if files_only else ("repack", "inspect"):
        keys = sorted(set(a[section]) | set(b[section]))
        for k in keys:
            x, y = a[section].get(k), b[section].get(k)
            if files_only and x is not None and y is not None:
                x, y = ({f: r.get(f) for f in ("code", "files")} for r in (x, y))
            if x == y:
                continue
            bad += 1
            print(f"[{section}] {k}")
            if x is None or y is None:
                print("   only in", "after" if x is None else "before")
                continue
            for field in sorted(set(x) | set(y)):
                if x.get(field) != y.get(field):
                    print(f"   {field}:\n     before {json.dumps(x.get(field))[:600]}\n     after  {json.dumps(y.get(field))[:600]}")
    n = sum(len(a[s]) for s in (("repack",) if files_only else ("repack", "inspect")))
    print(f"{n} records, {bad} differ")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the fingerprints here")
    ap.add_argument("--sources", type=Path, default=Path("/tmp/ct-convert-hash-sources"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/ct-convert-hash-work"))
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--files-only", action="store_true", help="compare exit codes and `files` sections only")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets to run (default: all)")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        raise SystemExit(compare(a, b, args.files_only))
    if args.out is None:
        ap.error("--out or --compare")
    args.work.mkdir(parents=True, exist_ok=True)
    results = collect(args.sources, args.work, tuple(args.targets.split(",")))
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    codes = [r["code"] for r in results["repack"].values()]
    print(f"{len(codes)} repack runs ({codes.count(0)} written, {len(codes) - codes.count(0)} refused) -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
