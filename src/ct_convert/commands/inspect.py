"""`ct-convert inspect`: what a checkpoint holds, module by module, and what each can become."""

from __future__ import annotations

from collections import Counter

from rich import box
from rich.panel import Panel
from rich.table import Table

from ct_convert import console
from ct_convert.console import safe
from ct_convert.plan import AT_REPACK
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve
from ct_convert.targets import TABLE, writer_for
from ct_convert.targets.writer_base import RepackOptions


def inspect_report(source: str, revision: str | None) -> tuple[dict, object]:
    ckpt = resolve(source, revision, headers_only=True)
    reader = open_checkpoint(ckpt)
    qc = reader.qconfig
    # each target's own plan, from header facts: what repack would do, short of reading the data
    plans = {t.name: writer_for(t.name).plan(reader, RepackOptions(target=t.name), inspecting=True) for t in TABLE if t.inspect}
    modules = []
    for name, info in reader.modules.items():
        targets, reasons, at_repack, details = {}, {}, {}, {}
        for t, plan in plans.items():
            if plan.modules.get(name) is not None and plan.modules[name].details:
                details[t] = plan.modules[name].details
            targets[t], why = plan.module_verdict(name)
            if targets[t] is False:
                reasons[t] = why
            elif why:
                at_repack[t] = why
        modules.append(
            {
                "name": name,
                "format": info.format,
                "weights": info.scheme.as_json() if info.scheme else None,
                "input_activations": info.input_activations,
                "shape": list(info.shape),
                "sparsity": info.sparsity,
                "targets": targets,
                "reasons": reasons,
                "at_repack": at_repack,
                "details": details,
            }
        )
    report = {
        "schema": 1,
        "source": source,
        "quant_method": "compressed-tensors",
        "format": qc.format,
        "version": qc.version,
        "architecture": reader.architecture,
        "modules": modules,
        "unquantized": sorted(reader.unquantized),
        "totals": reader.totals(),
        "config_groups": [
            {
                "name": g.name,
                "targets": list(g.targets),
                "format": g.format,
                "weights": g.weights.as_json() if g.weights else None,
                "input_activations": g.input_activations.as_json() if g.input_activations else None,
            }
            for g in qc.groups
        ],
        "sparsity_config": {"format": qc.sparsity.format, "structure": qc.sparsity.structure} if qc.sparsity else None,
        "kv_cache_scheme": qc.kv_cache_scheme.as_json() if qc.kv_cache_scheme else None,
        "online_transforms": reader.online_transforms,
        "warnings": reader.warnings,
    }
    return report, reader


def _args_text(a: dict | None) -> str:
    if not a:
        return "-"
    s = f"{a['type']}{a['num_bits']} {'sym' if a['symmetric'] else 'asym'} {a['strategy']}"
    if a.get("group_size") and a["group_size"] > 0:
        s += f" g{a['group_size']}"
    if a.get("block_structure"):
        s += f" {a['block_structure'][0]}x{a['block_structure'][1]}"
    if a.get("dynamic"):
        s += " dynamic" if a["dynamic"] is True else f" dynamic={a['dynamic']}"
    if a.get("actorder"):
        s += f" actorder={a['actorder']}"
    return safe(s)


def _details_text(d: dict) -> str:
    text = str(d.get("quant_algo", d))
    return text + (f" g{d['group_size']}" if d.get("group_size") else "")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def render(report: dict, show_modules: bool) -> None:
    """Every value shown comes from the checkpoint or the command line: each goes through `safe`."""
    t = report["totals"]
    formats = Counter(m["format"] for m in report["modules"])
    summary = (
        f"[bold]architecture[/] {safe(report['architecture'] or '-')}\n"
        f"[bold]quant_method[/] {safe(report['quant_method'])}   [bold]format[/] {safe(report['format'] or '-')}   "
        f"[bold]library version[/] {safe(report['version'] or 'not recorded (<= 0.10 or third-party)')}\n"
        f"[bold]quantized modules[/] {len(report['modules'])} "
        f"({safe(', '.join(f'{n} {f}' for f, n in formats.most_common()) or 'none')})   "
        f"[bold]left in full precision[/] {len(report['unquantized'])}\n"
        f"[bold]tensors[/] {t['tensors']}   [bold]parameters[/] {t['parameters']:,}   "
        f"[bold]stored[/] {_gb(t['bytes'])}   [bold]dense[/] {_gb(t['dense_bytes'])}"
    )
    console.out.print(Panel(summary, title=f"[bold]{safe(report['source'])}", expand=False))
    groups = Table(title="Schemes", box=box.SIMPLE_HEAVY, title_justify="left")
    for col in ("group", "targets", "format", "weights", "input activations"):
        groups.add_column(col)
    for g in report["config_groups"]:
        groups.add_row(safe(g["name"]), safe(", ".join(g["targets"])), safe(g["format"] or "-"),
                       _args_text(g["weights"]), _args_text(g["input_activations"]))
    console.out.print(groups)
    if report["sparsity_config"]:
        sc = report["sparsity_config"]
        console.out.print(f"[bold]sparsity[/] {safe(sc['format'])} ({safe(sc['structure'])})")
    targets = [k for k in (report["modules"][0]["targets"] if report["modules"] else {})]
    usable = {k: sum(m["targets"][k] is not False for m in report["modules"]) for k in targets}
    pending = {k: sum(m["targets"][k] == AT_REPACK for m in report["modules"]) for k in targets}
    if targets:
        console.out.print(
            "[bold]repackable to[/] "
            + "   ".join(
                f"{'[green]' if n == len(report['modules']) else '[yellow]' if n else '[red]'}{k} {n}/{len(report['modules'])}"
                f"{f' ({pending[k]} {AT_REPACK})' if pending[k] else ''}[/]"
                for k, n in usable.items()
            )
        )
    for w in report["warnings"]:
        console.out.print(f"[yellow]warning:[/] {safe(w)}")
    for tr in report["online_transforms"]:
        console.out.print(f"[red]online transform:[/] {safe(tr)} (repack is refused: the weights alone are not the model)")
    if not show_modules:
        if report["modules"]:
            console.out.print("[dim]Add --modules for one row per module.[/]")
        return
    table = Table(box=box.SIMPLE, title="Modules", title_justify="left")
    for col in ("module", "format", "bits", "type", "sym", "strategy", "group", "shape", "targets", "as", "why not"):
        # a module name is what users grep for: never broken across lines
        table.add_column(col, overflow="fold", no_wrap=col == "module")
    for m in report["modules"]:
        w = m["weights"] or {}
        table.add_row(
            *map(safe, (
                m["name"],
                m["format"] + (f" {m['sparsity']}" if m["sparsity"] else ""),
                w.get("num_bits", "-"),
                w.get("type", "-"),
                {True: "yes", False: "no"}.get(w.get("symmetric"), "-"),
                w.get("strategy", "-"),
                w.get("group_size") or "-",
                "x".join(map(str, m["shape"])),
                " ".join(k + ("?" if ok == AT_REPACK else "") for k, ok in m["targets"].items() if ok),
                "; ".join(f"{k}: {_details_text(d)}" for k, d in m["details"].items()),
                "; ".join([f"{k}: {v}" for k, v in m["reasons"].items()] + [f"{k} ({AT_REPACK}): {v}" for k, v in m["at_repack"].items()]),
            ))
        )
    console.out.print(table)
