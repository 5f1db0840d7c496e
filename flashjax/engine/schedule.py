"""Schedulers: when a layer's reads, buffer updates and FFN pieces run.

Both compute the FFN over the same rows, the token's needed set: the rows already held, the
rows read and inserted this token, and the rows streamed past the buffer (needed, no room).
Only the timing differs.

``Sequential`` waits for every piece and times each on its own. ``Overlapped`` puts device
work under the reads: the FFN over the held rows is dispatched before the missing rows are
read, the new rows go through the FFN straight from the staging buffer, and a layer's moves
and appends are deferred until the next layer starts reading, so they run under that read.
jax dispatches asynchronously and XLA:CPU runs one computation at a time, in order, so this
ordering is what puts device work under I/O. It alternates two staging buffers; on CPU jax
reads staging rows without a copy (an accelerator gets a copy, ``engine.transfer``), so each
buffer is fenced until the work reading it is done. The
phases are the host's time: work hidden under a read costs nothing; what is not hidden shows
up where the host next waits for a result (compute).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from flashjax.cache import NeuronCache, Plan, bucket_for
from flashjax.engine.kernels import (RowUpdate, ffn_held, ffn_staged, move_rows, update_buffer,
                                     zeros_like)
from flashjax.engine.stats import Stats
from flashjax.engine.transfer import Transfers
from flashjax.store.quant import Quant
from flashjax.store.reader import FlashReader

RUN_ROWS = 32  # consecutive ids from this many on are read as one byte range


@dataclasses.dataclass(frozen=True)
class Piece:
    """One staging buffer's worth of a layer's update: rows ``ids`` read and appended from
    slot ``start``, after the moves ``holes[i] <- movers[i]``."""

    ids: np.ndarray
    holes: np.ndarray
    movers: np.ndarray
    start: int


@dataclasses.dataclass(frozen=True)
class LayerWork:
    """What one token needs from one layer, as the host planned it.

    plan: the cache's plan, made by ``index`` for token ``step``; neuron_bias: the layer's
    resident per-neuron bias [N] (rows take theirs along), or None; activation: the FFN's
    (``ModelConfig.activation``) and threshold its calibrated threshold (a device scalar) or
    None; chunk, sizes: the most rows one update
    piece holds and the padded sizes (bounded by the buffer); stream_chunk, stream_sizes: the
    same for streamed rows (bounded by the staging buffer); rows: the buffer's rows."""

    layer: int
    plan: Plan
    index: NeuronCache
    step: int
    neuron_bias: jax.Array | None
    activation: str
    chunk: int
    sizes: list[int]
    stream_chunk: int
    stream_sizes: list[int]
    rows: int
    threshold: jax.Array | None = None
    quant: Quant | None = None  # the staged rows' quantization, or None
    scales: jax.Array | None = None  # the layer's resident row scales [N, G] (scales="dram")

    def update(self, buf, rows, packed):
        """``update_buffer`` of these staged rows (None: a piece of moves only): (new buffer,
        fence)."""
        if rows is None:
            return move_rows(buf, packed)
        return update_buffer(buf, rows, packed, self.neuron_bias, self.scales, quant=self.quant)

    def ffn_staged(self, rows, packed, ffn_in, acc):
        """``ffn_staged`` over these staged rows: acc + their FFN."""
        return ffn_staged(rows, packed, self.neuron_bias, ffn_in, acc,
                          activation=self.activation, threshold=self.threshold,
                          scales=self.scales, quant=self.quant)

    def needed_after(self) -> np.ndarray:
        """The slots needed by this token once the plan is applied."""
        return self.index.needed_slots(self.step)

    def mask(self, slots: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.rows, bool)
        mask[slots] = True
        return mask

    def pieces(self) -> list[Piece]:
        """The plan's moves and appends in pieces of at most ``chunk``. All moves precede all
        appends (movers sit where appends go), so the moves share the first piece only when
        they fit in one."""
        p, chunk = self.plan, self.chunk
        if not p.changes:
            return []
        none = p.missing[:0]
        first = int(p.append_slots[0]) if p.missing.size else 0
        appends = [(p.missing[i:i + chunk], first + i) for i in range(0, p.missing.size, chunk)]
        if p.holes.size <= chunk:
            ids, start = appends[0] if appends else (none, 0)
            return [Piece(ids, p.holes, p.movers, start),
                    *(Piece(ids, none, none, start) for ids, start in appends[1:])]
        moves = [Piece(none, p.holes[i:i + chunk], p.movers[i:i + chunk], 0)
                 for i in range(0, p.holes.size, chunk)]
        return moves + [Piece(ids, none, none, start) for ids, start in appends]

    def padded(self, piece: Piece) -> int:
        """The staged rows a piece's update takes (its count padded to a compiled size)."""
        return bucket_for(max(piece.ids.size, piece.holes.size), self.sizes)

    def streamed(self) -> list[tuple[np.ndarray, int]]:
        """The streamed rows in staging-sized pieces: (ids, padded size) each."""
        ids, chunk = self.plan.streamed, self.stream_chunk
        return [(part, bucket_for(part.size, self.stream_sizes))
                for part in (ids[i:i + chunk] for i in range(0, ids.size, chunk))]

    def pack(self, piece_ids, size: int, piece: Piece | None = None) -> np.ndarray:
        if piece is None:
            return RowUpdate.pack(size, piece_ids, no_slot=self.rows)
        return RowUpdate.pack(size, piece_ids, no_slot=self.rows, holes=piece.holes,
                              movers=piece.movers, start=piece.start)


