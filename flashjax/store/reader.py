"""Host-side reader of neuron bundles from the flash store into a preallocated staging buffer.

One batched TensorStore read per layer and token fetches all missing rows concurrently. The
shard indexes stay cached (metadata pool, checked once at open), TensorStore's data cache is
off (the neuron cache is the cache), and by default reads use O_DIRECT so the OS page cache
cannot serve them: what is timed is the storage device.

Long runs of consecutive rows (the streaming baselines read whole layers) take another path:
TensorStore reads a one-row-per-chunk shard one chunk at a time, which caps a sequential read
at the device's small-read throughput. ``read_range`` instead reads the run's byte range
straight from the shard file, located through the shard index (zarr v3 ``sharding_indexed``,
index at the end: ``(offset, nbytes)`` little-endian uint64 per chunk), in 1 MiB pieces on a
thread pool, the way the device reads fastest.

Row sets can take a third path: where Linux io_uring is available (``uring_api``) and reads
are O_DIRECT, each row's read is queued on one io_uring ring, ``concurrency`` in flight.
Rows that are whole 4 KiB blocks at block-aligned offsets (float16 bundles of a width that is
a multiple of 1024) are read straight into the staging buffer, consecutive rows as one read.
Smaller or unaligned rows are read as the aligned blocks that hold them, rows sharing a block
in one read, into a small scratch ring (one ``block_span`` per read in flight, counted in the
memory budget) from which each row is copied once its read completes. The unbundled
copy (each part in its own array) is read the same way, one read per part. TensorStore
spends ~25-45 us of CPU per row it reads (its per-chunk machinery and a thread per read) and
~0.4 ms per call; the ring needs ~6-7 us per read, which matters on a machine with few cores,
above all while the engine's device work runs under the reads.
"""

from __future__ import annotations

import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorstore as ts

try:  # Linux io_uring, for row-set reads (optional: TensorStore reads them otherwise)
    import uring_api
except ImportError:  # pragma: no cover - not Linux, or not installed
    uring_api = None

from flashjax.store import bundles
from flashjax.store.convert import NP_DTYPES
from flashjax.store.manifest import Manifest


