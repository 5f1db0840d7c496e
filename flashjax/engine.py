"""Flash-backed generation: FFN rows stream from the flash store into fixed DRAM buffers.

Per token and layer (see DESIGN.md): attention (jit) -> predicted active neurons (host) ->
cache plan: which rows leave the window, which are missing (host) -> batched read of the
missing bundle rows into the staging buffer (TensorStore) -> donated in-place row moves and
appends on the device buffer (jit) -> FFN over the buffer (jit). Every step is timed and every
byte counted.

With ``overlap`` (the default) the device works while the host reads: the FFN over the rows a
layer already holds is dispatched before its missing rows are read, the rows just read go
through the FFN straight from the staging buffer, and the layer's moves and appends are
dispatched only when the next layer starts its read, so they run under that read instead of
before the next attention. jax dispatches asynchronously and XLA:CPU runs one computation at
a time, in order, so this ordering is what puts device work under I/O. The phases are then
the host's time: work hidden under a read costs nothing; what is not hidden shows up where
the host next waits for a result (compute). ``overlap=False`` blocks after every piece and
times each on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.budget import MemoryPlan
from flashjax.cache import (NeuronBuffer, NeuronCache, append_rows, bucket_for, buckets, move_rows,
                            pad, update_rows)
from flashjax.config import ModelConfig
from flashjax.model.layers import DecoderLayer, KVCache
from flashjax.model.opt import OPT
from flashjax.model.sparse import SparseFFN
from flashjax.predictor.model import predict_scores
from flashjax.runtime import Model
from flashjax.store.reader import FlashReader, storage_read_bytes

PREDICTORS = ("oracle", "lowrank", "trace", None)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How a flash-backed model runs (everything jit does not specialise on)."""

    predictor: str | None = "oracle"  # "oracle", "lowrank", "trace", or None: every row
    trace: str | None = None  # predictor "trace": an activity trace file (bench.activity)
    hybrid: bool = False  # predictor None: keep what fits resident, stream only the rest
    window: int = 4  # keep neurons needed by the last k tokens (the paper's OPT setting)
    direct_io: bool = True  # O_DIRECT reads: the page cache never serves the flash store
    reader_threads: int = 32  # concurrent reads in flight (the paper used 32)
    max_context: int | None = None  # KV-cache slots reserved (None: min(max positions, 256))
    resident_dtype: str | None = None  # dtype of resident weights in DRAM (None: see load)
    max_batch: int = 1  # sequences per batch reserved in the budget
    verify_reads: bool = False  # crc32-check every row read
    bundled: bool = True  # False: read up and down halves from the unbundled copy (benchmarks)
    update_rows: int | None = None  # most rows per read and buffer update (None: from budget)
    overlap: bool = True  # buffer updates and FFN work run while the next rows are read
    io_uring: bool | None = None  # row sets read through io_uring (None: where it can be)


# -- jitted pieces: every layer has the same shapes, so each compiles once ---------------------
# Resident weights may be held in a narrower dtype than the computation (to fit a budget);
# each piece widens what it uses to the dtype of the activations or KV cache.

def _widen(tree, like):
    return jax.tree.map(lambda x: x.astype(like.dtype), tree)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def _embed(cfg: ModelConfig, params, tokens, positions, token_valid, cache: KVCache):
    """tokens, positions, token_valid: [B] -> h [B, 1, D]; marks the new cache slot."""
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_valid[:, None], cache.index,
                                                axis=1)
    params = _widen(params, cache.keys)
    h = OPT(cfg).apply({"params": params}, tokens[:, None], positions[:, None], method=OPT.embed)
    return h, cache.replace(valid=valid)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _attend(cfg: ModelConfig, layer_params, h, cache: KVCache, layer):
    layer_params = _widen(layer_params, h)
    keys = jax.lax.dynamic_index_in_dim(cache.keys, layer, keepdims=False)
    values = jax.lax.dynamic_index_in_dim(cache.values, layer, keepdims=False)
    h, ffn_in, keys, values = DecoderLayer(cfg).apply(
        {"params": layer_params}, h, keys, values, cache.valid, cache.index,
        method=DecoderLayer.attend)
    cache = cache.replace(
        keys=jax.lax.dynamic_update_index_in_dim(cache.keys, keys, layer, axis=0),
        values=jax.lax.dynamic_update_index_in_dim(cache.values, values, layer, axis=0))
    return h, ffn_in, cache


