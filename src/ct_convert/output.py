"""The OUTPUT folder as a transaction: written in a temporary sibling, renamed into place at the end.

A run that fails or is interrupted (exception, SIGINT, SIGTERM) removes its temporary folder; one that
is killed outright leaves a folder named `.NAME.ct-convert-tmp-PID`, which the next run removes
once that PID is gone. SOURCE is never written to.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
from pathlib import Path

from ct_convert.errors import OutputError

TMP_TAG = ".ct-convert-tmp-"
OLD_TAG = ".ct-convert-old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path, name: str) -> None:
    for tag in (TMP_TAG, OLD_TAG):
        for p in parent.glob(f".{name}{tag}*"):
            try:
                pid = int(p.name.rsplit("-", 1)[-1])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


class _Interrupted(BaseException):
    pass


class OutputFolder:
    """`with OutputFolder(path, force) as tmp: ...write into tmp...; out.commit()`."""

    def __init__(self, final: Path, force: bool):
        self.final = final.absolute()
        self.force = force
        self.tmp = self.final.parent / f".{self.final.name}{TMP_TAG}{os.getpid()}"
        self._committed = False
        self._old_handlers: dict = {}

    def __enter__(self) -> Path:
        parent = self.final.parent
        if self.final.exists() and not self.force:
            raise OutputError(f"{self.final}: already exists", hint="Pass --force to replace it, or choose another OUTPUT.")
        if self.final.exists() and not self.final.is_dir():
            raise OutputError(f"{self.final}: exists and is not a folder")
        if not parent.is_dir():
            raise OutputError(f"{parent}: the parent folder of OUTPUT does not exist")
        remove_stale(parent, self.final.name)
        try:
            self.tmp.mkdir()
        except FileExistsError:
            shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise OutputError(f"{parent}: cannot create the output folder: {e.strerror or e}") from None
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # not the main thread, or unsupported
                pass
        return self.tmp

    def _on_signal(self, signum, frame):
        raise _Interrupted(signum)

    def commit(self) -> None:
        old = None
        try:
            if self.final.exists():
                old = self.final.parent / f".{self.final.name}{OLD_TAG}{os.getpid()}"
                os.replace(self.final, old)
            os.replace(self.tmp, self.final)
        except OSError as e:
            if old is not None and not self.final.exists():
                os.replace(old, self.final)
            raise OutputError(f"{self.final}: cannot move the finished output into place: {e.strerror or e}") from None
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb):
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if exc_type is _Interrupted:
            raise KeyboardInterrupt from None
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{self.final}: disk full while writing the output") from None
        if isinstance(exc, PermissionError):
            raise OutputError(f"{self.final}: permission denied: {exc.filename or exc}") from None
        return False


def copy_with_hash(src: Path, dst: Path) -> tuple[str, int]:
    """Copy a regular file (anything else is refused: a FIFO would hang, a device never end) and
    return (sha256, size) from the bytes copied."""
    from ct_convert.regular_files import open_regular_file

    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    try:
        with open_regular_file(src) as fi, open(dst, "wb") as fo:
            while chunk := fi.read(1 << 22):
                h.update(chunk)
                fo.write(chunk)
                size += len(chunk)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{dst}: disk full while copying {src.name}") from None
        raise OutputError(f"{dst}: cannot copy {src}: {e.strerror or e}") from None
    return h.hexdigest(), size


def write_bytes_with_hash(path: Path, data: bytes) -> tuple[str, int]:
    try:
        path.write_bytes(data)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutputError(f"{path}: disk full") from None
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    return hashlib.sha256(data).hexdigest(), len(data)
