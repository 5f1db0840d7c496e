"""The storage's random-read limit: throughput and latency against read size and concurrency.

"LLM in a flash" plots flash random-read throughput growing with chunk size and thread count;
`device_limit` measures the same curve for the storage holding a file, so that the reader's
throughput can be put next to what the device can do ("device limit at the bundle size",
`throughput_at`). Linux only: reads use ``O_DIRECT`` and the check uses ``/proc/self/io``.
"""

from __future__ import annotations

import bisect
import errno
import math
import mmap
import os
import random
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from flashjax.store.reader import SUBMIT_EVERY, _aligned, storage_read_bytes

DEFAULT_CHUNK_SIZES = (4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)
DEFAULT_CONCURRENCIES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_FILE_BYTES = 2 << 30
PIECE_BYTES = 64 << 20  # scratch file written in pieces this big: bounded memory, smooth progress
ALIGN = 4096  # O_DIRECT wants offsets and sizes aligned to the logical block; 4 KiB covers all
SCRATCH_NAME = "flashjax-device-limit-{}.bin"


class DirectIOUnsupportedError(OSError):
    """The filesystem refused ``O_DIRECT`` (EINVAL), so reads would be served by the page cache."""


def device_limit(path, *, chunk_sizes=DEFAULT_CHUNK_SIZES, concurrencies=DEFAULT_CONCURRENCIES,
                 seconds=1.0, file_bytes=None, seed=0, allow_page_cache=False, keep=False,
                 progress=True, method: str = "best") -> dict:
    """Measure random-read throughput and latency of the storage holding `path` (a file, a
    list of files, or a directory for a scratch file).

    For each (chunk size, concurrency) pair, random chunk-aligned reads of one chunk each go
    into page-aligned buffers for about `seconds`, `concurrency` of them in flight: with method
    ``"threads"``, `concurrency` Python threads each calling ``os.preadv`` (which releases the
    GIL, so the threads overlap in the kernel); with ``"io_uring"``, one thread keeping an
    io_uring ring full. On a machine with few cores either host side can be what limits a
    point rather than the device (seen here with 32 in flight: 4 KiB reads at 0.16-0.21 GB/s
    with threads against 0.22-0.24 through io_uring, 16 KiB reads at 0.59-0.62 against
    0.55-0.57), so by default (``"best"``) each point is measured both ways and keeps the
    faster; each point's ``method`` says which. The file is
    opened with ``O_RDONLY | O_DIRECT``: every read goes to the device and none to the page
    cache, so the file need not be larger than RAM; it only needs to be large enough that reads
    spread over the device rather than one hot region (2 GiB is far beyond a drive's own DRAM
    cache, though a virtual disk's host may still cache it, which the numbers would show as
    throughput above the hardware's). The bytes the kernel read from storage (``read_bytes`` in
    ``/proc/self/io``) are recorded per point next to the bytes requested; a warning is issued
    when they fall below 90% of them (e.g. tmpfs accepts ``O_DIRECT`` but has no storage).

    Args:
      path: a file to read (at least the largest chunk); a list of files, each read spread
        over all of them in proportion to their size (a store's own shard files: the bytes the
        engine reads, where they lie, under whatever caching the storage does for them); or a
        directory in which to write a scratch file of random bytes (random so that no
        compressing or zero-detecting layer can shortcut the reads), fsync'd before measuring
        and deleted afterwards unless `keep`.
        A kept scratch file of the same size is reused.
      chunk_sizes: read sizes in bytes, multiples of 4096.
      concurrencies: thread counts.
      seconds: how long to read at each point.
      file_bytes: scratch file size (directories only); default 2 GiB, or half the free space
        when that is less. The result's ``file_note`` says which.
      seed: seeds the scratch contents and the read offsets.
      allow_page_cache: where the filesystem refuses ``O_DIRECT`` (e.g. some tmpfs or FUSE),
        read through the page cache instead, evicting the file's pages with
        ``POSIX_FADV_DONTNEED`` before each point; ``storage_ratio`` then shows how many reads
        the cache still served.
      keep: keep the scratch file.
      progress: show tqdm bars for the scratch file and the sweep.
      method: ``"best"`` (both where io_uring works and reads are O_DIRECT, else threads),
        ``"io_uring"`` or ``"threads"``.

    Returns:
      A JSON-ready dict: ``path``, ``file``, ``filesystem``, ``direct_io``, ``method``,
      ``file_bytes``,
      ``file_note``, ``seconds``, ``seed``, ``cpu_count``, ``storage_ratio_min`` and ``points``,
      a list with, per (chunk, concurrency): ``chunk_bytes``, ``concurrency``, ``reads``,
      ``bytes``, ``wall_s``, ``gb_s`` (1e9 bytes/s), ``median_us``, ``p90_us``,
      ``storage_bytes`` (None where ``/proc/self/io`` is missing), ``storage_ratio`` and
      ``method``.

    Raises:
      DirectIOUnsupportedError: ``O_DIRECT`` refused and `allow_page_cache` is False.
    """
    if not hasattr(os, "O_DIRECT"):
        raise OSError(f"device_limit needs Linux O_DIRECT; os.O_DIRECT is missing on {os.name}")
    chunk_sizes, concurrencies = _check_sweep(chunk_sizes, concurrencies, seconds)
    files = None
    if isinstance(path, (list, tuple)):
        if not path:
            raise FileNotFoundError("device_limit: not files: none given")
        files, path = [Path(f) for f in path], Path(os.path.commonpath([str(f) for f in path]))
    else:
        path = Path(path)
    scratch = None
    if files is not None:
        if file_bytes is not None:
            raise ValueError("file_bytes applies only when path is a directory")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"device_limit: not files: {missing}")
        sizes = [f.stat().st_size for f in files]
        file_bytes = sum(sizes)
        file_note = f"{len(files)} existing files, {_human(file_bytes)}"
        if max(sizes) < max(chunk_sizes):
            raise ValueError(f"no file under {path} holds the largest chunk {max(chunk_sizes)}")
        targets = files
    elif path.is_dir():
        file_bytes, file_note = _scratch_size(path, file_bytes, max(chunk_sizes))
        scratch = _make_scratch(path, file_bytes, seed, progress)
        targets = [scratch]
    elif path.is_file():
        if file_bytes is not None:
            raise ValueError(f"file_bytes={file_bytes} applies only when path is a directory; "
                             f"{path} is a file")
        targets, file_bytes = [path], path.stat().st_size
        file_note = f"existing file, {_human(file_bytes)}"
        if file_bytes < max(chunk_sizes):
            raise ValueError(f"{path} holds {file_bytes} bytes, less than the largest chunk "
                             f"{max(chunk_sizes)}")
    else:
        raise FileNotFoundError(f"device_limit: {path} is neither a file nor a directory")

    try:
        opened = []
        try:
            for target in targets:
                opened.append(_open(target, allow_page_cache, min(chunk_sizes)))
            fds = [fd for fd, _ in opened]
            direct = all(d for _, d in opened)
            methods = _sweep_methods(method, direct)
            lengths = [os.fstat(fd).st_size for fd in fds]
            points = []
            sweep = [(c, n) for c in chunk_sizes for n in concurrencies]
            for chunk, conc in tqdm(sweep, desc="device limit", unit="point",
                                    disable=not progress):
                if not direct:
                    for fd in fds:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                tries = []
                for name in methods:
                    measure = _measure_point_uring if name == "io_uring" else _measure_point
                    tries.append({**measure(fds, [n // chunk for n in lengths], chunk, conc,
                                            seconds, seed), "method": name})
                points.append(max(tries, key=lambda p: p["gb_s"]))
        finally:
            for fd, _ in opened:
                os.close(fd)
    finally:
        if scratch is not None and not keep:
            scratch.unlink()

    ratios = [p["storage_ratio"] for p in points if p["storage_ratio"] is not None]
    if ratios and min(ratios) < 0.9:
        warnings.warn(f"device_limit: at some points only {min(ratios):.0%} of the bytes read "
                      f"came from storage ({_filesystem_of(targets[0])}); those reads were served "
                      f"by a cache, so they do not measure the device", stacklevel=2)
    return {
        "path": os.path.abspath(path),
        "file": os.path.abspath(targets[0]) if len(targets) == 1 else None,
        "files": len(targets),
        "filesystem": _filesystem_of(targets[0]),
        "direct_io": direct,
        "method": " or ".join(methods),
        "file_bytes": file_bytes,
        "file_note": file_note,
        "seconds": seconds,
        "seed": seed,
        "cpu_count": os.cpu_count(),
        "storage_ratio_min": min(ratios) if ratios else None,
        "points": points,
    }


def batch_rate(files, *, chunk: int, batch: int, concurrency: int = 32, seconds: float = 1.0,
               seed: int = 0) -> dict | None:
    """The device's rate for the engine's own read pattern: random O_DIRECT reads of `chunk`
    bytes in batches of `batch`, at most `concurrency` in flight, each batch finished before the
    next starts (as one layer's row set is read before its FFN can finish). A batch smaller
    than a few times `concurrency` spends part of its time filling and draining the queue, so it
    gets less than `device_limit`'s sustained rate at the same chunk and concurrency; this is
    the figure to put a reader's batches against. The reads come from one thread through
    io_uring (no per-read thread or copy), for about `seconds`.

    Args:
      files: the files to read, each picked in proportion to its size (a store's shard files).
      chunk: bytes per read, a multiple of 4096.
      batch: reads per batch, at least 1.
      concurrency: reads in flight at most.
      seconds: how long to read.
      seed: seeds the offsets.

    Returns:
      None where io_uring is unavailable (no ``uring_api``, or refused by the system); else a
      JSON-ready dict: ``chunk_bytes``, ``batch``, ``concurrency``, ``batches``, ``bytes``,
      ``wall_s``, ``gb_s``, ``median_batch_ms``, ``storage_bytes`` and ``storage_ratio``.
    """
    uring_api = _uring_api()
    if uring_api is None:
        return None
    if chunk <= 0 or chunk % ALIGN or batch < 1 or concurrency < 1 or not seconds > 0:
        raise ValueError(f"batch_rate: chunk={chunk} (a positive multiple of {ALIGN}), "
                         f"batch={batch}, concurrency={concurrency} (both >= 1) and "
                         f"seconds={seconds} (> 0) are required")
    fds = [os.open(f, os.O_RDONLY | os.O_DIRECT) for f in files]
    try:
        n_chunks = np.array([os.fstat(fd).st_size // chunk for fd in fds])
        if not n_chunks.sum():
            raise ValueError(f"batch_rate: no file holds a chunk of {chunk} bytes")
        depth = min(batch, concurrency)
        mem, view = _aligned(depth * chunk)  # one chunk per read in flight
        bufs = [view[i * chunk:(i + 1) * chunk] for i in range(depth)]
        ring = uring_api.Ring(max(64, 2 * depth))
        rng = np.random.default_rng(seed)
        times, reads = [], 0
        io_before = storage_read_bytes()
        start = time.perf_counter()
        try:
            while time.perf_counter() - start < seconds:
                # one file per batch (a layer's shard), distinct chunks in ascending order (the
                # engine reads a layer's rows sorted)
                k = int(rng.choice(len(fds), p=n_chunks / n_chunks.sum()))
                picks = rng.choice(n_chunks[k], batch, replace=batch > n_chunks[k])
                offsets = (np.sort(picks) * chunk).tolist()
                fd, free = fds[k], list(range(depth))
                t0, queued, done = time.perf_counter(), 0, 0
                while done < batch:
                    while queued < batch and free:
                        slot = free.pop()
                        ring.prepare_read(fd, bufs[slot], offsets[queued], user_data=slot)
                        queued += 1
                        if (queued - 1) % SUBMIT_EVERY == 0:  # as the engine's reader does
                            ring.submit()
                    for completion in ring.wait():
                        if completion.res != chunk:
                            raise OSError(f"batch_rate: a read returned {completion.res}, "
                                          f"expected {chunk} bytes")
                        free.append(completion.user_data)
                        done += 1
                times.append(time.perf_counter() - t0)
                reads += batch
        finally:
            ring.close()
        io_after = storage_read_bytes()
    finally:
        for fd in fds:
            os.close(fd)
    nbytes = reads * chunk
    wall = float(np.sum(times))
    storage = None if io_before is None else io_after - io_before
    return {
        "chunk_bytes": chunk,
        "batch": batch,
        "concurrency": concurrency,
        "batches": len(times),
        "bytes": nbytes,
        "wall_s": wall,
        "gb_s": nbytes / wall / 1e9,
        "median_batch_ms": float(np.median(times) * 1e3),
        "storage_bytes": storage,
        "storage_ratio": None if storage is None else storage / nbytes,
    }


def throughput_at(result: dict, chunk_bytes: int, concurrency: int) -> float:
    """GB/s at `chunk_bytes` and `concurrency`, linear in log2(chunk) between measured sizes.

    `concurrency` must be one that was measured; `chunk_bytes` must lie within the measured
    chunk sizes (no extrapolation).
    """
    row = sorted((p["chunk_bytes"], p["gb_s"]) for p in result["points"]
                 if p["concurrency"] == concurrency)
    if not row:
        measured = sorted({p["concurrency"] for p in result["points"]})
        raise ValueError(f"throughput_at: concurrency={concurrency} was not measured; "
                         f"measured {measured}")
    chunks, gb_s = zip(*row)
    if not chunks[0] <= chunk_bytes <= chunks[-1]:
        raise ValueError(f"throughput_at: chunk_bytes={chunk_bytes} is outside the measured "
                         f"range {chunks[0]}..{chunks[-1]}")
    return float(np.interp(math.log2(chunk_bytes), np.log2(chunks), gb_s))


def plot_device_limit(result: dict, png_path, mark_chunk=None) -> Path:
    """Write a PNG: throughput and median latency against chunk size, one line per concurrency.

    `mark_chunk` (bytes), typically the bundle row size, draws a vertical marker on both panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = sorted({p["chunk_bytes"] for p in result["points"]})
    fig, (ax_gb, ax_lat) = plt.subplots(1, 2, figsize=(13, 5))
    for conc in sorted({p["concurrency"] for p in result["points"]}):
        row = sorted((p["chunk_bytes"], p["gb_s"], p["median_us"]) for p in result["points"]
                     if p["concurrency"] == conc)
        x, gb_s, lat = zip(*row)
        label = f"{conc} in flight"
        ax_gb.plot(x, gb_s, marker="o", label=label)
        ax_lat.plot(x, lat, marker="o", label=label)
    for ax in (ax_gb, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(chunks, [f"{c // 1024}" for c in chunks])
        ax.set_xlabel("chunk size (KiB)")
        ax.grid(True, which="both", alpha=0.3)
        if mark_chunk is not None:
            ax.axvline(mark_chunk, color="black", linestyle="--",
                       label=f"bundle row {mark_chunk / 1024:g} KiB")
    ax_gb.set_ylabel("throughput (GB/s)")
    ax_gb.set_title("random-read throughput")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("median latency per read (µs)")
    ax_lat.set_title("random-read latency")
    ax_gb.legend(fontsize=8)
    mode = "O_DIRECT" if result["direct_io"] else "page cache evicted"
    fig.suptitle(f"{result['file']} ({result['filesystem']}, {mode}, "
                 f"{_human(result['file_bytes'])}, {result['seconds']:g} s/point)", fontsize=10)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def format_table(result: dict, *, field: str = "gb_s") -> str:
    """A text table of one per-point field: rows chunk sizes, columns concurrencies.

    `field` is ``gb_s`` (default), ``median_us``, ``p90_us`` or ``storage_ratio``.
    """
    units = {"gb_s": "GB/s", "median_us": "median µs", "p90_us": "p90 µs",
             "storage_ratio": "storage bytes / bytes read"}
    if field not in units:
        raise ValueError(f"format_table: field={field!r}; expected one of {sorted(units)}")
    cell = {(p["chunk_bytes"], p["concurrency"]): p[field] for p in result["points"]}
    chunks = sorted({c for c, _ in cell})
    concs = sorted({n for _, n in cell})
    fmt = "{:.1f}" if field.endswith("_us") else "{:.3f}"
    lines = [f"{units[field]}; rows: chunk size, columns: reads in flight",
             f"{'chunk':>9}" + "".join(f"{n:>9}" for n in concs)]
    for c in chunks:
        values = (cell.get((c, n)) for n in concs)
        lines.append(f"{c // 1024:>6}KiB" + "".join(
            f"{'-' if v is None else fmt.format(v):>9}" for v in values))
    return "\n".join(lines)


def _check_sweep(chunk_sizes, concurrencies, seconds):
    chunk_sizes, concurrencies = tuple(chunk_sizes), tuple(concurrencies)
    if not chunk_sizes or not concurrencies:
        raise ValueError(f"device_limit: empty sweep, chunk_sizes={chunk_sizes}, "
                         f"concurrencies={concurrencies}")
    bad = [c for c in chunk_sizes if c <= 0 or c % ALIGN]
    if bad:
        raise ValueError(f"device_limit: chunk_sizes {bad} are not positive multiples of {ALIGN} "
                         f"(O_DIRECT alignment)")
    if any(n < 1 for n in concurrencies):
        raise ValueError(f"device_limit: concurrencies={concurrencies} must all be >= 1")
    if not seconds > 0:
        raise ValueError(f"device_limit: seconds={seconds} must be > 0")
    return chunk_sizes, concurrencies


def _scratch_size(directory: Path, file_bytes, largest_chunk: int) -> tuple[int, str]:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if file_bytes is None:
        file_bytes = min(DEFAULT_FILE_BYTES, free // 2 // PIECE_BYTES * PIECE_BYTES)
        note = (f"scratch file, {_human(file_bytes)}"
                + (" (default)" if file_bytes == DEFAULT_FILE_BYTES else
                   f" (default {_human(DEFAULT_FILE_BYTES)} reduced to half of the "
                   f"{_human(free)} free in {directory})"))
    else:
        note = f"scratch file, {_human(file_bytes)} (requested)"
        if file_bytes > free:
            raise OSError(errno.ENOSPC, f"device_limit: file_bytes={file_bytes} exceeds the "
                          f"{free} bytes free in {directory}")
    if file_bytes < largest_chunk or file_bytes % ALIGN:
        raise ValueError(f"device_limit: scratch file of {file_bytes} bytes in {directory} must "
                         f"be a multiple of {ALIGN} and at least the largest chunk "
                         f"{largest_chunk} ({_human(free)} free)")
    return file_bytes, note


def _make_scratch(directory: Path, file_bytes: int, seed: int, progress: bool) -> Path:
    """Write (or reuse a kept) scratch file of random bytes, fsync'd; renamed into place last."""
    final = directory / SCRATCH_NAME.format(file_bytes)
    if final.is_file() and final.stat().st_size == file_bytes:
        return final
    partial = final.with_suffix(".partial")
    rng = np.random.default_rng(seed)
    with open(partial, "wb", buffering=0) as f, tqdm(
            total=file_bytes, unit="B", unit_scale=True, desc="scratch file",
            disable=not progress) as bar:
        for start in range(0, file_bytes, PIECE_BYTES):
            piece = rng.bytes(min(PIECE_BYTES, file_bytes - start))
            f.write(piece)
            bar.update(len(piece))
        os.fsync(f.fileno())
    partial.rename(final)
    return final


def _open(path: Path, allow_page_cache: bool, probe_bytes: int) -> tuple[int, bool]:
    """Open for O_DIRECT reads, probing one read since some filesystems refuse only then."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            with mmap.mmap(-1, probe_bytes) as buf:
                os.preadv(fd, [buf], 0)
        except OSError:
            os.close(fd)
            raise
        return fd, True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        if not allow_page_cache:
            raise DirectIOUnsupportedError(
                errno.EINVAL, f"O_DIRECT refused for {path} on filesystem "
                f"{_filesystem_of(path)}; reads would come from the page cache, not the device. "
                f"Put the file on the storage to measure, or pass allow_page_cache=True to evict "
                f"its pages with POSIX_FADV_DONTNEED before each point instead") from e
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # POSIX_FADV_DONTNEED leaves dirty pages in the cache
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: read what is asked only
    return fd, False


def _uring_api():
    """The ``uring_api`` module where io_uring works here, else None."""
    try:
        import uring_api
    except ImportError:
        return None
    return uring_api if uring_api.is_available() else None


def _sweep_methods(method: str, direct: bool) -> list[str]:
    """The ways of keeping reads in flight that a sweep tries at each point."""
    if method not in ("best", "io_uring", "threads"):
        raise ValueError(f"device_limit: method={method!r}; expected 'best', 'io_uring' or "
                         f"'threads'")
    uring = direct and _uring_api() is not None
    if method == "io_uring" and not uring:
        raise ValueError("device_limit: method='io_uring' needs the uring_api package, a "
                         "system with io_uring and O_DIRECT reads")
    if method == "best":
        return ["io_uring", "threads"] if uring else ["threads"]
    return [method]


def _measure_point_uring(fds: list[int], n_chunks: list[int], chunk: int, concurrency: int,
                         seconds: float, seed: int) -> dict:
    """One thread keeping ``concurrency`` random chunk reads in flight through io_uring (each
    of file ``fds[i]`` with probability in proportion to its ``n_chunks[i]``), for ``seconds``.
    A read's latency runs from its submission to the loop seeing it complete."""
    ends = np.cumsum(n_chunks)
    if ends[-1] == 0:
        raise ValueError(f"no file holds a chunk of {chunk} bytes")
    starts = ends - np.asarray(n_chunks)
    rng = np.random.default_rng([seed, chunk, concurrency])
    mem, view = _aligned(concurrency * chunk)
    bufs = [view[i * chunk:(i + 1) * chunk] for i in range(concurrency)]
    ring = _uring_api().Ring(max(64, 2 * concurrency))
    latencies, submitted, free, in_flight = [], [0] * concurrency, list(range(concurrency)), 0
    picks: list = []
    io_before = storage_read_bytes()
    start = time.perf_counter_ns()
    deadline, stop = start + int(seconds * 1e9), False
    try:
        while True:
            while free and not stop:
                if not picks:  # offsets drawn 1024 at a time: numpy's cost per call is fixed
                    g = rng.integers(ends[-1], size=1024)
                    k = np.searchsorted(ends, g, side="right")
                    picks = list(zip(k.tolist(), ((g - starts[k]) * chunk).tolist()))[::-1]
                k, offset = picks.pop()
                slot = free.pop()
                ring.prepare_read(fds[k], bufs[slot], offset, user_data=slot)
                submitted[slot] = time.perf_counter_ns()
                in_flight += 1
            if not in_flight:
                break
            for completion in ring.wait():
                now = time.perf_counter_ns()
                if completion.res != chunk:
                    raise OSError(f"read returned {completion.res}, expected {chunk} bytes")
                latencies.append(now - submitted[completion.user_data])
                free.append(completion.user_data)
                in_flight -= 1
                stop = stop or now >= deadline
    finally:
        ring.close()
    wall = (time.perf_counter_ns() - start) / 1e9
    return _point(chunk, concurrency, np.asarray(latencies) / 1e3, wall, io_before)


def _point(chunk: int, concurrency: int, lat_us: np.ndarray, wall: float, io_before) -> dict:
    """One sweep point's record from its reads' latencies (µs) and wall time."""
    io_after = storage_read_bytes()
    reads = int(lat_us.size)
    nbytes = reads * chunk
    storage = None if io_before is None else io_after - io_before
    return {
        "chunk_bytes": chunk,
        "concurrency": concurrency,
        "reads": reads,
        "bytes": nbytes,
        "wall_s": wall,
        "gb_s": nbytes / wall / 1e9,
        "median_us": float(np.median(lat_us)),
        "p90_us": float(np.percentile(lat_us, 90)),
        "storage_bytes": storage,
        "storage_ratio": None if storage is None else storage / nbytes,
    }


def _measure_point(fds: list[int], n_chunks: list[int], chunk: int, concurrency: int,
                   seconds: float, seed: int) -> dict:
    """``concurrency`` threads reading random chunks, each of file ``fds[i]`` with probability
    in proportion to its ``n_chunks[i]``, for ``seconds``."""
    ends = np.cumsum(n_chunks).tolist()  # chunk g lies in the first file whose end exceeds it
    total = ends[-1]
    if total == 0:
        raise ValueError(f"no file holds a chunk of {chunk} bytes")
    barrier = threading.Barrier(concurrency + 1)
    latencies: list[list[int]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    deadline = [0]

    def reader(i: int) -> None:
        rng = random.Random(f"{seed}-{chunk}-{concurrency}-{i}")
        lat = latencies[i]
        with mmap.mmap(-1, chunk) as buf:  # page-aligned, as O_DIRECT requires
            try:
                barrier.wait()
                while True:
                    g = rng.randrange(total)
                    k = bisect.bisect_right(ends, g)
                    offset = (g - (ends[k - 1] if k else 0)) * chunk
                    t0 = time.perf_counter_ns()
                    n = os.preadv(fds[k], [buf], offset)
                    t1 = time.perf_counter_ns()
                    if n != chunk:
                        raise OSError(f"short read: {n} of {chunk} bytes at offset {offset}")
                    lat.append(t1 - t0)
                    if t1 >= deadline[0]:
                        break
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,), daemon=True)
               for i in range(concurrency)]
    for t in threads:
        t.start()
    io_before = storage_read_bytes()
    start = time.perf_counter_ns()
    deadline[0] = start + int(seconds * 1e9)
    barrier.wait()
    for t in threads:
        t.join()
    wall = (time.perf_counter_ns() - start) / 1e9
    if errors:
        raise errors[0]
    lat_us = np.concatenate([np.asarray(x, dtype=np.int64) for x in latencies]) / 1e3
    return _point(chunk, concurrency, lat_us, wall, io_before)


def _filesystem_of(path: Path) -> str:
    """'<fstype> on <mount point> (<source>)' for the mount holding `path`, from /proc/mounts."""
    real = os.path.realpath(path)
    best = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                source, mount, fstype = line.split()[:3]
                mount = mount.replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) >= len(best[1])):
                    best = (source, mount, fstype)
    except OSError:
        return "unknown filesystem"
    if best is None:
        return "unknown filesystem"
    return f"{best[2]} on {best[1]} ({best[0]})"


def _human(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.4g} {unit}"
    return f"{nbytes} B"
