"""Memory limits the kernel enforces, and a cold page cache, for benchmark runs.

A budget is only a claim while the process keeps its own accounts; a memory cgroup makes the
kernel hold the process to it, counting its resident memory and the page cache it fills
together. ``run_limited`` runs a command in a fresh memory cgroup (v2 where its memory
controller can be delegated, else the v1 memory controller) and reports the cgroup's peak
usage and whether the kernel killed anything. ``evict`` drops a file tree's pages from the page
cache first, so that reads a run makes come from storage and not from what an earlier process
left cached.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


class CgroupUnavailable(RuntimeError):
    """No memory cgroup can be created here (the message says what was tried and why not)."""


@dataclass
class LimitedRun:
    """What the kernel saw of one command run under a memory limit."""

    returncode: int
    limit_bytes: int
    peak_bytes: int | None  # the cgroup's peak (RSS and page cache), None where not reported
    oom_kills: int  # processes the kernel's OOM killer ended inside the cgroup
    killed: bool  # the command ended by a kill signal or had a process OOM-killed
    cgroup: str  # "v1" or "v2": the controller used
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def _own_path(version: str) -> str:
    """This process's cgroup path in hierarchy ``version`` ("v1": the memory controller's)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if version == "v2" and hid == "0" and controllers == "":
            return path
        if version == "v1" and "memory" in controllers.split(","):
            return path
    raise CgroupUnavailable(f"/proc/self/cgroup names no {version} memory cgroup")


def _mounts() -> dict[str, Path]:
    """Mount points: "v2" of the cgroup2 hierarchy, "v1" of the v1 memory controller."""
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, opts = line.split()[:4]
        if kind == "cgroup2" and "v2" not in found:
            found["v2"] = Path(where)
        elif kind == "cgroup" and "memory" in opts.split(",") and "v1" not in found:
            found["v1"] = Path(where)
    return found


class MemoryCgroup:
    """A fresh child memory cgroup limited to ``limit_bytes``; ``remove`` deletes it."""

    def __init__(self, limit_bytes: int, name: str | None = None):
        self.limit_bytes = int(limit_bytes)
        name = name or f"flashjax-bench-{os.getpid()}-{time.monotonic_ns()}"
        mounts = _mounts()
        problems = []
        for version in ("v2", "v1"):
            if version not in mounts:
                problems.append(f"{version}: not mounted")
                continue
            try:
                self.path = self._create(version, mounts[version], name)
                self.version = version
                return
            except (OSError, CgroupUnavailable) as e:
                problems.append(f"{version}: {e}")
        raise CgroupUnavailable("cannot create a memory cgroup (" + "; ".join(problems)
                                + "); run as a user who may write the cgroup tree, or in a "
                                "delegated cgroup (e.g. systemd-run --user --scope -p "
                                "Delegate=yes)")

    def _create(self, version: str, mount: Path, name: str) -> Path:
        parent = mount / _own_path(version).lstrip("/")
        if version == "v2":
            if "memory" not in (parent / "cgroup.controllers").read_text().split():
                raise CgroupUnavailable(f"{parent}: the memory controller is not available "
                                        f"there (it is bound to the v1 hierarchy)")
            subtree = (parent / "cgroup.subtree_control").read_text().split()
            if "memory" not in subtree:
                (parent / "cgroup.subtree_control").write_text("+memory")
        path = parent / name
        path.mkdir()
        try:
            if version == "v2":
                (path / "memory.max").write_text(str(self.limit_bytes))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
            else:
                (path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
                memsw = path / "memory.memsw.limit_in_bytes"
                if memsw.exists():  # swap counted too: no escape from the limit into swap
                    memsw.write_text(str(self.limit_bytes))
        except OSError:
            path.rmdir()
            raise
        return path

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def peak_bytes(self) -> int | None:
        name = "memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def remove(self) -> None:
        for _ in range(50):  # the last process may take a moment to leave
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def available() -> str | None:
    """Why no memory cgroup can be made here, or None when one can."""
    try:
        MemoryCgroup(1 << 30).remove()
        return None
    except CgroupUnavailable as e:
        return str(e)


def run_limited(cmd: list[str], limit_bytes: int, *, env: dict | None = None,
                timeout: float | None = None, stdout=None, stderr=None) -> LimitedRun:
    """Run ``cmd`` in a fresh memory cgroup of ``limit_bytes`` (the child joins it before it
    executes, so everything it allocates is counted) and return what the kernel saw."""
    group = MemoryCgroup(limit_bytes)
    # the child joins the cgroup from a shell that then becomes the command: no Python code
    # runs between fork and exec (the parent may be multithreaded, as JAX is)
    join = ['/bin/sh', '-c', 'echo $$ > "$0" && exec "$@"', str(group.procs), *cmd]
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(join, env=env, stdout=stdout, stderr=stderr)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
        oom = group.oom_kills()
        return LimitedRun(returncode=returncode, limit_bytes=group.limit_bytes,
                          peak_bytes=group.peak_bytes(), oom_kills=oom,
                          killed=returncode < 0 or oom > 0, cgroup=group.version,
                          seconds=time.perf_counter() - start)
    finally:
        group.remove()


def files_under(*paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(f for f in sorted(p.rglob("*")) if f.is_file() and not f.is_symlink())
    return out


def evict(*paths) -> int:
    """Drop the page-cache pages of every file under ``paths`` (posix_fadvise DONTNEED, after
    flushing dirty pages); returns the bytes of the files advised."""
    total = 0
    for f in files_under(*paths):
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd) if os.access(f, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def cached_bytes(*paths) -> int | None:
    """Bytes of the files under ``paths`` now in the page cache (mmap and mincore), None where
    that cannot be asked."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    total = 0
    for f in files_under(*paths):
        size = f.stat().st_size
        if size == 0:
            continue
        with open(f, "rb") as fh:
            ptr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
        if ptr is None or ptr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = (ctypes.c_ubyte * (-(-size // page)))()
            if libc.mincore(ptr, size, vec) != 0:
                return None
            total += min(size, sum(v & 1 for v in bytes(vec)) * page)
        finally:
            libc.munmap(ptr, size)
    return total
