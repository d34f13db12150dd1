"""How much more memory this process can allocate: the least of what the kernel reports available,
what its cgroup (a container's limit) leaves, and what `ulimit -v` leaves of the address space.

Used before building a tensor whose size comes from a file's claims rather than from bytes it holds
(a bitmask expanding to a dense module), so that a claim too large is refused with one line instead
of ending in the kernel's out-of-memory killer.
"""

from __future__ import annotations

import resource
from pathlib import Path


def available_bytes() -> int | None:
    """Bytes this process can still allocate, or None where nothing can be learned (not Linux)."""
    known = [n for n in (_meminfo_available(), _cgroup_left(), _address_space_left()) if n is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    for line in _lines(Path("/proc/meminfo")):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _cgroup_left() -> int | None:
    """cgroup v2: memory.max minus memory.current of this process's group."""
    for line in _lines(Path("/proc/self/cgroup")):
        if line.startswith("0::"):
            group = Path("/sys/fs/cgroup") / line[3:].strip().lstrip("/")
            limit = _lines(group / "memory.max")
            current = _lines(group / "memory.current")
            if limit and current and limit[0].strip().isdigit() and current[0].strip().isdigit():
                return max(0, int(limit[0]) - int(current[0]))
    return None


def _address_space_left() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    for line in _lines(Path("/proc/self/status")):
        if line.startswith("VmSize:"):
            return max(0, soft - int(line.split()[1]) * 1024)
    return None


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, ValueError):
        return []
