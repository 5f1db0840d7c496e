"""Property tests of the neuron cache: any sequence of tokens keeps it consistent."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashjax.cache import (NeuronBuffer, NeuronCache, append_rows, bucket_for, buckets,
                            move_rows, pad, slack_rows, update_rows)
from flashjax.store import bundles
from flashjax.store.manifest import Manifest
from flashjax.store.reader import FlashReader
from flashjax.testing import synthetic_store, tiny_opt_config

N = 64


def steps(max_needed: int):
    return st.lists(st.lists(st.integers(0, N - 1), max_size=max_needed), min_size=1,
                    max_size=25)


def apply_numpy(buf: np.ndarray, plan, disk: np.ndarray) -> None:
    buf[plan.holes] = buf[plan.movers]
    buf[plan.append_slots] = disk[plan.missing]


@settings(max_examples=300, deadline=None)
@given(tokens=steps(40), capacity=st.integers(1, N), window=st.integers(1, 6))
def test_cache_invariants(tokens, capacity, window):
    disk = np.random.default_rng(0).standard_normal((N, 3))
    cache, buf = NeuronCache(N, capacity), np.zeros((capacity, 3))
    for t, needed in enumerate(tokens):
        plan = cache.plan(np.array(needed, np.int32), t, window)
        apply_numpy(buf, plan, disk)
        cache.check()  # live rows contiguous, slot <-> id a bijection
        resident = set(cache.resident.tolist())
        assert len(plan.holes) == len(plan.movers)
        assert plan.dropped == max(0, len(set(needed)) - capacity)
        if plan.dropped == 0:
            assert set(needed) <= resident
        np.testing.assert_array_equal(buf[:cache.n], disk[cache.resident])
        recent = set().union(*map(set, tokens[max(0, t - window + 1):t + 1]))
        if len(recent) <= capacity:  # the whole window fits: exactly it is resident
            assert resident == recent
        assert not set(plan.evicted.tolist()) & resident - set(plan.missing.tolist())


class ListCache:
    """The cache policy written plainly with Python lists: the reference for the compiled plan."""

    def __init__(self, capacity):
        self.capacity, self.ids, self.last = capacity, [], []  # per live slot

    def plan(self, needed, step, window):
        missing = []
        for neuron in needed:
            if neuron in self.ids:
                self.last[self.ids.index(neuron)] = step
            else:
                missing.append(neuron)
        n = len(self.ids)
        gone = [last <= step - window for last in self.last]
        overflow = n - sum(gone) + len(missing) - self.capacity
        if overflow > 0:  # least recently needed first, then the lowest slot
            older = sorted((self.last[s], s) for s in range(n)
                           if not gone[s] and self.last[s] < step)
            for _, s in older[:overflow]:
                gone[s] = True
        new_n = n - sum(gone)
        evicted = [self.ids[s] for s in range(n) if gone[s]]
        holes = [s for s in range(new_n) if gone[s]]
        movers = [s for s in range(new_n, n) if not gone[s]]
        for h, m in zip(holes, movers):
            self.ids[h], self.last[h] = self.ids[m], self.last[m]
        self.ids = self.ids[:new_n] + missing
        self.last = self.last[:new_n] + [step] * len(missing)
        return holes, movers, list(range(new_n, new_n + len(missing))), missing, evicted


@settings(max_examples=200, deadline=None)
@given(tokens=steps(40), capacity=st.integers(1, N), window=st.integers(1, 6))
def test_plan_equals_the_plain_policy(tokens, capacity, window):
    """Same holes, movers, appends, reads and evictions as the list version, in the same order,
    and the same neuron in every slot, for any sequence (overflow of the window included)."""
    cache, ref = NeuronCache(N, capacity), ListCache(capacity)
    for t, needed in enumerate(tokens):
        needed = sorted(set(needed))[:capacity]
        plan = cache.plan(np.array(needed, np.int32), t, window)
        expected = ref.plan(needed, t, window)
        got = (plan.holes, plan.movers, plan.append_slots, plan.missing, plan.evicted)
        for name, a, b in zip(("holes", "movers", "append_slots", "missing", "evicted"), got,
                              expected):
            assert a.tolist() == b, (t, name)
            assert a.dtype == np.int32, name
        assert cache.resident.tolist() == ref.ids


@functools.lru_cache(maxsize=1)
def _store():
    root = Path(tempfile.mkdtemp())
    return synthetic_store(root, tiny_opt_config(ffn_dim=N, num_hidden_layers=1))


@settings(max_examples=30, deadline=None)
@given(tokens=steps(24), capacity=st.integers(8, 40), window=st.integers(1, 4))
def test_device_buffer_rows_equal_bundles_on_disk(tokens, capacity, window):
    """The jitted, donated row moves and appends with rows from the TensorStore reader."""
    path = _store()
    manifest = Manifest.read(path)
    d = manifest.config.hidden_size
    disk = bundles.read_layer(path, 0).astype(np.float32)
    reader = FlashReader(path, manifest, max_rows=capacity, direct_io=False)
    sizes = buckets(capacity)
    # the engine's buffers: capacity rows plus the slack that padded contiguous writes touch
    cache = NeuronCache(N, capacity)
    buf = NeuronBuffer.init(capacity + slack_rows(capacity), d)
    out = buf.up.shape[0]  # an out-of-range slot: padded moves are dropped
    bias_of = np.arange(N, dtype=np.float32)
    for t, needed in enumerate(tokens):
        plan = cache.plan(np.array(needed, np.int32), t, window)
        start = np.int32(plan.append_slots[0] if plan.missing.size else cache.n)
        if plan.missing.size:
            reader.read(0, plan.missing)
        # as the engine, no update when nothing changes (a padded write at n = capacity could
        # run past the slack)
        if plan.holes.size or plan.missing.size:
            size = bucket_for(max(plan.holes.size, plan.missing.size), sizes)
            bias = np.zeros(size, np.float32)
            bias[:plan.missing.size] = bias_of[plan.missing]
            if t % 2:  # the engine's fused update
                buf = update_rows(buf, pad(plan.holes, size, out), pad(plan.movers, size, 0), start,
                                  reader.staging[:size], bias)
            else:  # moves, then appends, as separate dispatches
                buf = move_rows(buf, pad(plan.holes, size, out), pad(plan.movers, size, 0))
                if plan.missing.size:
                    buf = append_rows(buf, start, reader.staging[:size], bias)
        cache.check()
        live = cache.resident
        np.testing.assert_array_equal(np.asarray(buf.up)[:cache.n], disk[live, :d])
        np.testing.assert_array_equal(np.asarray(buf.down)[:cache.n], disk[live, d:])
        np.testing.assert_array_equal(np.asarray(buf.bias)[:cache.n], bias_of[live])


@pytest.mark.parametrize("update", [1, 7, 8, 100, 128, 129, 300, 1024, 1100])
def test_padding_stays_within_the_slack(update):
    sizes = buckets(update)
    assert sizes == sorted(set(sizes)) and sizes[-1] == update
    pads = [bucket_for(c, sizes) - c for c in range(1, update + 1)]
    assert max(pads) <= slack_rows(update)
    assert len(sizes) <= 8 + update // 128  # a few compiled shapes


def test_overflow_keeps_highest_scores():
    cache = NeuronCache(10, 3)
    scores = np.linspace(0, 1, 10)
    plan = cache.plan(np.array([1, 4, 7, 9, 2]), 0, 4, scores)
    assert plan.dropped == 2 and sorted(cache.resident.tolist()) == [4, 7, 9]


def test_capacity_is_checked():
    with pytest.raises(ValueError, match="capacity must be in"):
        NeuronCache(10, 11)