class _Schedule:
    def __init__(self, reader: FlashReader, transfers: Transfers | None = None):
        self.reader = reader
        self.transfers = Transfers() if transfers is None else transfers

    def _claim(self, stats: Stats) -> None:
        """Make a staging buffer ready for the next read."""

    def _read(self, stats: Stats, layer: int, ids: np.ndarray, size: int, streamed: bool):
        """Rows ``ids`` into a staging buffer; returns its first ``size`` rows (host memory:
        see ``_stage``)."""
        self._claim(stats)
        if ids.size:
            with stats.phase("io"):
                if ids.size >= RUN_ROWS and ids[-1] - ids[0] + 1 == ids.size:
                    self.reader.read_range(layer, int(ids[0]), int(ids[-1]) + 1)
                else:
                    self.reader.read(layer, ids)
            stats.read(int(ids.size), streamed=streamed, requests=self.reader.last_requests,
                       request_bytes=self.reader.last_request_bytes)
        return self.reader.staging[:size]

    def _stage(self, stats: Stats, rows, packed):
        """Staged rows (None: none, a piece of moves only) and their packed update as the
        device's inputs: only rows read this token cross, in one transfer with their plan."""
        if rows is None:
            return None, *self.transfers.put(stats, "plan", packed)
        return self.transfers.stage(stats, rows, packed)

    def _mask(self, stats: Stats, work: LayerWork, slots: np.ndarray):
        return self.transfers.put(stats, "plan", work.mask(slots))[0]

    def flush(self, buffers: list, stats: Stats) -> None:
        """Dispatch what the schedule deferred (at the end of a token)."""

    def reset(self) -> None:
        """Forget deferred work (a new generation)."""


