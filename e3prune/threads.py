"""Threads follow the pod: size torch's thread pools from the CPUs this process may use.

torch (OpenMP, MKL) starts one thread per core it sees. In a container that is the node's cores
(or its affinity mask), not the pod's CPU limit: a pod limited to 4 CPUs on a 64-core node runs 64
threads on a 4-CPU CFS quota and is throttled. One function, :func:`follow_cpu_quota`, called at
the start of every heavy step, sets the pools from :func:`cpu_quota`: the smallest of

- the cgroup v2 ``cpu.max`` (quota / period; ``max`` is unlimited) of this process's cgroup and
  its ancestors, on the ``cgroup2`` mount (usually ``/sys/fs/cgroup``);
- the cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (``-1`` is unlimited) on the mount
  of the ``cpu`` controller (usually ``/sys/fs/cgroup/cpu,cpuacct``);
- the CPU affinity mask (``taskset``, a cpuset);
- ``os.cpu_count()``.

A fractional quota rounds up (1.5 CPUs → 2 threads), never below 1. A file that is missing,
unreadable or malformed is ignored (the next limit applies), never an error.

``OMP_NUM_THREADS`` set by the user wins (the pools are left as torch sized them from it), and
``E3PRUNE_THREADS_FOLLOW_QUOTA=0`` turns the whole thing off (torch's own default; it exists for
the before/after measurement in ``benchmarks/threads.py``). See docs/operations.md, "Image and
resources".
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Set to ``0`` to leave torch's thread pools as torch sizes them (the behaviour before this module).
OPT_OUT_ENV = "E3PRUNE_THREADS_FOLLOW_QUOTA"
#: Exported for child processes (accelerate / torchrun workers) when the user has not set them.
CHILD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class CpuLimits:
    """What limits this process's CPUs; ``None`` where that limit is absent or unreadable."""

    cgroup: float | None  # CPUs granted by the tightest cgroup quota
    cgroup_file: str | None  # "cpu.max" (v2) or "cpu.cfs_quota_us" (v1): where ``cgroup`` came from
    affinity: int | None  # CPUs in the affinity mask
    cores: int  # os.cpu_count()

    @property
    def cpus(self) -> int:
        """The smallest limit, a fractional quota rounded up, at least 1."""
        limits = [self.cores]
        if self.affinity is not None:
            limits.append(self.affinity)
        if self.cgroup is not None:
            limits.append(math.ceil(self.cgroup - 1e-9))  # 4.0000000001 from float division is still 4
        return max(1, min(limits))

    def describe(self) -> str:
        """``cgroup cpu.max 4.0, affinity 16, cores 64``."""
        cgroup = f"cgroup {self.cgroup_file} {round(self.cgroup, 2)}" if self.cgroup is not None else "cgroup no limit"
        affinity = f"affinity {self.affinity}" if self.affinity is not None else "affinity unknown"
        return f"{cgroup}, {affinity}, cores {self.cores}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo`` octal."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class _Mount:
    root: str  # the directory of the cgroup hierarchy that is mounted
    point: str  # where it is mounted
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: the controllers of this hierarchy


def _mounts(proc: Path) -> list[_Mount]:
    """The cgroup mounts from ``<proc>/self/mountinfo``; malformed lines are skipped."""
    text = _read(proc / "self" / "mountinfo")
    mounts = []
    for line in (text or "").splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        fstype, options = fields[sep + 1], fields[sep + 3]
        if fstype == "cgroup2":
            mounts.append(_Mount(_unescape(fields[3]), _unescape(fields[4]), 2, frozenset()))
        elif fstype == "cgroup":
            mounts.append(_Mount(_unescape(fields[3]), _unescape(fields[4]), 1, frozenset(options.split(","))))
    return mounts