@jax.jit
def _ffn_part(buf: NeuronBuffer, first, n_live, ffn_in, acc=None):
    """acc + the FFN over buffer slots [first, n_live) (fc2 bias not added)."""
    out = SparseFFN().apply({}, ffn_in, buf.up, buf.down, buf.bias, n_live, first)
    return out if acc is None else acc + out


WINDOW_PIECE = 256  # rows per step of ``_ffn_window``'s loop


@functools.partial(jax.jit, static_argnums=5)
def _ffn_window(buf: NeuronBuffer, first, n_live, ffn_in, acc, size: int):
    """``_ffn_part`` over only the ``size`` slots from ``first`` on (a streamed chunk), not the
    whole buffer; slots in that window at or past ``n_live`` contribute nothing.

    The window is taken in pieces of ``WINDOW_PIECE`` rows inside a loop: on XLA:CPU one
    dynamic slice of the whole window is copied out before the matmuls (4x the cost of the
    FFN over the full buffer at OPT-6.7B width), small pieces are not. A piece that would run
    past the buffer's end is shifted back by the slice's clamping; its rows before the piece's
    own start are masked, so no row counts twice."""
    capacity = buf.up.shape[0]
    piece = min(size, WINDOW_PIECE, capacity)
    stop = jnp.minimum(n_live, first + size)

    def body(i, acc):
        start = first + i * piece
        at = jnp.clip(start, 0, capacity - piece)  # where dynamic_slice actually reads
        slot = at + jnp.arange(piece)
        up = jax.lax.dynamic_slice_in_dim(buf.up, at, piece)
        down = jax.lax.dynamic_slice_in_dim(buf.down, at, piece)
        bias = jax.lax.dynamic_slice_in_dim(buf.bias, at, piece)
        h = jnp.einsum("bsd,cd->bsc", ffn_in.astype(up.dtype), up) + bias
        h = jnp.where((slot >= start) & (slot < stop), jax.nn.relu(h), 0)
        return acc + jnp.einsum("bsc,cd->bsd", h, down).astype(acc.dtype)

    return jax.lax.fori_loop(0, -(-size // piece), body, acc)


# A read's small arguments travel in one int32 array ``meta`` of 3 S + 2 entries for S staged
# rows (``FlashModel._meta``): the neuron ids read, padded with 0; the update's holes, padded
# out of range, and movers, padded with 0; the count of rows read; the first append slot. Each
# numpy argument of a jitted call costs ~8 us of dispatch on CPU; the fc1 biases of the rows
# are gathered on the device from the layer's resident bias vector.


@jax.jit
def _ffn_rows(rows, meta, fc1_bias, ffn_in, acc):
    """acc + the FFN over the rows just read (staging rows [S, 2D], storage dtype); rows past
    the count read are stale and masked."""
    size, d = rows.shape[0], ffn_in.shape[-1]
    count = meta[3 * size]
    live = jnp.arange(size) < count
    rows = jnp.where(live[:, None], rows.astype(ffn_in.dtype), 0)
    bias = fc1_bias[meta[:size]].astype(ffn_in.dtype)
    return acc + SparseFFN().apply({}, ffn_in, rows[:, :d], rows[:, d:], bias, count)


@functools.partial(jax.jit, donate_argnums=0)
def _update_fenced(buf: NeuronBuffer, rows, meta, fc1_bias):
    """``update_rows`` with the moves and rows of ``meta``, and a scalar ready only once the new
    buffer is: the fence for the staging rows it read (the buffer itself cannot be one: the
    next update donates it)."""
    size = rows.shape[0]
    buf = update_rows.__wrapped__(buf, meta[size:2 * size], meta[2 * size:3 * size],
                                  meta[3 * size + 1], rows, fc1_bias[meta[:size]])
    return buf, buf.bias[0]


@functools.partial(jax.jit, donate_argnums=0)
def _append_fenced(buf: NeuronBuffer, rows, meta, fc1_bias):
    """``append_rows`` at the append slot of ``meta``, with its fence as ``_update_fenced``."""
    size = rows.shape[0]
    buf = append_rows.__wrapped__(buf, meta[3 * size + 1], rows, fc1_bias[meta[:size]])
    return buf, buf.bias[0]


@functools.partial(jax.jit, static_argnums=0)
def _finish(cfg: ModelConfig, layer_params, h, ffn_out):
    layer_params = _widen(layer_params, h)
    ffn_out = ffn_out + layer_params["ffn"]["fc2"]["bias"]
    return DecoderLayer(cfg).apply({"params": layer_params}, h, ffn_out, method=DecoderLayer.finish)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _head(cfg: ModelConfig, params, h, cache: KVCache):
    params = _widen(params, h)
    logits = OPT(cfg).apply({"params": params}, h, method=OPT.head)[:, 0]
    return logits, cache.replace(index=cache.index + 1)


@jax.jit
def _oracle_scores(w_up, b_up, ffn_in, token_valid):
    """Exact FFN pre-activations [N], the max over the batch's real tokens."""
    pre = jnp.einsum("bsd,dn->bsn", ffn_in, w_up) + b_up
    pre = jnp.where(token_valid[:, None, None], pre, -jnp.inf)
    return pre.max(axis=(0, 1))


class Stats:
    """Counters and per-token timings of one generation."""

    PHASES = ("io", "memory", "predictor", "compute")

    def __init__(self):
        self.tokens = 0
        self.rows_loaded = self.rows_evicted = self.rows_dropped = 0
        self.rows_needed = 0
        self.per_token: dict[str, list[float]] = {p: [] for p in self.PHASES}
        self.rows_loaded_per_token: list[int] = []
        self.rows_per_read: list[int] = []  # rows of each reader call (its concurrency)
        self._storage0 = storage_read_bytes()
        self._current = dict.fromkeys(self.PHASES, 0.0)
        self._loaded_now = 0

    def add(self, phase: str, seconds: float) -> None:
        self._current[phase] += seconds

    def end_token(self) -> None:
        for p in self.PHASES:
            self.per_token[p].append(self._current[p])
        self.rows_loaded_per_token.append(self._loaded_now)
        self._current = dict.fromkeys(self.PHASES, 0.0)
        self._loaded_now = 0
        self.tokens += 1

    def loaded(self, rows: int) -> None:
        self.rows_loaded += rows
        self._loaded_now += rows

    def report(self, plan: MemoryPlan, row_bytes: int, extra: dict) -> dict:
        storage = storage_read_bytes()
        per_token = {f"{p}_s": self.per_token[p] for p in self.PHASES}
        totals = [sum(v) for v in zip(*self.per_token.values())]
        medians = {f"median_{p}_s": float(np.median(self.per_token[p])) if self.tokens else 0.0
                   for p in self.PHASES}
        return {
            "dram_budget_bytes": plan.budget,
            "peak_dram_bytes": plan.total,
            "memory": plan.as_dict(),
            "flash_bytes_read": self.rows_loaded * row_bytes,
            "storage_bytes_read": None if storage is None or self._storage0 is None
            else storage - self._storage0,
            "rows_loaded": self.rows_loaded,
            "rows_evicted": self.rows_evicted,
            "rows_dropped": self.rows_dropped,
            "rows_needed": self.rows_needed,
            "tokens": self.tokens,
            "rows_loaded_per_token": self.rows_loaded_per_token,
            "rows_per_read": self.rows_per_read,
            "per_token": {**per_token, "total_s": totals},
            **medians,
            "median_total_s": float(np.median(totals)) if totals else 0.0,
            **extra,
        }


class FlashModel(Model):
    """A model whose FFN weights stay on flash; see ``flashjax.load(..., dram_budget=...)``."""

    def __init__(self, cfg: ModelConfig, params, *, reader: FlashReader, plan: MemoryPlan,
                 options: EngineOptions, oracle=None, predictors=None, trace=None, **kw):
        super().__init__(cfg, params, **kw)
        self.reader = reader
        self._memory = plan
        self.options = options
        self.oracle = oracle  # per layer (w_up [D, N], b_up [N]) on device, or None
        self.predictors = predictors  # flashjax.predictor.model.Predictors, or None
        self.trace = trace  # flashjax.bench.activity.ActivityTrace, or None
        self.layer_params = [params[f"layers_{i}"] for i in range(cfg.num_hidden_layers)]
        self.buffers = [NeuronBuffer.init(c + plan.slack_rows, cfg.hidden_size, self.dtype)
                        for c in plan.capacities]
        # each layer's largest update: the plan's update_rows, or the layer's capacity if less
        self.chunks = [min(plan.update_rows, c) for c in plan.capacities]
        self.sizes = [buckets(c) for c in self.chunks]  # padded update sizes, per layer
        self.reset()
        self._warm_up()

    @property
    def memory(self) -> MemoryPlan:
        return self._memory

    def _warm_up(self) -> None:
        """Compile the row-update kernels for every padded size now, not while generating."""
        width = self.cfg.bundle_width
        first_of = {c: self._memory.capacities.index(c) for c in set(self._memory.capacities)}
        staged = set()  # the FFN over staging rows: once per padded size
        for layer in first_of.values():
            buf = self.buffers[layer]
            out_of_range = buf.up.shape[0]
            bias = self._fc1_bias(layer)
            for size in self.sizes[layer]:
                idx = jnp.full((size,), out_of_range, jnp.int32)  # no moves
                rows = np.zeros((size, width), self.reader.staging.dtype)
                meta = self._meta(layer, np.zeros(0, np.int32), size)
                buf = move_rows(buf, idx, jnp.zeros((size,), jnp.int32))
                buf, _ = _append_fenced(buf, rows, meta, bias)  # the buffer holds nothing yet
                if self.options.predictor is not None:
                    buf, _ = _update_fenced(buf, rows, meta, bias)
                    if self.options.overlap and size not in staged:
                        x = jnp.zeros((1, 1, self.cfg.hidden_size), self.dtype)  # one sequence
                        _ffn_rows(rows, meta, bias, x, x)
                        staged.add(size)
            self.buffers[layer] = buf

    def reset(self) -> None:
        """Forget what is resident (buffers keep their memory) and start new statistics."""
        self.caches = [NeuronCache(self.cfg.ffn_dim, c) for c in self._memory.capacities]
        self._pinned_loaded = [False] * len(self.caches)
        self._pending = None  # (layer, staging slot, update_rows arguments) of the overlap
        self._fences = [[] for _ in range(self.reader.slots)]
        self.step_count = 0
        self.stats = Stats()

    # -- one token through all layers ----------------------------------------------------------
    def _step(self, tokens, positions, token_valid, cache: KVCache):
        cfg, stats = self.cfg, self.stats
        t0 = time.perf_counter()
        h, cache = _embed(cfg, self.params, tokens, positions, token_valid, cache)
        stats.add("compute", time.perf_counter() - t0)
        for layer, layer_params in enumerate(self.layer_params):
            t0 = time.perf_counter()
            h, ffn_in, cache = _attend(cfg, layer_params, h, cache, layer)
            ffn_in.block_until_ready()
            stats.add("compute", time.perf_counter() - t0)
            if self.options.predictor is None:
                ffn_out = self._stream_layer(layer, ffn_in)
            else:
                ffn_out = self._cached_layer(layer, ffn_in, token_valid)
            t0 = time.perf_counter()
            h = _finish(cfg, layer_params, h, ffn_out)
            stats.add("compute", time.perf_counter() - t0)
        t0 = time.perf_counter()
        logits, cache = _head(cfg, self.params, h, cache)
        t1 = time.perf_counter()
        self._flush()  # the last layer's update runs after the head, while the host samples
        t2 = time.perf_counter()
        stats.add("memory", t2 - t1)
        logits.block_until_ready()
        stats.add("compute", t1 - t0 + time.perf_counter() - t2)
        stats.end_token()
        self.step_count += 1
        return logits, cache

    def _predict(self, layer: int, ffn_in, token_valid) -> tuple[np.ndarray, np.ndarray]:
        """(needed neuron ids, scores [N]) for this token."""
        if self.options.predictor == "oracle":
            w_up, b_up = self.oracle[layer]
            scores = np.asarray(_oracle_scores(w_up, b_up, ffn_in, token_valid))
            return np.flatnonzero(scores > 0).astype(np.int32), scores
        scores = np.asarray(predict_scores(self.predictors.params[layer], ffn_in, token_valid))
        if self.trace is not None:  # the predictor ran (its cost is real); the trace decides
            return self.trace.needed(self.step_count, layer), scores
        return np.flatnonzero(scores >= self.predictors.thresholds[layer]).astype(np.int32), scores

    def _fc1_bias(self, layer: int):
        """The layer's resident fc1 bias [N] (each row's bias goes with it into the buffer)."""
        return self.layer_params[layer]["ffn"]["fc1"]["bias"]

    def _meta(self, layer: int, ids: np.ndarray, size: int, plan=None) -> np.ndarray:
        """The int32 ``meta`` argument (layout above the kernels) for rows ``ids`` staged and
        padded to ``size``: with ``plan``, also its moves and first append slot."""
        meta = np.zeros(3 * size + 2, np.int32)
        meta[:ids.size] = ids
        meta[size:2 * size] = self.buffers[layer].up.shape[0]  # out of range: no move
        meta[3 * size] = ids.size
        if plan is not None:
            meta[size:size + plan.holes.size] = plan.holes
            meta[2 * size:2 * size + plan.movers.size] = plan.movers
            meta[3 * size + 1] = (plan.append_slots[0] if plan.append_slots.size
                                  else self.caches[layer].n)
        return meta

    def _claim_slot(self) -> None:
        """Move the reader to its next staging buffer, once the device work still using the
        rows last read into that buffer is done (jax may use host rows without a copy). The
        wait is device work the reads did not hide: counted as compute."""
        t0 = time.perf_counter()
        slot = self.reader.next_slot()
        jax.block_until_ready(self._fences[slot])
        self._fences[slot] = []
        self.stats.add("compute", time.perf_counter() - t0)

    def _staged(self, size: int) -> np.ndarray:
        """The first ``size`` staging rows, to pass to jitted functions as they are: jax may
        use this memory without a copy (on CPU it usually does), and a numpy argument is
        ~10x cheaper to dispatch than a ``device_put`` first. Whatever consumes it must be
        fenced with ``_used``."""
        return self.reader.staging[:size]

    def _used(self, slot: int, result) -> None:
        """``result`` is the output of a computation that reads staging buffer ``slot``: the
        buffer is not rewritten before it is ready."""
        self._fences[slot].append(result)

    def _flush(self) -> None:
        """Dispatch the moves and appends deferred by the last overlapped layer."""
        if self._pending is not None:
            layer, slot, args = self._pending
            self._pending = None
            self.buffers[layer], fence = _update_fenced(self.buffers[layer], *args,
                                                        self._fc1_bias(layer))
            self._used(slot, fence)

    def _append(self, layer: int, buf: NeuronBuffer, ids, first_slot: int, ffn_in=None,
                out=None) -> tuple[NeuronBuffer, jax.Array | None]:
        """Read bundle rows ``ids`` (sorted array or slice) into the slots from ``first_slot``
        on, at most the layer's update size at a time. With ``ffn_in``, each part's FFN over
        its staged rows is added to ``out`` before the part is appended (the overlap uses new
        rows before they are in the buffer). Returns the updated (donated) buffer and ``out``."""
        chunk, run = self.chunks[layer], isinstance(ids, slice)
        all_ids = np.arange(self.cfg.ffn_dim, dtype=np.int32)[ids] if run else ids
        for start in range(0, all_ids.size, chunk):
            part = all_ids[start:start + chunk]
            rows, meta = self._read_staged(layer, part, bucket_for(part.size, self.sizes[layer]),
                                          run)
            if ffn_in is not None:
                out = self._ffn_new(layer, part.size, rows, meta, ffn_in, out)
            t0 = time.perf_counter()
            # Rows past part.size are stale staging data; they land in slots past the live ones.
            meta[-1] = first_slot + start
            buf, fence = _append_fenced(buf, rows, meta, self._fc1_bias(layer))
            self._used(self.reader.slot, fence)
            if not self.options.overlap:
                jax.block_until_ready(buf)
            self.stats.add("memory", time.perf_counter() - t0)
        return buf, out

    def _read_staged(self, layer: int, ids: np.ndarray, size: int, run: bool = False,
                     plan=None) -> tuple[np.ndarray, np.ndarray]:
        """Read bundle rows ``ids`` (at most ``update_rows``; with ``run``, consecutive ids
        read as one sequential range) into the next staging buffer; returns them padded to
        ``size`` rows (``_staged``) and their ``meta`` (with ``plan``, its moves too)."""
        stats = self.stats
        self._claim_slot()
        t0 = time.perf_counter()
        if ids.size:
            if run:
                self.reader.read_range(layer, int(ids[0]), int(ids[-1]) + 1)
            else:
                self.reader.read(layer, ids)
            stats.rows_per_read.append(int(ids.size))
        t1 = time.perf_counter()
        stats.add("io", t1 - t0)
        rows, meta = self._staged(size), self._meta(layer, ids, size, plan)
        stats.add("memory", time.perf_counter() - t1)
        stats.loaded(int(ids.size))
        return rows, meta

    def _cached_layer(self, layer: int, ffn_in, token_valid):
        stats, chunk = self.stats, self.chunks[layer]
        t0 = time.perf_counter()
        needed, scores = self._predict(layer, ffn_in, token_valid)
        t1 = time.perf_counter()
        stats.add("predictor", t1 - t0)
        held = self.caches[layer].n  # live slots [0, held) before this token's plan
        plan = self.caches[layer].plan(needed, self.step_count, self.options.window, scores)
        if self.options.overlap:
            # The FFN over the rows held before this token (those leaving the window too: real
            # rows of this layer, so the sum only gets closer to the dense FFN) runs while the
            # missing rows are read; the new rows' FFN reads them from the staging buffer. The
            # last layer's deferred update queues behind it. The plan comes first: made while
            # the device is idle, it does not share the cores with the FFN.
            t2 = time.perf_counter()
            out = _ffn_part(self.buffers[layer], np.int32(0), np.int32(held), ffn_in)
            t3 = time.perf_counter()
            stats.add("memory", t2 - t1)
            stats.add("compute", t3 - t2)
            t1 = t3
            self._flush()
        stats.rows_evicted += int(plan.evicted.size)
        stats.rows_dropped += plan.dropped
        stats.rows_needed += int(needed.size)
        changes = plan.holes.size or plan.missing.size
        fits = plan.holes.size <= chunk and plan.missing.size <= chunk
        if self.options.overlap:
            stats.add("memory", time.perf_counter() - t1)
            if not changes:
                return out
            if fits:  # one read; the moves and appends wait for the next layer's read
                size = bucket_for(max(plan.holes.size, plan.missing.size), self.sizes[layer])
                rows, meta = self._read_staged(layer, plan.missing, size, plan=plan)
                self._pending = (layer, self.reader.slot, (rows, meta))
                return self._ffn_new(layer, plan.missing.size, rows, meta, ffn_in, out)
            # more than one update's worth (the first tokens): moves now, then each part's
            # append right after its read, none waited for
            t3 = time.perf_counter()
            self._move(layer, plan)
            stats.add("memory", time.perf_counter() - t3)
            first = int(plan.append_slots[0]) if plan.missing.size else 0
            self.buffers[layer], out = self._append(layer, self.buffers[layer], plan.missing,
                                                    first, ffn_in, out)
            return out
        self._flush()
        if fits:  # the read, then one dispatch for the moves and appends
            stats.add("memory", time.perf_counter() - t1)
            if changes:
                size = bucket_for(max(plan.holes.size, plan.missing.size), self.sizes[layer])
                rows, meta = self._read_staged(layer, plan.missing, size, plan=plan)
                t2 = time.perf_counter()
                self.buffers[layer], _ = _update_fenced(self.buffers[layer], rows, meta,
                                                        self._fc1_bias(layer))
                jax.block_until_ready(self.buffers[layer])  # nothing reads the staging rows now
                stats.add("memory", time.perf_counter() - t2)
        else:
            self._move(layer, plan)
            jax.block_until_ready(self.buffers[layer])
            stats.add("memory", time.perf_counter() - t1)
            self.buffers[layer], _ = self._append(layer, self.buffers[layer], plan.missing,
                                                  int(plan.append_slots[0]) if plan.missing.size
                                                  else 0)
        t2 = time.perf_counter()
        out = _ffn_part(self.buffers[layer], np.int32(0), np.int32(self.caches[layer].n), ffn_in)
        out.block_until_ready()
        stats.add("compute", time.perf_counter() - t2)
        return out

    def _move(self, layer: int, plan) -> None:
        """The plan's row moves, ``update_rows`` at a time (dispatched, not waited for)."""
        chunk, buf = self.chunks[layer], self.buffers[layer]
        for start in range(0, plan.holes.size, chunk):
            holes = plan.holes[start:start + chunk]
            size = bucket_for(holes.size, self.sizes[layer])
            buf = move_rows(buf, pad(holes, size, buf.up.shape[0]),
                            pad(plan.movers[start:start + chunk], size, 0))
        self.buffers[layer] = buf

    def _ffn_new(self, layer: int, count: int, rows, meta, ffn_in, out):
        """out + the FFN over the ``count`` rows just read (from the staging buffer)."""
        if not count:
            return out
        t0 = time.perf_counter()
        out = _ffn_rows(rows, meta, self._fc1_bias(layer), ffn_in, out)
        self._used(self.reader.slot, out)
        self.stats.add("compute", time.perf_counter() - t0)
        return out

    def pinned_rows(self, layer: int) -> int:
        """Rows kept resident by the streaming baselines: none for naive; for hybrid, all
        the layer's buffer holds but one update's worth, through which the rest streams."""
        capacity = self._memory.capacities[layer]
        if not self.options.hybrid:
            return 0
        if capacity >= self.cfg.ffn_dim:
            return self.cfg.ffn_dim
        return max(0, capacity - self.chunks[layer])

    def _stream_layer(self, layer: int, ffn_in):
        """The baselines without a predictor: every row of the layer used for every token.
        Naive reads all of them from flash each time; hybrid reads the pinned part once."""
        capacity, n = self._memory.capacities[layer], self.cfg.ffn_dim
        pinned = self.pinned_rows(layer)
        if pinned and not self._pinned_loaded[layer]:  # the pinned rows come in once
            self.buffers[layer], _ = self._append(layer, self.buffers[layer], slice(0, pinned),
                                                  0)
            self._pinned_loaded[layer] = True
        out = jnp.zeros_like(ffn_in)
        t0 = time.perf_counter()
        if pinned:  # with overlap, runs under the first streamed read
            out = _ffn_part(self.buffers[layer], np.int32(0), np.int32(pinned), ffn_in, out)
            if not self.options.overlap:
                out.block_until_ready()
        self.stats.add("compute", time.perf_counter() - t0)
        chunk = capacity - pinned
        for start in range(pinned, n, chunk):
            count = min(chunk, n - start)
            buf, _ = self._append(layer, self.buffers[layer], slice(start, start + count), pinned)
            self.buffers[layer] = buf
            t0 = time.perf_counter()
            if pinned:  # only the streamed window, not the pinned rows again
                out = _ffn_window(buf, np.int32(pinned), np.int32(pinned + count), ffn_in, out,
                                  chunk)
            else:
                out = _ffn_part(buf, np.int32(0), np.int32(count), ffn_in, out)
            if not self.options.overlap:  # else it runs under the next chunk's read
                out.block_until_ready()
            self.stats.add("compute", time.perf_counter() - t0)
        self.stats.rows_needed += n
        return out

    # -- the runtime's two entry points, token by token ----------------------------------------
    def _check_cache(self, cache: KVCache) -> None:
        b, slots = cache.valid.shape
        if b > self.options.max_batch or slots > self.options.max_context:
            raise ValueError(
                f"batch {b} x {slots} KV slots exceeds what the DRAM budget reserved "
                f"(max_batch {self.options.max_batch} x max_context {self.options.max_context}); "
                f"load with larger max_batch/max_context")

    def _prefill(self, tokens, positions, valid, cache: KVCache):
        """Feed the prompt one token at a time, so the window forms as in decoding."""
        self._check_cache(cache)
        tokens, positions, valid = (np.asarray(a) for a in (tokens, positions, valid))
        logits = np.zeros((*tokens.shape, self.cfg.vocab_size), np.float32)
        for j in range(tokens.shape[1]):
            if not valid[:, j].any():  # a column of padding only: nothing to compute
                cache = cache.replace(index=cache.index + 1)
                continue
            step_logits, cache = self._step(jnp.asarray(tokens[:, j]), jnp.asarray(positions[:, j]),
                                            jnp.asarray(valid[:, j]), cache)
            logits[:, j] = np.asarray(step_logits)
        return logits, cache

    def _decode(self, tokens, positions, cache: KVCache):
        return self._step(tokens, positions, jnp.ones(tokens.shape, bool), cache)

    def generate(self, prompt_ids, max_new_tokens: int = 32, *, return_stats: bool = False,
                 **kw):
        """As ``Model.generate``; with ``return_stats`` returns ``(ids, stats)`` (see README)."""
        self.reset()
        ids = super().generate(prompt_ids, max_new_tokens, **kw)
        return (ids, self.last_stats()) if return_stats else ids

    def logits(self, token_ids, attention_mask=None) -> np.ndarray:
        self.reset()
        return super().logits(token_ids, attention_mask)

    def last_stats(self) -> dict:
        return self.stats.report(self._memory, self.reader.row_bytes, {
            "predictor": self.options.predictor, "window": self.options.window,
            "direct_io": self.options.direct_io, "capacity": self._memory.capacity,
            "capacities": list(self._memory.capacities),
            "update_rows": self._memory.update_rows,
            "oracle_bytes": sum(w.nbytes + b.nbytes for w, b in self.oracle or [])})
