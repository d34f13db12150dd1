"""Where output goes: results on stdout, progress and messages on stderr (progress only on a terminal).

Text that comes from a checkpoint or the command line (paths, tensor and module names, config
values, error messages built from them) is untrusted: it is shown through `safe` (or `printable`
where no markup is parsed), so a `[/x]` prints as those characters instead of being read as rich
markup, and a newline or an escape sequence prints as `\\n` or `\\x1b` instead of moving the
cursor or recolouring the terminal.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


def printable(text) -> str:
    """`text` with every character a terminal would act on rather than show (C0/C1 controls, DEL,
    line and paragraph separators, bidi and other format characters, lone surrogates) written as
    its Python escape (`\\n`, `\\x1b`, `\\u202e`, `\\ud800`)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def safe(text) -> str:
    """Untrusted text to interpolate into a rich markup string: printable, brackets escaped."""
    return escape(printable(text))


class _Stdout:
    """sys.stdout that survives its reader going away (`ct-convert ... | head -c0`): after EPIPE the
    descriptor is pointed at /dev/null, so later writes and the interpreter's final flush succeed
    silently and the command still ends with its own exit code (the work it did is done)."""

    def write(self, s: str) -> int:
        try:
            return sys.stdout.write(s)
        except BrokenPipeError:
            _silence_stdout()
            return len(s)

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"


def _silence_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stdout without a descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


stdout = _Stdout()
# piped output (CI logs, `| less`) gets a wide fixed width instead of rich's 80-column default;
# emoji codes (`:smile:`) in names stay text
out = Console(file=stdout, soft_wrap=True, width=None if sys.stdout.isatty() else 200, emoji=False)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 200, emoji=False)


def print_json(data) -> None:
    # json.dumps escapes every control character (ensure_ascii), so the document is safe as it is
    stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    stdout.flush()


def error(message, hint=None) -> None:
    """The one or two lines every failure prints on stderr."""
    err.print(f"[red]error:[/] {safe(message)}", highlight=False)
    if hint:
        err.print(f"  {safe(hint)}", highlight=False)


@contextmanager
def progress_bar(label: str, total: int, enabled: bool):
    """Yields an `advance(n)` callable; draws a bar on stderr only when it is a terminal."""
    if not enabled or not err.is_terminal:
        yield lambda n: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(safe(label), total=total)
        yield lambda n: bar.advance(task, n)