def _memberships(proc: Path) -> tuple[str | None, dict[str, str]]:
    """This process's cgroup v2 path and its v1 paths by controller, from ``<proc>/self/cgroup``."""
    v2, v1 = None, {}
    for line in (_read(proc / "self" / "cgroup") or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        else:
            for controller in controllers.split(","):
                v1[controller] = path
    return v2, v1


def _cgroup_dirs(root: Path, mount_point: str, mount_root: str, cgroup_path: str) -> list[Path]:
    """The process's cgroup directory under a mount, then each ancestor up to the mount point.

    The effective quota is the tightest along the way (a pod's limit may sit on its pod-level
    cgroup, the container's on its own). Without a cgroup namespace ``/proc/self/cgroup`` shows the
    host path and the mount's root is a prefix of it; a path outside the mount is read at the mount.
    """
    top = root / mount_point.lstrip("/")
    rel = cgroup_path
    if mount_root != "/":
        rel = cgroup_path[len(mount_root) :] if (cgroup_path + "/").startswith(mount_root.rstrip("/") + "/") else "/"
    parts = [p for p in rel.split("/") if p and p != ".."]
    leaf = top.joinpath(*parts)
    while parts and not leaf.is_dir():  # a path this mount does not show: start where it exists
        parts.pop()
        leaf = top.joinpath(*parts)
    dirs = [top.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return dirs


def _v2_quota(directory: Path) -> float | None:
    """CPUs from ``cpu.max`` (``"<quota> <period>"``; ``max`` is unlimited); None if absent or malformed."""
    text = _read(directory / "cpu.max")
    if text is None:
        return None
    fields = text.split()
    if not fields or fields[0] == "max" or len(fields) > 2:
        return None
    try:
        quota = int(fields[0])
        period = int(fields[1]) if len(fields) == 2 else 100_000  # the kernel's default period
    except ValueError:
        log.debug("ignoring malformed %s: %r", directory / "cpu.max", text)
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    """CPUs from ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (``-1`` is unlimited); None if absent or malformed."""
    quota_text, period_text = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota_text is None or period_text is None:
        return None
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        log.debug("ignoring malformed cpu.cfs_quota_us / cpu.cfs_period_us in %s", directory)
        return None
    return quota / period if quota > 0 and period > 0 else None


def _tightest(dirs: list[Path], read) -> float | None:
    quotas = [q for q in (read(d) for d in dirs) if q is not None]
    return min(quotas) if quotas else None


def _cgroup_quota(root: Path, proc: Path) -> tuple[float | None, str | None]:
    """The tightest cgroup CPU quota (v2 and v1) of this process, and the file it came from."""
    v2_path, v1_paths = _memberships(proc)
    mounts = _mounts(proc)
    if not mounts:  # no mountinfo: the usual places
        mounts = [_Mount("/", "/sys/fs/cgroup", 2, frozenset())] + [
            _Mount("/", f"/sys/fs/cgroup/{name}", 1, frozenset(name.split(","))) for name in ("cpu,cpuacct", "cpu")
        ]
    found: list[tuple[float, str]] = []
    for mount in mounts:
        if mount.version == 2 and v2_path is not None:
            q = _tightest(_cgroup_dirs(root, mount.point, mount.root, v2_path), _v2_quota)
            if q is not None:
                found.append((q, "cpu.max"))
        elif mount.version == 1 and "cpu" in mount.controllers and "cpu" in v1_paths:
            q = _tightest(_cgroup_dirs(root, mount.point, mount.root, v1_paths["cpu"]), _v1_quota)
            if q is not None:
                found.append((q, "cpu.cfs_quota_us"))
    if not found:
        return None, None
    return min(found)


def _affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0)) or None
    except (AttributeError, OSError):  # not on Linux
        return None


def cpu_limits(root: str | os.PathLike = "/", proc: str | os.PathLike = "/proc") -> CpuLimits:
    """Each limit on this process's CPUs; ``root`` and ``proc`` point tests at fake trees."""
    quota, source = _cgroup_quota(Path(root), Path(proc))
    return CpuLimits(cgroup=quota, cgroup_file=source, affinity=_affinity(), cores=os.cpu_count() or 1)


def cpu_quota(root: str | os.PathLike = "/", proc: str | os.PathLike = "/proc") -> int:
    """The number of CPUs this process may use: the smallest of the cgroup v2 and v1 quotas, the
    affinity mask and ``os.cpu_count()``; a fractional quota rounds up, never below 1."""
    return cpu_limits(root, proc).cpus


#: What this process exported (not the user's), so that a second step in the same process follows again.
_exported: dict[str, str] = {}


def user_threads() -> int | None:
    """``OMP_NUM_THREADS`` as the user set it (not as :func:`follow_cpu_quota` exported it), else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value and value == _exported.get("OMP_NUM_THREADS"):
        return None
    try:
        n = int(value.split(",")[0])  # OpenMP allows a list per nesting level
    except ValueError:
        return None
    return n if n > 0 else None


def follow_cpu_quota(root: str | os.PathLike = "/", proc: str | os.PathLike = "/proc") -> int:
    """Size torch's thread pools from :func:`cpu_quota`; log one line; return the intra-op threads.

    ``OMP_NUM_THREADS`` set by the user is respected, and ``E3PRUNE_THREADS_FOLLOW_QUOTA=0`` leaves
    torch's default: both return ``torch.get_num_threads()`` and change nothing. Otherwise the
    intra-op pool gets N threads, the inter-op pool too if it has not started yet (torch sizes it
    once per process), and ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are exported as N for child
    processes (accelerate / torchrun workers) unless set.
    """
    import torch

    limits = cpu_limits(root, proc)
    if os.environ.get(OPT_OUT_ENV, "").strip() == "0":
        n = torch.get_num_threads()
        log.info("threads: %d (torch's default, %s=0; %s)", n, OPT_OUT_ENV, limits.describe())
        return n
    if user_threads() is not None:
        n = torch.get_num_threads()
        log.info("threads: %d (OMP_NUM_THREADS=%s set by the user; %s)", n, os.environ["OMP_NUM_THREADS"], limits.describe())
        return n
    n = limits.cpus
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set, or parallel work has started: it can be set once per process
        pass
    for name in CHILD_ENV:
        if name not in os.environ or os.environ[name] == _exported.get(name):
            os.environ[name] = _exported[name] = str(n)
    log.info("threads: %d (%s)", n, limits.describe())
    return n