class Sequential(_Schedule):
    """Each piece dispatched and waited for in turn: updates, the FFN over the buffer, then
    the streamed rows."""

    def layer(self, buffers: list, work: LayerWork, ffn_in, stats: Stats):
        layer, out = work.layer, None
        for piece in work.pieces():
            size = work.padded(piece)
            rows = self._read(stats, layer, piece.ids, size, streamed=False)
            with stats.phase("memory"):
                rows, packed = self._stage(stats, rows if piece.ids.size else None,
                                           work.pack(piece.ids, size, piece))
                buffers[layer], _ = work.update(buffers[layer], rows, packed)
                jax.block_until_ready(buffers[layer])  # nothing reads the staging rows now
        needed = work.needed_after()
        if needed.size:
            with stats.phase("compute"):
                out = ffn_held(buffers[layer], self._mask(stats, work, needed), ffn_in, out,
                               activation=work.activation, threshold=work.threshold)
                out.block_until_ready()
        for ids, size in work.streamed():
            rows = self._read(stats, layer, ids, size, streamed=True)
            with stats.phase("compute"):
                out = work.ffn_staged(*self._stage(stats, rows, work.pack(ids, size)), ffn_in,
                                      out)
                out.block_until_ready()
        return zeros_like(ffn_in) if out is None else out


class Overlapped(_Schedule):
    """Device work under the reads; owns the staging ring, its fences and the deferred
    update."""

    def __init__(self, reader: FlashReader, transfers: Transfers | None = None):
        super().__init__(reader, transfers)
        self.reset()

    def reset(self) -> None:
        self._pending = None  # (LayerWork, staging slot, rows, packed): an update
        self._fences = [[] for _ in range(self.reader.slots)]

    def _claim(self, stats: Stats) -> None:
        """Move to the next staging buffer once the device work still using the rows last
        read into it is done. The wait is device work the reads did not hide: compute."""
        with stats.phase("compute"):
            slot = self.reader.next_slot()
            jax.block_until_ready(self._fences[slot])
            self._fences[slot] = []

    def fence(self, result) -> None:
        """``result`` comes from work reading the current staging buffer: the buffer is not
        rewritten before it is ready."""
        self._fences[self.reader.slot].append(result)

    def flush(self, buffers: list, stats: Stats) -> None:
        if self._pending is not None:
            work, slot, rows, packed = self._pending
            self._pending = None
            with stats.phase("memory"):
                buffers[work.layer], fence = work.update(buffers[work.layer], rows, packed)
                self._fences[slot].append(fence)

    def _ffn_new(self, stats, rows, packed, work, ffn_in, out):
        with stats.phase("compute"):
            out = work.ffn_staged(rows, packed, ffn_in, out)
            self.fence(out)
        return out

    def layer(self, buffers: list, work: LayerWork, ffn_in, stats: Stats):
        layer, out, plan = work.layer, None, work.plan
        if plan.held.size:  # the rows held before this token, on the device while we read
            with stats.phase("compute"):
                out = ffn_held(buffers[layer], self._mask(stats, work, plan.held), ffn_in, out,
                               activation=work.activation, threshold=work.threshold)
        self.flush(buffers, stats)  # the last layer's update queues behind it
        pieces, streamed = work.pieces(), work.streamed()
        # the common case, one piece and nothing streamed: its update waits for the next
        # layer's read (streamed reads would reuse its staging buffer before that)
        defer = len(pieces) == 1 and not streamed
        for piece in pieces:
            size = work.padded(piece)
            rows = self._read(stats, layer, piece.ids, size, streamed=False)
            with stats.phase("memory"):
                rows, packed = self._stage(stats, rows if piece.ids.size else None,
                                           work.pack(piece.ids, size, piece))
            if piece.ids.size:
                out = self._ffn_new(stats, rows, packed, work, ffn_in, out)
            if defer:
                self._pending = (work, self.reader.slot, rows, packed)
                break
            with stats.phase("memory"):
                buffers[layer], fence = work.update(buffers[layer], rows, packed)
                self.fence(fence)
        for ids, size in streamed:
            rows = self._read(stats, layer, ids, size, streamed=True)
            with stats.phase("memory"):
                rows, packed = self._stage(stats, rows, work.pack(ids, size))
            out = self._ffn_new(stats, rows, packed, work, ffn_in, out)
        return zeros_like(ffn_in) if out is None else out
