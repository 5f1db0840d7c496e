"""Per-layer neuron cache: which FFN neurons are resident in DRAM, in which slot, since when.

The paper's memory management: a preallocated buffer of ``capacity`` rows per layer; the live
rows are always slots ``[0, n)``. Deleting neurons moves the last live rows into the freed
slots; new neurons are appended after the last live row; an index maps slot -> neuron id (and
back). Nothing is reallocated. This module is the host-side bookkeeping and plans the device
updates; ``flashjax.engine.state.NeuronBuffer`` holds the rows themselves.

A token may need more neurons than a layer's buffer holds (an early layer of a real ReLU model
fires 40-50% of its neurons; the naive baseline needs all of them). The plan then keeps what
fits and names the rest ``streamed``: those rows are read and computed through the staging
buffer without being inserted, so the token still gets every row it needs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

NEVER = np.iinfo(np.int64).min // 2  # last-used step of a slot that holds nothing
_EMPTY = np.zeros(0, np.int32)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one token changes in one layer's cache (all int32 numpy arrays).

    holes[i] <- movers[i]: live rows moved into the slots of deleted neurons;
    append_slots[i] <- missing[i]: neurons to read from flash and insert, ascending ids;
    streamed: neurons needed but not kept (no room), read and computed without insertion;
    held: the slots, before this plan's moves, of the needed neurons that were resident.
    """

    holes: np.ndarray
    movers: np.ndarray
    append_slots: np.ndarray
    missing: np.ndarray
    evicted: np.ndarray  # neuron ids that left the cache
    streamed: np.ndarray
    held: np.ndarray

    @property
    def changes(self) -> bool:
        return bool(self.holes.size or self.missing.size)


class NeuronCache:
    """Slot bookkeeping for one layer: capacity C slots over N neurons (C = 0: holds nothing,
    every needed row is streamed)."""

    def __init__(self, n_neurons: int, capacity: int):
        if not 0 <= capacity <= n_neurons:
            raise ValueError(f"capacity must be in [0, {n_neurons}], got {capacity}")
        self.capacity = capacity
        self.slot_ids = np.full(capacity, -1, np.int32)  # slot -> neuron id, -1 when free
        self.slot_of = np.full(n_neurons, -1, np.int32)  # neuron id -> slot, -1 when absent
        # slot -> last step it was needed; one spare entry past the slots, which lookups of
        # absent neurons (slot -1) write to
        self.last_used = np.full(capacity + 1, NEVER, np.int64)
        self.n = 0  # live slots are [0, n)

    @property
    def resident(self) -> np.ndarray:
        return self.slot_ids[:self.n]

    def needed_slots(self, step: int) -> np.ndarray:
        """The slots (after the last plan) of the neurons needed by token ``step``."""
        return np.flatnonzero(self.last_used[:self.n] == step).astype(np.int32)

    def plan(self, needed: np.ndarray, step: int, window: int,
             scores: np.ndarray | None = None) -> Plan:
        """Make ``needed`` (neuron ids) resident for token ``step`` and update the bookkeeping.

        Keeps every neuron needed by one of the last ``window`` tokens while there is room;
        beyond that evicts the least recently needed. If ``needed`` alone exceeds the capacity,
        the needed neurons already resident stay, the free slots take the missing ones with
        the highest ``scores`` (the lowest ids when no scores), and the rest are ``streamed``.
        """
        needed = np.asarray(needed, np.int32)
        if needed.size > 1 and not (needed[1:] > needed[:-1]).all():  # predictors give sorted
            needed = np.unique(needed)
        slots = self.slot_of[needed]
        held = slots[slots >= 0]
        streamed = _EMPTY
        if needed.size > self.capacity:
            absent = needed[slots < 0]
            room = self.capacity - held.size
            if scores is not None and 0 < room < absent.size:
                top = np.zeros(absent.size, bool)
                top[np.argpartition(-scores[absent], room - 1)[:room]] = True
            else:
                top = np.arange(absent.size) < room
            streamed = absent[~top]
            needed = np.sort(np.concatenate([needed[slots >= 0], absent[top]]))
        if self.capacity == 0:
            return Plan(_EMPTY, _EMPTY, _EMPTY, _EMPTY, _EMPTY, streamed, _EMPTY)
        self.n, holes, movers, missing, evicted = _plan_kernel(
            self.slot_ids, self.slot_of, self.last_used, self.n, needed, step, window)
        return Plan(holes=holes, movers=movers,
                    append_slots=np.arange(self.n - missing.size, self.n, dtype=np.int32),
                    missing=missing, evicted=evicted, streamed=streamed, held=held)

    def check(self) -> None:
        """Invariants (for tests): live slots contiguous, index a bijection."""
        live = self.slot_ids[:self.n]
        assert (live >= 0).all() and (self.slot_ids[self.n:] == -1).all()
        assert np.unique(live).size == self.n
        assert (self.slot_of[live] == np.arange(self.n)).all()
        assert (self.slot_of >= 0).sum() == self.n


def _plan_kernel(slot_ids, slot_of, last_used, n, needed, step, window):
    """``NeuronCache.plan`` once ``needed`` fits: updates the three index arrays in place and
    returns (new n, holes, movers, missing, evicted). A dozen numpy calls: compiled with numba
    it took 3.8-4.2 against 5.5-6.1 ms of a 262-291 ms token at OPT-1.3B shape (24 layers,
    ``scripts/plan_cost.py`` of commit 3cf56af), under 1% of the token: not worth a compiler
    as a dependency."""
    capacity = slot_ids.size
    slots = slot_of[needed]
    last_used[slots] = step  # absent ones (-1) land in the spare entry
    missing = needed[slots < 0]
    live_last = last_used[:n]
    gone = live_last <= step - window  # slots whose neurons left the window
    out = int(np.count_nonzero(gone))
    overflow = n - out + missing.size - capacity
    if overflow > 0:  # the window holds more than fits: drop the least recently needed
        keep = np.flatnonzero(~gone)
        keep = keep[live_last[keep] < step]  # never the current token's neurons
        gone[keep[np.argsort(live_last[keep], kind="stable")[:overflow]]] = True
        out += min(overflow, keep.size)
    new_n = n - out
    evicted = holes = movers = _EMPTY
    if out:
        evicted = slot_ids[:n][gone]
        # slots below the new end that empty are holes, filled by the live rows past it
        holes = np.flatnonzero(gone[:new_n]).astype(np.int32)
        movers = np.flatnonzero(~gone[new_n:]).astype(np.int32) + np.int32(new_n)
        slot_of[evicted] = -1
        moved = slot_ids[movers]
        slot_ids[holes] = moved
        last_used[holes] = last_used[movers]
        slot_of[moved] = holes
        slot_ids[new_n:n] = -1
        last_used[new_n:n] = NEVER
    end = new_n + missing.size
    slot_ids[new_n:end] = missing
    slot_of[missing] = np.arange(new_n, end, dtype=np.int32)
    last_used[new_n:end] = step
    return end, holes, movers, missing, evicted


# the largest step between padded sizes: at most 63 padded rows per read (a layer's read at
# OPT-6.7B shape, ~414 rows, was padded by a quarter with 128)
ROW_STEP = 64


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
