"""Property tests of the neuron cache: any sequence of tokens keeps it consistent."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashjax.cache import NeuronCache, bucket_for, buckets, slack_rows
from flashjax.engine.kernels import NeuronBuffer, update_buffer
from flashjax.engine.schedule import LayerWork
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
        assert plan.streamed.size == max(0, len(set(needed)) - capacity)
        # every needed neuron is resident or streamed, never both
        assert set(needed) == resident & set(needed) | set(plan.streamed.tolist())
        assert not resident & set(plan.streamed.tolist())
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
@given(tokens=steps(24), capacity=st.integers(8, 40), window=st.integers(1, 4),
       chunk=st.sampled_from([3, 8, 40]))
def test_device_buffer_rows_equal_bundles_on_disk(tokens, capacity, window, chunk):
    """The jitted, donated buffer updates with rows from the TensorStore reader, in the pieces
    the engine makes of each plan (moves and appends together, or moves first when they
    need more than one piece)."""
    path = _store()
    manifest = Manifest.read(path)
    d = manifest.config.hidden_size
    disk = bundles.read_layer(path, 0).astype(np.float32)
    chunk = min(chunk, capacity)
    reader = FlashReader(path, manifest, max_rows=chunk, direct_io=False)
    sizes = buckets(chunk)
    # the engine's buffers: capacity rows plus the slack that padded contiguous writes touch
    cache = NeuronCache(N, capacity)
    buf = NeuronBuffer.init(capacity + slack_rows(chunk), d)
    bias_of = np.arange(N, dtype=np.float32)
    for t, needed in enumerate(tokens):
        plan = cache.plan(np.array(needed, np.int32), t, window)
        work = LayerWork(layer=0, plan=plan, index=cache, step=t, neuron_bias=bias_of,
                         activation="relu", chunk=chunk,
                         sizes=sizes, stream_chunk=chunk, stream_sizes=sizes, rows=buf.rows)
        for piece in work.pieces():
            size = work.padded(piece)
            if piece.ids.size:
                reader.read(0, piece.ids)
            buf, _ = update_buffer(buf, reader.staging[:size], work.pack(piece.ids, size, piece),
                                   bias_of)
            buf.up.block_until_ready()  # it may read the staging rows in place: before reuse
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
    assert len(sizes) <= 8 + update // 64  # a few compiled shapes
    assert max(pads) < 64  # rows computed over (and sent to an accelerator) for nothing


def test_overflow_keeps_held_rows_then_highest_scores():
    cache = NeuronCache(10, 3)
    scores = np.linspace(0, 1, 10)
    plan = cache.plan(np.array([1, 4, 7, 9, 2]), 0, 4, scores)
    assert plan.streamed.tolist() == [1, 2] and cache.resident.tolist() == [4, 7, 9]
    # 7 is held already: it stays (no re-read); the two free slots take the best missing
    # ones (6, 5); 4 and 9, in the window but not needed now, make room
    plan = cache.plan(np.array([0, 3, 5, 6, 7]), 1, 4, scores)
    assert plan.held.tolist() == [1]  # 7's slot before the plan
    assert sorted(cache.resident.tolist()) == [5, 6, 7] and plan.streamed.tolist() == [0, 3]
    assert sorted(plan.evicted.tolist()) == [4, 9]


def test_capacity_is_checked():
    with pytest.raises(ValueError, match="capacity must be in"):
        NeuronCache(10, 11)


def test_an_empty_cache_streams_everything():
    cache = NeuronCache(10, 0)
    plan = cache.plan(np.array([1, 4, 7]), 0, 4)
    assert plan.streamed.tolist() == [1, 4, 7] and cache.n == 0 and not plan.changes
