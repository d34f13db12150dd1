"""The plan is what gets written: every output tensor it lists is in the output with its dtype and
shape, in its file, and nothing else is; units name their sources, merges and fallbacks."""

from __future__ import annotations

import json

import gguf
import pytest
from safetensors import safe_open

from conftest import FIXTURES, SAMPLE
from ct_convert.plan import CARRY, DEQUANTIZE, ENCODE, FALLBACK
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve
from ct_convert.targets import NAMES, writer_for
from ct_convert.targets.writer_base import RepackOptions

CASES = [(SAMPLE[t], t, ()) for t in NAMES] + [
    ("mixed-fp8-w4a16", "awq", ("keep_unsupported",)),  # fallbacks
    ("fp8-static", "trtllm-legacy", ("keep_unsupported",)),  # a fused q/k/v written dense
    ("fp8-dynamic", "gguf", ()),  # BF16 fallbacks
]


def written_tensors(out) -> dict[tuple[str, str], tuple[str, tuple[int, ...]]]:
    """(file, tensor) -> (dtype, shape) of every tensor in an output folder."""
    found = {}
    for p in out.glob("*.safetensors"):
        with safe_open(p, "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                found[(p.name, name)] = (t.get_dtype(), tuple(t.get_shape()))
    for p in out.glob("*.gguf"):
        for t in gguf.GGUFReader(p).tensors:
            found[(p.name, t.name)] = (gguf.GGMLQuantizationType(t.tensor_type).name, tuple(int(x) for x in reversed(t.shape)))
    return found


SAFETENSORS_DTYPE = {
    "bfloat16": "BF16", "float16": "F16", "float32": "F32", "int32": "I32", "int8": "I8", "float8_e4m3fn": "F8_E4M3",
    "uint8": "U8", "uint32": "U32",
}


@pytest.mark.parametrize("fixture,target,flags", CASES, ids=lambda c: c if isinstance(c, str) else "-".join(c))
def test_the_plan_is_what_is_written(cli, tmp_path, fixture, target, flags):
    opts = RepackOptions(target=target, keep_unsupported="dense" if flags else None)
    reader = open_checkpoint(resolve(str(FIXTURES / fixture)))
    plan = writer_for(target).plan(reader, opts)
    out = tmp_path / "out"
    args = ["--keep-unsupported", "dense"] if flags else []
    assert cli("repack", FIXTURES / fixture, out, "--target", target, "--no-verify", "-q", *args).code == 0
    planned = {(o.file, o.name): (SAFETENSORS_DTYPE.get(o.dtype, o.dtype), o.shape) for o in plan.outputs()}
    assert planned == written_tensors(out)
    manifest = json.loads((out / "ct-convert.json").read_text())
    assert plan.manifest_modules() == {m: {k: v for k, v in e.items() if k != "verified"} for m, e in manifest["modules"].items()}
    assert plan.fallbacks == manifest["fallbacks"]
    for unit in plan.units:
        assert unit.outputs and (unit.sources or unit.how not in (ENCODE, DEQUANTIZE, CARRY))
        modules = [s for s in unit.sources if s in reader.modules]
        if unit.how == DEQUANTIZE:  # a fallback says why, as the manifest does
            assert unit.reason and all(plan.modules[m].status == FALLBACK for m in modules)
            assert all(f["reason"] in unit.reason for f in plan.fallbacks if f["module"] in modules)
        else:
            assert unit.reason is None
    if target == "trtllm-legacy":  # merges: one unit reads q, k and v and writes the fused tensor of every rank
        qkv = next(u for u in plan.units if u.outputs[0].name.endswith("attention.qkv.weight"))
        assert [s.rsplit(".", 1)[-1] for s in qkv.sources] == ["q_proj", "k_proj", "v_proj"]
    if fixture == "gguf/qwen3moe-w4a16":  # merges: the experts of a layer stacked into one tensor
        exps = next(u for u in plan.units if u.outputs[0].name == "blk.0.ffn_down_exps.weight")
        assert [s.split(".")[-2] for s in exps.sources] == [str(e) for e in range(len(exps.sources))]
