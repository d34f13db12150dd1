"""`ct-convert verify`: compare an output with its source, or re-check it against its manifest."""

from __future__ import annotations

import os
from pathlib import Path

from rich import box
from rich.table import Table

from ct_convert import console, heap, manifest
from ct_convert.console import safe
from ct_convert.parallel import one_torch_thread_per_worker
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.targets import open_output
from ct_convert.source import resolve
from ct_convert.verify import ModuleResult, compare


def verify_pair(source: str, output: Path, atol: float | None, revision: str | None, show_progress: bool) -> list[ModuleResult]:
    heap.keep_freed()
    reader = open_checkpoint(resolve(source, revision))
    out = open_output(output, reader.architecture)
    workers = os.cpu_count() or 1
    with one_torch_thread_per_worker(workers), console.progress_bar("verify", reader.total_bytes(), show_progress) as advance:
        return compare(reader, out, atol, progress=advance, workers=workers)


def render_results(results: list[ModuleResult]) -> None:
    table = Table(box=box.SIMPLE, title="Verification", title_justify="left")
    for col in ("module / tensor", "max abs error", "rel error", "exact", "ok"):
        table.add_column(col)
    for r in results:
        table.add_row(
            safe(r.module),
            f"{r.max_abs_error:.3g}",
            f"{r.rel_error:.3g}",
            "yes" if r.exact else "no",
            "[green]ok[/]" if r.ok else f"[red]MISMATCH[/] {safe(r.note)}",
        )
    console.out.print(table)
    bad = sum(not r.ok for r in results)
    console.out.print(f"[bold]{len(results) - bad} ok, {bad} mismatched[/]")


def manifest_problems(output: Path) -> list[dict]:
    return manifest.check(output)
