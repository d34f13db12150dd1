"""The `ct-convert` command line (typer). Commands live in `commands/`; this module wires them and
is the one place that turns exceptions into one-line messages and exit codes (cli.md)."""

from __future__ import annotations

import atexit
import os
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ct_convert import __version__, console
from ct_convert.errors import CTConvertError, file_being_read
from ct_convert.targets import TABLE, spec

app = typer.Typer(
    name="ct-convert",
    help="Convert compressed-tensors checkpoints, exactly and offline, into dense, AWQ, GPTQ, Marlin, TensorRT-LLM (ModelOpt and legacy), GGUF and MLX layouts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


# --target choices: every name and alias in the target table
Target = Enum("Target", [(n, n) for t in TABLE for n in (t.name, *t.aliases)], type=str)


def _takes(option: str) -> str:
    """The targets that read a target-specific option, for its help."""
    return ", ".join(t.name for t in TABLE if option in t.options)


class DType(str, Enum):
    float16 = "float16"
    bfloat16 = "bfloat16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class GPTQFormat(str, Enum):
    v1 = "v1"
    v2 = "v2"


class Keep(str, Enum):
    dense = "dense"


def _version(value: bool):
    if value:
        console.out.print(f"ct-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """ct-convert: inspect, repack and verify compressed-tensors checkpoints."""


DebugOpt = typer.Option(False, "--debug", help="Show Python tracebacks on errors.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout and nothing else.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Print nothing but errors and warnings.")
RevisionOpt = typer.Option(None, "--revision", help="Branch, tag or commit of a Hugging Face repo id.")


@app.command()
def inspect(
    source: str = typer.Argument(..., help="Checkpoint folder, .safetensors file, or Hugging Face repo id."),
    json_out: bool = JsonOpt,
    modules: bool = typer.Option(False, "--modules", help="One row per module, with the targets it can become."),
    revision: Optional[str] = RevisionOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
):
    """Show what a checkpoint holds and what each module can be repacked to."""
    _state["debug"] = debug
    from ct_convert.commands.inspect import inspect_report, render

    report, _ = inspect_report(source, revision)
    if json_out:
        console.print_json(report)
    elif not quiet:
        render(report, modules)


@app.command()
def repack(
    source: str = typer.Argument(..., help="Checkpoint folder, .safetensors file, or Hugging Face repo id."),
    output: str = typer.Argument(..., help="Output folder (must not exist, unless --force)."),
    target: Target = typer.Option(..., "--target", "-t", help="Layout to write."),
    dtype: Optional[DType] = typer.Option(None, "--dtype", help="dtype of scales and unquantized tensors (default: what the target requires, else the source's)."),
    device: Device = typer.Option(Device.auto, "--device", help="Where repacking runs; auto uses CUDA when available."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUTPUT that is an earlier ct-convert output or empty."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Re-read the output and compare it with the source."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Modules converted in parallel (default: number of cores)."),
    keep_unsupported: Optional[Keep] = typer.Option(None, "--keep-unsupported", help="Write modules the target cannot hold dequantized (dense) instead of refusing."),
    gptq_format: GPTQFormat = typer.Option(GPTQFormat.v1, "--gptq-format", help=f"GPTQ checkpoint format ({_takes('gptq_format')} target)."),
    tp_size: int = typer.Option(1, "--tp-size", min=1, help=f"Tensor-parallel ranks ({_takes('tp_size')} target)."),
    sm: Optional[int] = typer.Option(None, "--sm", help=f"GPU architecture 80, 89, 90 or 100 ({_takes('sm')} W4A16_GPTQ)."),
    strict: bool = typer.Option(False, "--strict", help=f"Refuse instead of falling back to BF16/F32 ({_takes('strict')} target)."),
    vocab_from: Optional[Path] = typer.Option(None, "--vocab-from", help=f"Take the vocabulary from this GGUF file ({_takes('vocab_from')} target)."),
    approx_input_scales: bool = typer.Option(False, "--approx-input-scales", help=f"Write an NVFP4 input_scale one float32 ulp off where no exact one exists (weights stay exact), instead of refusing ({_takes('approx_input_scales')} target)."),
    nvfp4: bool = typer.Option(False, "--nvfp4", help=f"Write NVFP4 weights as GGUF NVFP4 ({_takes('nvfp4')} target)."),
    revision: Optional[str] = RevisionOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
):
    """Rewrite a compressed-tensors checkpoint into another engine's layout."""
    _state["debug"] = debug
    from ct_convert.commands.repack import repack as run
    from ct_convert.device import resolve_device
    from ct_convert.safetensors_out import parse_size
    from ct_convert.targets.writer_base import DTYPES, RepackOptions

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise CTConvertError(f"--max-shard-size: {e}") from None
    if sm is not None and sm not in (80, 89, 90, 100):
        raise CTConvertError(f"--sm {sm}: choose one of 80, 89, 90, 100")
    opts = RepackOptions(
        target=spec(target.value).name,
        dtype=DTYPES[dtype.value] if dtype else None,
        device=resolve_device(device.value),
        max_shard_size=shard_bytes,
        keep_unsupported=keep_unsupported.value if keep_unsupported else None,
        gptq_format=gptq_format.value,
        tp_size=tp_size,
        sm=sm,
        strict=strict,
        vocab_from=vocab_from,
        nvfp4=nvfp4,
        approx_input_scales=approx_input_scales,
        verify=verify,
    )
    if workers:
        opts.workers = workers
    summary = run(source, output, opts, revision=revision, force=force, show_progress=not (quiet or json_out))
    for warning in summary["warnings"]:  # on stderr whatever the output mode: what the output lacks
        console.err.print(f"[yellow]warning:[/] {console.safe(warning)}", highlight=False)
    if json_out:
        console.print_json(summary)
    elif not quiet:
        conv = f"{summary['converted']}/{summary['modules']} modules converted"
        extra = f", {len(summary['unconverted'])} written dense" if summary["unconverted"] else ""
        ver = "verified exact" if summary["verified"] else "not verified (--no-verify)"
        console.out.print(
            f"[green]✓[/] wrote {console.safe(summary['output'])} ({summary['target']}): {conv}{extra}, "
            f"{summary['bytes_written'] / 1e6:.1f} MB in {summary['seconds']:.1f}s, {ver}"
        )
        for note in (n for n in summary["notes"] if n not in summary["warnings"]):
            console.out.print(f"  note: {console.safe(note)}")


@app.command()
def verify(
    source: Optional[str] = typer.Argument(None, help="The compressed-tensors source (omit with --manifest)."),
    output: Optional[Path] = typer.Argument(None, help="The folder ct-convert wrote."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Re-check this OUTPUT folder against its ct-convert.json."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Accept differences up to this absolute error (default: exact)."),
    revision: Optional[str] = RevisionOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
):
    """Dequantize source and output module by module and compare them (exit 1 on any mismatch)."""
    _state["debug"] = debug
    from ct_convert.commands.verify import manifest_problems, render_results, verify_pair

    if manifest is not None:
        if source is not None or output is not None:
            raise CTConvertError("verify --manifest OUTPUT takes no other arguments")
        problems = manifest_problems(manifest)
        if json_out:
            console.print_json({"output": str(manifest), "ok": not problems, "problems": problems})
        elif not quiet:
            for p in problems:
                console.out.print(f"[red]✗[/] {console.safe(p['file'])}: {console.safe(p['problem'])}")
            console.out.print("[green]✓ every file matches ct-convert.json[/]" if not problems else f"[red]{len(problems)} difference(s)[/]")
        if problems:
            raise typer.Exit(1)
        return
    if source is None or output is None:
        raise CTConvertError("verify needs SOURCE and OUTPUT, or --manifest OUTPUT", hint="Example: ct-convert verify org/model ./out")
    results = verify_pair(source, output, atol, revision, show_progress=not (quiet or json_out))
    ok = all(r.ok for r in results)
    if json_out:
        console.print_json({"source": source, "output": str(output), "ok": ok, "results": [r.as_json() for r in results]})
    elif not quiet:
        render_results(results)
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    try:
        # without standalone mode, typer returns exit codes (130 for Ctrl-C) instead of exiting
        code = app(standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except CTConvertError as e:
        if _state["debug"]:
            raise
        console.error(e, e.hint)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.err.print("[red]interrupted[/]: no output was left behind")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort,):
        sys.exit(130)
    except typer.TyperException as e:  # usage errors: unknown option, bad value, missing argument
        ctx = getattr(e, "ctx", None)
        console.error(e.format_message(), f"Try '{ctx.command_path} --help'." if ctx is not None else None)
        sys.exit(e.exit_code)
    except Exception as e:  # anything unexpected: a bug, or an input no check anticipated
        if _state["debug"]:
            raise
        reading = file_being_read()
        where = f" (while reading {reading})" if reading else ""
        console.error(
            f"unexpected {type(e).__name__}: {e}{where}",
            f"Please report this with the traceback that `{_debug_command()}` prints.",
        )
        sys.exit(2)


def _debug_command() -> str:
    args = sys.argv[1:] + ([] if "--debug" in sys.argv else ["--debug"])
    return shlex.join(["ct-convert", *args])


def console_script() -> None:
    """The `ct-convert` command: `main`, then out of the process at once. Tearing the interpreter down
    would collect torch's and every module's objects one by one (0.5 s, measured); nothing is left to
    do by then (outputs committed or removed, threads joined) but the exit handlers, run here first."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):  # what the interpreter does with sys.exit(None) / sys.exit("text")
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a stream already closed
            pass
    os._exit(code)


if __name__ == "__main__":
    console_script()
