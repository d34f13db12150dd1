"""`ct-convert repack`: source -> reader -> plan -> writer -> verified, manifest-stamped OUTPUT."""

from __future__ import annotations

import time
from pathlib import Path

from ct_convert import __version__, console, heap
from ct_convert.errors import VerificationFailed
from ct_convert.manifest import NAME as MANIFEST, encode as encode_manifest
from ct_convert.output import OutputFolder, write_bytes_with_hash
from ct_convert.parallel import one_torch_thread_per_worker
from ct_convert.plan import Plan
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve
from ct_convert.targets import open_output, writer_for
from ct_convert.targets.writer_base import Files, RepackOptions
from ct_convert.verify import compare


def repack(source: str, output: str | Path, opts: RepackOptions, *, revision: str | None, force: bool, show_progress: bool) -> dict:
    heap.keep_freed()
    with one_torch_thread_per_worker(opts.workers):
        return _repack(source, output, opts, revision=revision, force=force, show_progress=show_progress)


def _repack(source: str, output: str | Path, opts: RepackOptions, *, revision: str | None, force: bool, show_progress: bool) -> dict:
    started = time.monotonic()
    writer = writer_for(opts.target)
    files = resolve(source, revision)
    folder = OutputFolder(output, force, files.protected_paths())
    reader = open_checkpoint(files)
    plan = writer.plan(reader, opts)  # every refusal, before anything is created
    total = reader.total_bytes()
    modules = plan.manifest_modules()
    with folder as tmp:
        with console.progress_bar(f"repack → {opts.target}", total, show_progress) as advance:
            written = writer.write(plan, reader, tmp, opts, advance)
        if opts.verify:
            heap.return_freed()  # what writing freed, before verification allocates its own
            with console.progress_bar("verify", total, show_progress) as advance:
                _verify_into(reader, tmp, modules, advance, opts.workers)
        manifest = _manifest(source, files.revision, opts, plan, written, modules)
        write_bytes_with_hash(tmp / MANIFEST, encode_manifest(manifest))
        folder.commit()
    return {
        "source": source,
        "output": str(folder.final),
        "target": opts.target,
        "modules": len(modules),
        "converted": sum(1 for m in modules.values() if m["status"] == "converted"),
        "unconverted": [f["module"] for f in plan.fallbacks],
        "dropped_tensors": len(plan.dropped),
        "files": len(written) + 1,
        "bytes_written": sum(f["size"] for f in written.values()),
        "verified": opts.verify,
        "seconds": round(time.monotonic() - started, 3),
        "notes": plan.notes,
        "warnings": plan.warnings,
    }


def _verify_into(reader, folder: Path, modules: dict[str, dict], advance, workers: int) -> None:
    results = compare(reader, open_output(folder, reader.architecture), progress=advance, workers=workers)
    bad = [r for r in results if not r.ok]
    if bad:
        raise VerificationFailed(
            f"{bad[0].module}: the written output differs from the source "
            f"(max abs error {bad[0].max_abs_error:g}; {len(bad)} tensor(s) differ); nothing was written",
            hint="This is a ct-convert bug: please report it with the output of `ct-convert inspect SOURCE --json`.",
        )
    by_name = {r.module: r for r in results}
    for name, entry in modules.items():
        r = by_name.get(name)
        if r is not None:
            entry["verified"] = {"exact": r.exact, "max_abs_error": r.max_abs_error}


def _manifest(source: str, revision: str | None, opts: RepackOptions, plan: Plan, files: Files, modules: dict) -> dict:
    return {
        "tool": "ct-convert",
        "version": __version__,
        "source": source,
        "revision": revision,
        "target": opts.target,
        "options": opts.as_json(),
        "files": dict(sorted(files.items())),
        "modules": dict(sorted(modules.items())),
        "unconverted": [f["module"] for f in plan.fallbacks],
        "fallbacks": plan.fallbacks,
        "dropped_tensors": sorted(plan.dropped),
        "notes": plan.notes,
    }
