"""Per-layer neuron cache: which FFN neurons are resident in DRAM, in which slot, since when.

The paper's memory management: a preallocated buffer of ``capacity`` rows per layer; the live
rows are always slots ``[0, n)``. Deleting neurons moves the last live rows into the freed
slots; new neurons are appended after the last live row; an index maps slot -> neuron id (and
back). Nothing is reallocated. This module is the host-side bookkeeping and plans the device
updates; ``NeuronBuffer`` holds the rows themselves.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

NEVER = np.iinfo(np.int64).min // 2  # last-used step of a slot that holds nothing
_EMPTY = np.zeros(0, np.int32)
_EMPTY.flags.writeable = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one token changes in one layer's cache (all int32 numpy arrays).

    holes[i] <- movers[i]: live rows moved into the slots of deleted neurons;
    append_slots[i] <- missing[i]: neurons to read from flash, in ascending id order.
    """

    holes: np.ndarray
    movers: np.ndarray
    append_slots: np.ndarray
    missing: np.ndarray
    evicted: np.ndarray  # neuron ids that left the cache
    dropped: int  # needed neurons that did not fit (lowest scores first)


class NeuronCache:
    """Slot bookkeeping for one layer: capacity C slots over N neurons."""

    def __init__(self, n_neurons: int, capacity: int):
        if not 0 < capacity <= n_neurons:
            raise ValueError(f"capacity must be in [1, {n_neurons}], got {capacity}")
        self.capacity = capacity
        self.slot_ids = np.full(capacity, -1, np.int32)  # slot -> neuron id, -1 when free
        self.slot_of = np.full(n_neurons, -1, np.int32)  # neuron id -> slot, -1 when absent
        # slot -> last step it was needed; one spare entry at the end, which lookups of absent
        # neurons (slot -1) write to, so that hits need no mask
        self.last_used = np.full(capacity + 1, NEVER, np.int64)
        self.n = 0  # live slots are [0, n)

    @property
    def resident(self) -> np.ndarray:
        return self.slot_ids[:self.n]

    def plan(self, needed: np.ndarray, step: int, window: int,
             scores: np.ndarray | None = None) -> Plan:
        """Make ``needed`` (neuron ids) resident for token ``step`` and update the bookkeeping.

        Keeps every neuron needed by one of the last ``window`` tokens while there is room;
        beyond that evicts the least recently needed. If ``needed`` alone exceeds the capacity,
        keeps the highest ``scores`` (or the lowest ids when no scores) and counts the rest as
        dropped.
        """
        needed = np.asarray(needed, np.int32)
        if needed.size > 1 and not (needed[1:] > needed[:-1]).all():  # predictors give sorted
            needed = np.unique(needed)
        dropped = 0
        if needed.size > self.capacity:
            dropped = needed.size - self.capacity
            if scores is None:
                needed = needed[:self.capacity]
            else:
                top = np.argpartition(-scores[needed], self.capacity - 1)[:self.capacity]
                needed = np.sort(needed[top])
        slots = self.slot_of[needed]
        self.last_used[slots] = step  # absent ones (-1) land in the spare entry
        missing = needed[slots < 0]

        n = self.n
        live_last = self.last_used[:n]
        gone = live_last <= step - window  # slots whose neurons left the window
        out = int(np.count_nonzero(gone))
        overflow = n - out + missing.size - self.capacity
        if overflow > 0:  # the window holds more than fits: drop the least recently needed
            keep = np.flatnonzero(~gone)
            keep = keep[live_last[keep] < step]  # never the current token's neurons
            gone[keep[np.argsort(live_last[keep], kind="stable")[:overflow]]] = True
            out += min(overflow, keep.size)
        new_n = n - out
        if out:
            evicted = self.slot_ids[:n][gone]
            # slots below the new end that empty are holes, filled by the live rows past it
            holes = np.flatnonzero(gone[:new_n]).astype(np.int32)
            movers = np.flatnonzero(~gone[new_n:]).astype(np.int32) + np.int32(new_n)
            self.slot_of[evicted] = -1
            moved = self.slot_ids[movers]
            self.slot_ids[holes] = moved
            self.last_used[holes] = self.last_used[movers]
            self.slot_of[moved] = holes
            self.slot_ids[new_n:n] = -1
            self.last_used[new_n:n] = NEVER
        else:
            evicted = holes = movers = _EMPTY

        end = new_n + missing.size
        append_slots = np.arange(new_n, end, dtype=np.int32)
        self.slot_ids[new_n:end] = missing
        self.slot_of[missing] = append_slots
        self.last_used[new_n:end] = step
        self.n = end
        return Plan(holes=holes, movers=movers, append_slots=append_slots, missing=missing,
                    evicted=evicted, dropped=int(dropped))

    def check(self) -> None:
        """Invariants (for tests): live slots contiguous, index a bijection."""
        live = self.slot_ids[:self.n]
        assert (live >= 0).all() and (self.slot_ids[self.n:] == -1).all()
        assert np.unique(live).size == self.n
        assert (self.slot_of[live] == np.arange(self.n)).all()
        assert (self.slot_of >= 0).sum() == self.n


