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
import numba
import numpy as np
from flax import struct

NEVER = np.iinfo(np.int64).min // 2  # last-used step of a slot that holds nothing


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
        self.last_used = np.full(capacity, NEVER, np.int64)  # slot -> last step it was needed
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
        self.n, holes, movers, missing, evicted = _plan_kernel(
            self.slot_ids, self.slot_of, self.last_used, self.n, needed, step, window)
        return Plan(holes=holes, movers=movers,
                    append_slots=np.arange(self.n - missing.size, self.n, dtype=np.int32),
                    missing=missing, evicted=evicted, dropped=int(dropped))

    def check(self) -> None:
        """Invariants (for tests): live slots contiguous, index a bijection."""
        live = self.slot_ids[:self.n]
        assert (live >= 0).all() and (self.slot_ids[self.n:] == -1).all()
        assert np.unique(live).size == self.n
        assert (self.slot_of[live] == np.arange(self.n)).all()
        assert (self.slot_of >= 0).sum() == self.n


@numba.njit(cache=True, nogil=True)
def _plan_kernel(slot_ids, slot_of, last_used, n, needed, step, window):
    """``NeuronCache.plan`` once ``needed`` fits: updates the three index arrays in place and
    returns (new n, holes, movers, missing, evicted). Compiled: the plan runs once per layer and
    token, and as a dozen small numpy calls it cost more host time than the update it plans."""
    capacity = slot_ids.size
    missing = np.empty(needed.size, np.int32)
    n_missing = 0
    for neuron in needed:
        slot = slot_of[neuron]
        if slot < 0:
            missing[n_missing] = neuron
            n_missing += 1
        else:
            last_used[slot] = step
    gone = np.empty(n, np.bool_)  # slots whose neurons leave
    out = 0
    for slot in range(n):
        gone[slot] = last_used[slot] <= step - window
        if gone[slot]:
            out += 1
    overflow = n - out + n_missing - capacity
    if overflow > 0:  # the window holds more than fits: drop the least recently needed
        keep = np.empty(n - out, np.int64)
        k = 0
        for slot in range(n):  # never the current token's neurons
            if not gone[slot] and last_used[slot] < step:
                keep[k] = slot
                k += 1
        order = np.argsort(last_used[keep[:k]], kind="mergesort")  # stable: lowest slot first
        for i in range(min(overflow, k)):
            gone[keep[order[i]]] = True
        out += min(overflow, k)
    new_n = n - out
    evicted = np.empty(out, np.int32)
    holes = np.empty(out, np.int32)
    movers = np.empty(out, np.int32)
    e = h = m = 0
    for slot in range(n):
        if gone[slot]:
            evicted[e] = slot_ids[slot]
            e += 1
            if slot < new_n:  # slots below the new end that empty are holes...
                holes[h] = slot
                h += 1
        elif slot >= new_n:  # ...filled by the live rows past it
            movers[m] = slot
            m += 1
    for neuron in evicted:
        slot_of[neuron] = -1
    for i in range(h):
        neuron = slot_ids[movers[i]]
        slot_ids[holes[i]] = neuron
        last_used[holes[i]] = last_used[movers[i]]
        slot_of[neuron] = holes[i]
    for slot in range(new_n, n):
        slot_ids[slot] = -1
        last_used[slot] = NEVER
    for i in range(n_missing):
        slot_ids[new_n + i] = missing[i]
        slot_of[missing[i]] = new_n + i
        last_used[new_n + i] = step
    return new_n + n_missing, holes[:h], movers[:m], missing[:n_missing], evicted


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
