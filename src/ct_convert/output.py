"""The OUTPUT folder as a transaction: written in a temporary sibling, renamed into place at the end.

A run that fails or is interrupted (exception, SIGINT, SIGTERM) removes its temporary folder; one that
is killed outright leaves a folder named `.NAME.ct-convert-tmp-PID`, which the next run removes
once that PID is gone. SOURCE is never written to.

Because conversions run unattended with `--force`, what may be replaced is narrow: only an empty
folder or one that is recognisably an earlier ct-convert output (its `ct-convert.json` lists every
file in it), never SOURCE, a folder around or inside it, the current directory or `/`, and never
through a symbolic link. A lock beside OUTPUT keeps two runs from writing it at once.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
from pathlib import Path

from ct_convert.errors import OutputError
from ct_convert.sink import WRITE_SLICE

TMP_TAG = ".ct-convert-tmp-"
OLD_TAG = ".ct-convert-old-"
LOCK_TAG = ".ct-convert-lock"
MANIFEST = "ct-convert.json"
FORCE_RULE = "--force replaces only an earlier ct-convert output or an empty folder"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path, name: str) -> None:
    """Remove temporary folders of OUTPUT `name` left by killed runs (names compared as text, not globs)."""
    for tag in (TMP_TAG, OLD_TAG):
        prefix = f".{name}{tag}"
        for entry in os.scandir(parent):
            pid = entry.name[len(prefix):]
            if not entry.name.startswith(prefix) or not pid.isdigit():
                continue
            if int(pid) != os.getpid() and not _pid_alive(int(pid)) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_output_path(output: str | os.PathLike, protected: list[Path]) -> Path:
    """The absolute OUTPUT path to write, or OutputError when writing there could destroy anything else.

    `protected` are SOURCE's paths (its folder, a Hub cache repo): OUTPUT may not be, hold or lie in one.
    """
    text = os.fspath(output)
    if not text.strip():
        raise OutputError("OUTPUT is empty", hint="Give the folder to write, e.g. ./model-awq.")
    text = text.rstrip("/") or "/"
    if os.path.islink(text):
        raise OutputError(
            f"{text}: OUTPUT is a symbolic link (to {os.readlink(text)})",
            hint="Give the folder it points to, or remove the link; ct-convert never replaces through a link.",
        )
    real = os.path.realpath(text)
    cwd = os.path.realpath(os.getcwd())
    if real == "/" or _inside(cwd, real):
        what = "/" if real == "/" else "the current directory" if real == cwd else "a folder holding the current directory"
        raise OutputError(f"{text}: OUTPUT is {what}", hint="Choose a new folder, e.g. ./model-awq.")
    for p in protected:
        src = os.path.realpath(p)
        if _inside(real, src) or _inside(src, real):
            how = "is SOURCE" if real == src else "lies inside SOURCE" if _inside(real, src) else "holds SOURCE"
            raise OutputError(f"{text}: OUTPUT {how} ({src})", hint="Write the output next to SOURCE, not over or in it.")
    return Path(real)


def replaceable(folder: Path) -> str | None:
    """Why --force may not replace `folder`, or None when it is empty or an earlier ct-convert output."""
    try:
        entries = os.listdir(folder)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not entries:
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError):
        return f"is not empty and holds no readable {MANIFEST}, so it is not a ct-convert output"
    if not isinstance(manifest, dict) or manifest.get("tool") != "ct-convert" or not isinstance(manifest.get("files"), dict):
        return f"its {MANIFEST} was not written by ct-convert"
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            try:
                mode = os.lstat(path).st_mode
            except OSError as e:
                return f"cannot be read ({e.strerror or e})"
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                return f"holds {rel}, which is not a regular file"
            if rel != MANIFEST and rel not in manifest["files"]:
                return f"holds {rel}, which ct-convert did not write"
    return None


class _Lock:
    """An exclusive, non-blocking lock on `.NAME.ct-convert-lock` beside OUTPUT, removed on release."""

    def __init__(self, parent: Path, name: str):
        self.path = parent / f".{name}{LOCK_TAG}"
        self.fd: int | None = None

    def acquire(self, output: Path) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    f"{output}: another ct-convert run is writing this OUTPUT", hint="Wait for it to finish, or choose another OUTPUT."
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file between our open and lock: take the new one
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


class _Interrupted(BaseException):
    pass


class OutputFolder:
    """`with OutputFolder(path, force, protected) as tmp: ...write into tmp...; out.commit()`."""

    def __init__(self, final: str | os.PathLike, force: bool, protected: list[Path] = ()):
        self.final = check_output_path(final, list(protected))
        self.force = force
        self.tmp = self.final.parent / f".{self.final.name}{TMP_TAG}{os.getpid()}"
        self._lock = _Lock(self.final.parent, self.final.name)
        self._committed = False
        self._old_handlers: dict = {}

    def _check_existing(self) -> None:
        if not os.path.lexists(self.final):
            return
        if not self.force:
            raise OutputError(f"{self.final}: already exists", hint="Pass --force to replace it, or choose another OUTPUT.")
        if os.path.islink(self.final) or not self.final.is_dir():
            raise OutputError(f"{self.final}: exists and is not a folder; {FORCE_RULE}")
        why = replaceable(self.final)
        if why:
            raise OutputError(f"{self.final}: {why}; {FORCE_RULE}", hint="Remove it yourself, or choose another OUTPUT.")

    def __enter__(self) -> Path:
        parent = self.final.parent
        if not parent.is_dir():
            raise OutputError(f"{parent}: the parent folder of OUTPUT does not exist")
        self._check_existing()
        try:
            self._lock.acquire(self.final)
        except OSError as e:
            raise OutputError(f"{parent}: cannot create the output folder: {e.strerror or e}") from None
        try:
            self._check_existing()  # again: another run may have finished between the first check and the lock
            remove_stale(parent, self.final.name)
            try:
                self.tmp.mkdir()
            except FileExistsError:
                shutil.rmtree(self.tmp)
                self.tmp.mkdir()
        except OSError as e:
            self._lock.release()
            raise OutputError(f"{parent}: cannot create the output folder: {e.strerror or e}") from None
        except BaseException:
            self._lock.release()
            raise
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # not the main thread, or unsupported
                pass
        return self.tmp

    def _on_signal(self, signum, frame):
        raise _Interrupted(signum)

    def commit(self) -> None:
        self._check_existing()  # what is there now, not what was there when the run began
        old = None
        try:
            if os.path.lexists(self.final):
                old = self.final.parent / f".{self.final.name}{OLD_TAG}{os.getpid()}"
                os.replace(self.final, old)
            os.replace(self.tmp, self.final)
        except OSError as e:
            if old is not None and not os.path.lexists(self.final):
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
        self._lock.release()
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
            while chunk := fi.read(WRITE_SLICE):
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