@struct.dataclass
class NeuronBuffer:
    """One layer's resident rows, fixed shape. Let C be capacity, D model width.

    up: [C, D] up-projection columns (fc1 rows); down: [C, D] down-projection rows;
    bias: [C] fc1 bias of each slot's neuron. Rows at slots >= n are stale and masked out.
    """

    up: jax.Array
    down: jax.Array
    bias: jax.Array

    @classmethod
    def init(cls, capacity: int, d_model: int, dtype=jnp.float32) -> NeuronBuffer:
        return cls(up=jnp.zeros((capacity, d_model), dtype),
                   down=jnp.zeros((capacity, d_model), dtype),
                   bias=jnp.zeros((capacity,), dtype))

    @property
    def nbytes(self) -> int:
        return self.up.nbytes + self.down.nbytes + self.bias.nbytes


@functools.partial(jax.jit, donate_argnums=0)
def move_rows(buf: NeuronBuffer, holes, movers) -> NeuronBuffer:
    """buf[holes] = buf[movers]; padded entries of holes are out of range and dropped.
    ``buf`` is donated: rebind it to the result."""
    return NeuronBuffer(up=buf.up.at[holes].set(buf.up[movers], mode="drop"),
                        down=buf.down.at[holes].set(buf.down[movers], mode="drop"),
                        bias=buf.bias.at[holes].set(buf.bias[movers], mode="drop"))


@functools.partial(jax.jit, donate_argnums=0)
def append_rows(buf: NeuronBuffer, start, rows, bias) -> NeuronBuffer:
    """buf[start:start + A] = bundle rows [A, 2D] split into up and down halves, cast to the
    buffer dtype: one contiguous write (appended slots are always a run at the end of the live
    rows). Rows past those that matter land in slots beyond the live ones, which are stale
    anyway; the buffer's ``slack_rows`` keep such a padded write inside it."""
    d = buf.up.shape[1]
    return NeuronBuffer(
        up=jax.lax.dynamic_update_slice_in_dim(buf.up, rows[:, :d].astype(buf.up.dtype), start, 0),
        down=jax.lax.dynamic_update_slice_in_dim(buf.down, rows[:, d:].astype(buf.down.dtype),
                                                 start, 0),
        bias=jax.lax.dynamic_update_slice_in_dim(buf.bias, bias.astype(buf.bias.dtype), start, 0))


@functools.partial(jax.jit, donate_argnums=0)
def update_rows(buf: NeuronBuffer, holes, movers, start, rows, bias) -> NeuronBuffer:
    """One token's whole change to a layer's buffer in one dispatch: ``move_rows`` then
    ``append_rows`` (appended slots may be slots the moves emptied)."""
    return append_rows.__wrapped__(move_rows.__wrapped__(buf, holes, movers), start, rows, bias)


ROW_STEP = 128  # the largest step between padded sizes


def row_step(update_rows: int) -> int:
    """The step between padded sizes beyond the powers of two: 1/8 of the largest update, a
    power of two from 32 to ``ROW_STEP``: fewer sizes to compile for large updates, less padding
    (and buffer slack) for small ones."""
    step = 32
    while step < ROW_STEP and step * 8 <= update_rows:
        step *= 2
    return step


def buckets(capacity: int, smallest: int = 8) -> list[int]:
    """Padded sizes for per-token row counts: powers of two up to ``row_step(capacity)``, then
    multiples of it, up to and then ``capacity``. A count is padded by less than
    ``slack_rows(capacity)``."""
    step = row_step(capacity)
    sizes, s = [], smallest
    while s < min(capacity, step):
        sizes.append(s)
        s *= 2
    s = step
    while s < capacity:
        sizes.append(s)
        s += step
    return sorted(set(sizes)) + [capacity]


def slack_rows(update_rows: int) -> int:
    """Rows past a buffer's capacity that padded writes of at most ``update_rows`` rows can
    touch (a bound on ``bucket_for(c) - c`` over the sizes of ``buckets(u)``, u <= update_rows)."""
    return max(0, min(row_step(update_rows), update_rows) - 1)


def bucket_for(count: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= count)


def pad(values: np.ndarray, size: int, fill: int) -> np.ndarray:
    out = np.full(size, fill, np.int32)
    out[:values.size] = values
    return out