def storage_read_bytes() -> int | None:
    """Bytes this process has caused to be fetched from storage (/proc/self/io), if known."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


ALIGN = 4096  # O_DIRECT offsets, sizes and buffers: multiples of the logical block
PIECE = 1 << 20  # bytes per pread of a long run
MERGE = 128 << 10  # io_uring: consecutive whole-block rows are read together up to this size
# io_uring: rows read through the scratch ring (rows that are not whole blocks, and rows with
# unneeded ones between them) are read together up to this size, a slot of the ring...
READ_SPAN = 32 << 10
# ...and a read may span up to ``gap`` bytes of rows nobody asked for between two it needs.
# GAP_CROSSOVER is where one longer read stops costing the device less than two (from the
# device sweep, docs/BENCHMARKS.md "Neuron placement"); by default (READ_GAP) no gap is read:
# on the whole engine the extra bytes cost about what the saved requests save, and with
# placed neurons gap reads measured slower
GAP_CROSSOVER = 16 << 10
READ_GAP = 0
SUBMIT_EVERY = 4  # io_uring: reads handed to the kernel as they are prepared, this many at a time


def _ceil_blocks(nbytes):
    return -(-nbytes // ALIGN) * ALIGN


def _max_span(offsets: np.ndarray, size: int) -> int:
    """The most bytes of whole blocks any one row of ``size`` bytes at ``offsets`` covers."""
    return int((_ceil_blocks(offsets + size) - offsets // ALIGN * ALIGN).max())


def block_span(row_bytes: int, bundled: bool, n_parts: int = 2, gap: int = 0,
               span: int = READ_SPAN) -> int:
    """Bytes of one io_uring scratch slot, as the converter lays rows out (row i at i x its
    size): for rows (or unbundled parts) that are not whole blocks, or that may be read with
    up to ``gap`` bytes of others between them, ``span`` but at least the most blocks one
    row covers (and two rows with a gap between them); 0 when rows are whole blocks and gaps
    are never read (rows go straight into the staging rows)."""
    piece = row_bytes if bundled else row_bytes // n_parts
    if piece % ALIGN == 0:
        return max(span, 2 * piece + gap) if gap > 0 else 0
    period = ALIGN // np.gcd(piece, ALIGN)  # the offsets' pattern within blocks repeats
    return max(span, _max_span(np.arange(period, dtype=np.int64) * piece, piece))


def shard_row_offsets(array_dir: Path, n_rows: int, row_bytes: int) -> np.ndarray | None:
    """Byte offset of each row in a layer's shard file ``c/0/0``, read from the shard index;
    None unless the array is one shard of uncompressed one-row chunks laid out in row order
    (what the converter writes), so that a run of rows is one contiguous byte range."""
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        if (codec["name"] != "sharding_indexed" or conf.get("index_location", "end") != "end"
                or [c["name"] for c in conf["codecs"]] != ["bytes"]
                or [c["name"] for c in conf["index_codecs"]] != ["bytes", "crc32c"]
                or conf["chunk_shape"][0] != 1):
            return None
        path = array_dir / "c" / "0" / "0"
        index_bytes = 16 * n_rows + 4
        with open(path, "rb") as f:
            f.seek(-index_bytes, os.SEEK_END)
            index = np.frombuffer(f.read(index_bytes)[:-4], "<u8").reshape(n_rows, 2)
    except (OSError, KeyError, ValueError, TypeError):
        return None
    offsets = index[:, 0].astype(np.int64)
    if (index[:, 1] != row_bytes).any() or (np.diff(offsets) != row_bytes).any():
        return None
    return offsets


class _Source(NamedTuple):
    """One array io_uring reads rows from: its shard file, each row's offset in it, the bytes
    per row, where they go in a staging row, and whether they can be read straight there."""
    fd: int
    offsets: np.ndarray
    size: int
    dest: int
    direct: bool


def _aligned(nbytes: int) -> tuple[mmap.mmap, memoryview]:
    """Anonymous, page-aligned memory (for O_DIRECT), and a writable view of it."""
    buf = mmap.mmap(-1, max(nbytes, 1))
    return buf, memoryview(buf)


class FlashReader:
    """Reads bundle rows of any layer into ``staging`` [max_rows, bundle_width].

    With ``slots`` > 1 the staging buffer is one of a ring of that many: ``next_slot()`` moves
    reads to the next one, so device work can still use rows read into the others (the engine
    hands staging rows to jax without a copy and fences each slot before reusing it)."""

    def __init__(self, model_dir: str | Path, manifest: Manifest, max_rows: int, *,
                 direct_io: bool = True, concurrency: int = 32, verify: bool = False,
                 bundled: bool = True, unbundled_dir: str | Path | None = None, slots: int = 1,
                 io_uring: bool | None = None, block_slots: int | None = None,
                 gap: int = READ_GAP, span: int = READ_SPAN):
        cfg = manifest.config
        self.model_dir = Path(model_dir)
        # the unbundled copy (bundles.write_split): in the model dir unless written elsewhere
        self.split_root = Path(unbundled_dir) if unbundled_dir is not None else self.model_dir
        self.row_bytes = manifest.row_bytes
        self.quant = manifest.quant  # the rows' quantization (staged as bytes), or None
        self.direct_io = direct_io
        self.verify = verify
        context = {
            "cache_pool": {"total_bytes_limit": 0},
            # shard indexes: 16 B per row and layer, plus metadata
            "cache_pool#meta": {"total_bytes_limit": cfg.num_hidden_layers * cfg.ffn_dim * 16
                                + (16 << 20)},
            "file_io_concurrency": {"limit": concurrency},
        }
        if direct_io:
            context["file_io_mode"] = {"mode": "direct"}
        self.context = ts.Context(context)
        if manifest.quant is not None and not bundled:
            raise ValueError(f"{model_dir}: a store of {manifest.ffn_dtype} rows is read bundled "
                             f"only (its unbundled copy is not written)")
        self.bundled = bundled
        self.d_model = cfg.hidden_size
        self.n_parts = len(cfg.ffn_parts)
        if bundled:  # one read of parts x d_model values per neuron
            self.stores = [[self._open(layer)] for layer in range(cfg.num_hidden_layers)]
        else:  # a read of d_model values per part per neuron (see bundles.write_split)
            self.stores = [[self._open(layer, a) for a in bundles.split_arrays(layer, self.n_parts)]
                           for layer in range(cfg.num_hidden_layers)]
        self.checksums = bundles.load_checksums(model_dir) if verify else None
        # page-aligned, with room to round a run up to whole blocks; quantized rows are staged
        # as their bytes (the update kernels decode them)
        staging_bytes = max_rows * self.row_bytes
        row_dtype, row_width = ((NP_DTYPES[manifest.dtype], cfg.bundle_width)
                                if manifest.quant is None else (np.dtype(np.uint8), self.row_bytes))
        self._ring = []  # (memory, writable view, array, TensorStore view of the array)
        for _ in range(slots):
            mem, view = _aligned(staging_bytes + 2 * ALIGN)
            array = np.frombuffer(mem, row_dtype, count=max_rows * row_width).reshape(
                max_rows, row_width)
            self._ring.append((mem, view, array, ts.array(array, copy=False, write=True)))
        self.slot = 0
        self._select(0)
        # the storage requests of the last read and their bytes (whole blocks for O_DIRECT
        # reads of rows that are not; TensorStore reads a row, or a part of one, per request)
        self.last_requests = self.last_request_bytes = 0
        self._threads = concurrency
        self._pool = None
        self._fds: dict[int | str, int] = {}
        self._offsets: list[np.ndarray | None | bool] = [False] * cfg.num_hidden_layers
        self._scratch = None
        self._uring = self._open_uring(io_uring, concurrency)
        self._sources: dict[int, list[_Source] | None] = {}
        self._blocks = None  # io_uring scratch: (memory, bytes per slot), one slot per read
        self._block_slots = min(concurrency, block_slots or concurrency)
        if gap < 0:
            raise ValueError(f"gap must be >= 0 bytes, got {gap}")
        self.gap = gap
        span = block_span(self.row_bytes, bundled, self.n_parts, gap, span)
        if self._uring is not None and span:
            self._blocks = (np.frombuffer(_aligned(self._block_slots * span)[0], np.uint8), span)

    def _open_uring(self, wanted: bool | None, depth: int):
        """An io_uring ring for row-set reads, or None. ``wanted`` None: when usable; True:
        required (an error says why not); False: never."""
        if wanted is False:
            return None
        why = None
        if uring_api is None:
            why = ("the uring_api package is not installed (it is the optional extra: "
                   "pip install 'flashjax[uring]')")
        elif not uring_api.is_available():
            why = "io_uring is not available on this system"
        elif not (self.direct_io and hasattr(os, "O_DIRECT")):
            why = "it serves O_DIRECT reads only"
        if why is None:
            try:
                return uring_api.Ring(max(64, 2 * depth))
            except OSError as e:
                why = f"cannot set up a ring ({e})"
        if wanted:
            raise ValueError(f"io_uring reads requested, but {why}")
        return None

    @property
    def uses_io_uring(self) -> bool:
        return self._uring is not None

    def _open(self, layer: int, array: str | None = None) -> ts.TensorStore:
        spec = {**bundles.array_spec(self._root(array), layer, array),
                "metadata_cache_pool": "cache_pool#meta",
                "recheck_cached_data": "open"}
        try:
            store = ts.open(spec, open=True, read=True, context=self.context).result()
        except Exception as e:
            raise bundles.StoreError(f"{spec['kvstore']['path']}: cannot open ({e}); run "
                                     f"`flashjax verify {self.model_dir}`") from None
        shard = Path(spec["kvstore"]["path"]) / "c" / "0" / "0"
        if not shard.is_file():  # TensorStore would read a missing shard as zeros
            raise bundles.StoreError(f"{shard}: the shard file holding every row of this array "
                                     f"is missing; the store is incomplete, reconvert the model")
        return store

    def _select(self, slot: int) -> None:
        self.slot = slot
        _, self._staging_view, self.staging, self._staging_ts = self._ring[slot]

    def next_slot(self) -> int:
        """Make the next staging buffer of the ring current; returns its index."""
        self._select((self.slot + 1) % len(self._ring))
        return self.slot

    @property
    def slots(self) -> int:
        return len(self._ring)

    @property
    def staging_bytes(self) -> int:
        """All staging buffers of the ring."""
        return self.staging.nbytes * len(self._ring)

    def _row_offsets(self, layer: int) -> np.ndarray | None:
        if self._offsets[layer] is False:
            n = self.stores[layer][0].shape[0]
            self._offsets[layer] = shard_row_offsets(
                self.model_dir / bundles.FFN_DIR / bundles.layer_key(layer), n, self.row_bytes)
        return self._offsets[layer]

    def _uring_sources(self, layer: int) -> list[_Source] | None:
        """Where io_uring reads each row of ``layer`` from: one source per array (the bundle
        array, or the unbundled up and down arrays), or None without a ring or when a shard is
        not laid out row after row."""
        if self._uring is None:
            return None
        if layer not in self._sources:
            n = self.stores[layer][0].shape[0]
            if self.bundled:  # (the fd key: a layer's bundle array, or an array's path)
                arrays = [(layer, self.row_bytes, 0)]
            else:
                part = self.row_bytes // self.n_parts
                arrays = [(a, part, i * part)
                          for i, a in enumerate(bundles.split_arrays(layer, self.n_parts))]
            sources = []
            for array, size, dest in arrays:
                offsets = (self._row_offsets(layer) if self.bundled
                           else shard_row_offsets(self._root(array) / array, n, size))
                if offsets is None:
                    sources = None
                    break
                direct = size % ALIGN == 0 and dest % ALIGN == 0 and not (offsets % ALIGN).any()
                sources.append(_Source(self._fd(array), offsets, size, dest, direct))
            slot = max([_max_span(s.offsets, s.size) for s in sources or [] if not s.direct],
                       default=0)
            if slot and (self._blocks is None or slot > self._blocks[1]):  # a layout not the
                # converter's (rows not at i x row size): a larger scratch than budgeted
                self._blocks = (np.frombuffer(_aligned(self._block_slots * slot)[0], np.uint8),
                                slot)
            self._sources[layer] = sources
        return self._sources[layer]

    def _fd(self, array: int | str) -> int:
        """An open shard file: a layer's bundle array, or an array path under the model dir."""
        if array not in self._fds:
            rel = f"{bundles.FFN_DIR}/{bundles.layer_key(array)}" if isinstance(array, int) \
                else array
            flags = os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0)
            self._fds[array] = os.open(self._root(array) / rel / "c" / "0" / "0", flags)
        return self._fds[array]

    def _root(self, array: int | str | None) -> Path:
        """The directory an array path is relative to: the unbundled copy's parts lie under
        ``split_root``, everything else under the model dir."""
        return self.split_root if isinstance(array, str) and array.startswith(
            bundles.SPLIT_DIR) else self.model_dir

    def close(self) -> None:
        if self._uring is not None:
            self._uring.close()
            self._uring = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def read_range(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``layer`` into the start of the staging buffer, as one
        contiguous byte range read in 1 MiB pieces (see the module docstring); falls back to
        ``read`` when the shard is not laid out row after row or direct I/O is off."""
        offsets = self._row_offsets(layer) if self.bundled and hasattr(os, "O_DIRECT") else None
        count = stop - start
        if offsets is None or count <= 0:
            return self.read(layer, slice(start, stop))
        first = int(offsets[start])
        lo = first - first % ALIGN
        hi = -(-(first + count * self.row_bytes) // ALIGN) * ALIGN
        if lo == first:  # rows land in the staging buffer directly
            view = self._staging_view
        else:  # a run that starts inside a block: read whole blocks aside, then copy
            if self._scratch is None or len(self._scratch[1]) < self.staging.nbytes + 2 * ALIGN:
                self._scratch = _aligned(self.staging.nbytes + 2 * ALIGN)
            view = self._scratch[1]
        fd = self._fd(layer)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="flashjax-read")

        def piece(at: int) -> None:
            size = min(PIECE, hi - at)
            got = os.preadv(fd, [view[at - lo:at - lo + size]], at)
            if got < min(size, first + count * self.row_bytes - at):
                raise OSError(f"short read: {got} of {size} bytes at offset {at}")

        self.last_requests, self.last_request_bytes = -(-(hi - lo) // PIECE), hi - lo
        try:
            list(self._pool.map(piece, range(lo, hi, PIECE)))
        except OSError as e:
            raise bundles.StoreError(f"{self.model_dir}/{bundles.FFN_DIR}/"
                                     f"{bundles.layer_key(layer)}: reading rows {start}..{stop}"
                                     f" failed ({e})") from None
        if view is not self._staging_view:
            src = np.frombuffer(view, np.uint8, count=count * self.row_bytes,
                                offset=first - lo)
            self.staging.view(np.uint8).reshape(-1)[:src.size] = src
        rows = self.staging[:count]
        if self.checksums is not None:
            bundles.check_rows(rows, np.arange(start, stop), self.checksums[layer],
                               where=f"{self.model_dir}/ffn/{bundles.layer_key(layer)}")
        return rows

    def _uring_jobs(self, source: _Source, ids: np.ndarray):
        """The reads that fetch rows ``ids`` from ``source``: per read its file offset, size,
        the bytes it must return, the first and last position in ``ids`` it serves, and
        whether it lands straight in the staging rows. Consecutive rows that fill whole
        staging rows are read there together, up to ``MERGE`` bytes; other reads cover whole
        blocks of a scratch slot (``block_span``), from which the rows are copied: rows that
        share a block, adjacent rows, and rows with at most ``gap`` bytes between them."""
        where = source.offsets[ids]
        size = source.size
        straight_ok = source.direct and size == self.row_bytes
        slot = self._blocks[1] if self._blocks is not None else 0
        gap = self.gap if slot else 0
        if not len(ids):
            return []
        if source.direct and not slot:  # whole-block rows only: runs straight, or one by one
            limit = MERGE if straight_ok else size
            jobs, first = [], 0
            for i in range(1, len(ids) + 1):
                if (i == len(ids) or ids[i] != ids[i - 1] + 1
                        or (i - first + 1) * size > limit):
                    nbytes = (i - first) * size
                    jobs.append((int(where[first]), nbytes, nbytes, first, i - 1, True))
                    first = i
            return jobs
        starts = where - where % ALIGN
        stops = -(-(where + size) // ALIGN) * ALIGN
        jobs = []
        lo, hi, first, straight = int(starts[0]), int(stops[0]), 0, source.direct
        for i in range(1, len(ids)):
            start, stop = int(starts[i]), int(stops[i])
            if start - hi <= gap:
                run = straight and straight_ok and ids[i] == ids[i - 1] + 1 and start == hi
                if run and stop - lo <= MERGE:
                    hi = stop
                    continue
                if stop - lo <= slot:
                    hi, straight = max(hi, stop), False
                    continue
            jobs.append((lo, hi - lo, int(where[i - 1]) + size - lo, first, i - 1,
                         straight and source.direct))
            lo, hi, first, straight = start, stop, i, source.direct
        jobs.append((lo, hi - lo, int(where[-1]) + size - lo, first, len(ids) - 1,
                     straight and source.direct))
        return jobs

    def _read_uring(self, layer: int, ids: np.ndarray, sources: list[_Source]) -> None:
        """Rows ``ids`` into the staging buffer through the io_uring ring, at most
        ``concurrency`` reads in flight."""
        rb, ring, depth = self.row_bytes, self._uring, self._threads
        staging = self._staging_view
        staging_u8 = self.staging.view(np.uint8).reshape(-1)
        jobs = [(src, job) for src in sources for job in self._uring_jobs(src, ids)]
        self.last_requests, self.last_request_bytes = len(jobs), sum(j[1] for _, j in jobs)
        free = list(range(self._block_slots))  # scratch slots
        slot_of = {}
        count, queued, done, error = len(jobs), 0, 0, None
        # after a failed read nothing more is queued, but what is in flight is waited for
        while done < queued or (error is None and queued < count):
            while (error is None and queued < count and queued - done < depth
                   and (free or jobs[queued][1][5])):
                src, (at, size, _, first, _, straight) = jobs[queued]
                if straight:
                    dest = first * rb + src.dest
                    buf = staging[dest:dest + size]
                else:
                    slot_of[queued] = free.pop()
                    base = slot_of[queued] * self._blocks[1]
                    buf = self._blocks[0][base:base + size]
                ring.prepare_read(src.fd, buf, at, user_data=queued)
                queued += 1
                if (queued - 1) % SUBMIT_EVERY == 0:  # the device starts on the first reads while
                    ring.submit()  # the rest are prepared (wait() submits what is left)
            for completion in ring.wait():  # submits what is queued, then waits
                done += 1
                j = completion.user_data
                src, (at, size, need, first, last, straight) = jobs[j]
                if completion.res < need:
                    if error is None:
                        error = (os.strerror(-completion.res) if completion.res < 0
                                 else f"short read: {completion.res} of {need} bytes")
                elif not straight and error is None:
                    base = slot_of[j] * self._blocks[1] - at
                    for i in range(first, last + 1):
                        off = int(src.offsets[ids[i]]) + base
                        dest = i * rb + src.dest
                        staging_u8[dest:dest + src.size] = self._blocks[0][off:off + src.size]
                if not straight:
                    free.append(slot_of.pop(j))
        if error is not None:
            raise OSError(error)

    def read(self, layer: int, ids) -> np.ndarray:
        """Read rows ``ids`` (sorted ascending int array, or a slice) of ``layer`` into the
        start of the staging buffer; returns that view. The view is overwritten by the next
        read: consume it (copy to the device) first."""
        stores = self.stores[layer]
        n = stores[0].shape[0]
        count = len(range(*ids.indices(n))) if isinstance(ids, slice) else len(ids)
        if count == 0:
            self.last_requests = self.last_request_bytes = 0
            return self.staging[:0]
        sources = self._uring_sources(layer) if not isinstance(ids, slice) else None
        if not sources:  # TensorStore: one request per row of each array
            self.last_requests = count * len(stores)
            self.last_request_bytes = count * self.row_bytes
        try:
            if sources:
                self._read_uring(layer, np.asarray(ids), sources)
            elif self.bundled:
                self._staging_ts[0:count].write(stores[0][ids]).result()
            else:
                # every part in flight at once, each into its own contiguous array
                # (TensorStore writes into a strided part of the staging rows far more
                # slowly), then copied
                d = self.d_model
                parts = [store[ids].read() for store in stores]
                for i, part in enumerate(parts):
                    self.staging[:count, i * d:(i + 1) * d] = part.result()
        except Exception as e:
            raise bundles.StoreError(f"{self.model_dir}/{bundles.FFN_DIR}/{bundles.layer_key(layer)}:"
                                     f" reading {count} bundle rows failed ({e})") from None
        rows = self.staging[:count]
        if self.checksums is not None:
            ids_arr = np.arange(n)[ids] if isinstance(ids, slice) else ids
            bundles.check_rows(rows, ids_arr, self.checksums[layer],
                               where=f"{self.model_dir}/ffn/{bundles.layer_key(layer)}")
        return rows
