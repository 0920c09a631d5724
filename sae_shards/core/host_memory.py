"""How much host memory this process may use: the machine's figure, or its cgroup's when a memory
limit is set there and is smaller.

``/proc/meminfo`` and ``sysconf`` describe the whole machine. A SLURM job (``--mem``), a container
(``docker --memory``, a Kubernetes limit) or a systemd slice runs in a cgroup whose memory limit
the kernel enforces by killing the process (OOM), however much the machine has free. The memory
checks therefore use the smaller figure: ``memory_available`` for the ring buffer's budget on the
CPU and the host copies of step checkpoints (``capture.memory``), ``memory_limit`` as the bound on
tensor sizes a safetensors header may declare (``checkpoint_checks.check_declared_sizes``).
``cgroup_memory`` reads the cgroup's figures (v2 and v1) under a root directory, so tests read a
fake tree. Standard library only (``core`` imports torch and it alone).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import NamedTuple

_GIB = 1024**3

V1_UNLIMITED = 2**62
"""cgroup v1 writes "no limit" as the largest page multiple below 2**63 (9223372036854771712
with 4 KiB pages); any limit from here up is none."""

_FILES = {  # hierarchy: (limit file, usage file, memory.stat key of reclaimable file cache)
    "cgroup2": ("memory.max", "memory.current", "inactive_file"),
    "memory": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}
_STANDARD_MOUNTS = [("cgroup2", "/", "/sys/fs/cgroup"), ("memory", "/", "/sys/fs/cgroup/memory")]
"""``(hierarchy, mount root, mount point)`` where ``/proc/self/mountinfo`` cannot be read."""


class CgroupMemory(NamedTuple):
    """This process's cgroup memory limit, in bytes: the tightest over its cgroup and the
    cgroups above it (a SLURM job's limit sits on the job's cgroup, above its steps' and
    tasks')."""

    limit: int  # the smallest limit
    available: int  # the least any limit leaves: limit - (usage - inactive file cache), >= 0


class HostMemory(NamedTuple):
    """A host memory figure this process may use, in bytes, and where it came from."""

    bytes: int  # the one the checks use: the smaller of the two below
    machine: int | None  # the machine's own (physical memory; MemAvailable); None: not known
    cgroup: int | None  # the cgroup's (its limit; what its limit leaves); None: no limit set
    source: str  # what ``machine`` is, for messages: "physical memory" or "MemAvailable"

    @property
    def limited(self) -> bool:
        """Whether a cgroup limit sets the figure (below the machine's own)."""
        return self.cgroup is not None and (self.machine is None or self.cgroup < self.machine)

    def note(self) -> str:
        """What an error quoting this figure adds so the user knows why it is lower than the
        machine's memory and how to raise it; "" when the machine's figure is used."""
        if not self.limited:
            return ""
        than = ("" if self.machine is None
                else f", below the machine's {self.source} of {self.machine / _GIB:.3f} GiB")
        return ("set by this process's cgroup memory limit, e.g. a SLURM job's --mem or a "
                f"container's memory limit{than}; a larger limit raises it")


def memory_limit() -> HostMemory | None:
    """The most memory this process may hold: the machine's physical memory, or its cgroup's
    limit when smaller; None where neither is known."""
    cgroup = cgroup_memory()
    return _smaller(_physical_bytes(), None if cgroup is None else cgroup.limit,
                    "physical memory")


def memory_available() -> HostMemory | None:
    """The memory this process may still allocate now: ``MemAvailable``, or what its cgroup's
    limit leaves when smaller; None where neither is known."""
    cgroup = cgroup_memory()
    return _smaller(_meminfo_available(), None if cgroup is None else cgroup.available,
                    "MemAvailable")


def cgroup_memory(root: Path = Path("/")) -> CgroupMemory | None:
    """This process's cgroup memory limit, or None where no limit is set (or no cgroup is
    found). Read from ``root``'s ``proc/self/cgroup`` (the process's cgroup per hierarchy),
    ``proc/self/mountinfo`` (where each hierarchy is mounted; the standard mount points when it
    cannot be read) and, for the process's cgroup and each one above it up to the mount, v2's
    ``memory.max`` / ``memory.current`` or v1's ``memory.limit_in_bytes`` /
    ``memory.usage_in_bytes``. File cache the kernel reclaims first (``memory.stat``'s inactive
    file pages) is not counted as used, as Kubernetes' working set does not count it: a run that
    has just read a model's weights would otherwise look full."""
    levels = [figures for directory, files in memory_cgroup_dirs(root)
              if (figures := _level(directory, files)) is not None]
    if not levels:
        return None
    return CgroupMemory(min(limit for limit, _ in levels), min(left for _, left in levels))


def memory_cgroup_dirs(root: Path = Path("/")) -> list[tuple[Path, tuple[str, str, str]]]:
    """The directories of this process's cgroup and every cgroup above it up to its
    hierarchy's mount point, under ``root``, for the v2 hierarchy and v1's memory controller,
    each with the files its version reads (``_FILES``); [] without ``proc/self/cgroup``."""
    paths = _cgroup_paths(root)
    out = []
    for hierarchy, mount_root, mount_point in _mounts(root):
        if hierarchy not in paths:
            continue
        top = root / mount_point.lstrip("/")
        path = PurePosixPath(paths[hierarchy])
        # the process's cgroup as seen inside the mount (a container mounts its own cgroup as
        # the root); outside it, or reached through "..": the mount's own cgroup only
        parts = path.relative_to(mount_root).parts if path.is_relative_to(mount_root) else ()
        parts = () if ".." in parts else parts
        out += [(top.joinpath(*parts[:n]), _FILES[hierarchy])
                for n in range(len(parts), -1, -1)]
    return out


def _cgroup_paths(root: Path) -> dict[str, str]:
    """``{hierarchy: the process's cgroup path}`` from ``proc/self/cgroup``'s lines
    ``id:controllers:path`` (v2: ``0::path``; v1's memory controller: ``memory`` among the
    controllers)."""
    paths = {}
    for line in _lines(root / "proc/self/cgroup"):
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            paths["cgroup2"] = path
        elif "memory" in controllers.split(","):
            paths["memory"] = path
    return paths


def _mounts(root: Path) -> list[tuple[str, str, str]]:
    """``(hierarchy, mount root, mount point)`` of every cgroup2 mount and every v1 mount with
    the memory controller, from ``proc/self/mountinfo`` (fields: id, parent, device, root,
    mount point, options..., ``-``, type, source, super options)."""
    if not (root / "proc/self/mountinfo").is_file():
        return _STANDARD_MOUNTS
    mounts = []
    for line in _lines(root / "proc/self/mountinfo"):
        fields = line.split()
        end = fields.index("-", 6) if "-" in fields[6:] else len(fields)  # optional fields end
        if len(fields) < end + 4:
            continue
        kind, options = fields[end + 1], fields[end + 3]
        if kind == "cgroup2":
            mounts.append(("cgroup2", fields[3], fields[4]))
        elif kind == "cgroup" and "memory" in options.split(","):
            mounts.append(("memory", fields[3], fields[4]))
    return mounts


def _level(directory: Path, files: tuple[str, str, str]) -> tuple[int, int] | None:
    """``(limit, what it leaves)`` of one cgroup, or None where it sets no limit."""
    limit_file, usage_file, cache_key = files
    limit = _read_int(directory / limit_file)
    if limit is None or limit >= V1_UNLIMITED:
        return None
    usage = _read_int(directory / usage_file) or 0
    cache = next((int(v) for k, v in _pairs(directory / "memory.stat") if k == cache_key), 0)
    return limit, max(limit - max(usage - cache, 0), 0)


def _read_int(file: Path) -> int | None:
    """The integer a cgroup file holds; None for v2's "max", or a file missing or unreadable."""
    try:
        return int(file.read_text().strip())
    except (OSError, ValueError):
        return None


def _pairs(file: Path) -> list[tuple[str, str]]:
    """The ``key value`` lines of a ``memory.stat`` file."""
    return [(f[0], f[1]) for f in map(str.split, _lines(file))
            if len(f) == 2 and f[1].isdigit()]


def _lines(file: Path) -> list[str]:
    try:
        return file.read_text().splitlines()
    except OSError:
        return []


def _smaller(machine: int | None, cgroup: int | None, source: str) -> HostMemory | None:
    """The smaller of the machine's and the cgroup's figure (either may be unknown)."""
    known = [b for b in (machine, cgroup) if b is not None]
    return HostMemory(min(known), machine, cgroup, source) if known else None


def _physical_bytes() -> int | None:
    """This machine's physical memory in bytes (``sysconf``); None where the OS does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def _meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes; None where it cannot be read."""
    for line in _lines(Path("/proc/meminfo")):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file counts kB
    return None
