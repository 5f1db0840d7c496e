"""Activity traces: mapping keeps the source's statistics; the engine follows a trace exactly."""

from __future__ import annotations

import numpy as np
import pytest

import flashjax
from flashjax.bench.activity import (
    ActivityTrace,
    TraceError,
    TraceSelector,
    layer_map,
    map_onto,
    statistics,
)
from flashjax.testing import synthetic_store, tiny_opt_config

CFG = tiny_opt_config(hidden_size=64, ffn_dim=512, num_hidden_layers=2)
PROMPT = [2, 11, 25, 37]


def markov_trace(tokens, layers, neurons, active, stay, seed=0) -> np.ndarray:
    """Per neuron a two-state chain: active w.p. ``active`` on average, and an active neuron
    stays active with probability ``stay`` (token-to-token overlap)."""
    rng = np.random.default_rng(seed)
    rise = active * (1 - stay) / (1 - active)
    a = np.zeros((tokens, layers, neurons), bool)
    a[0] = rng.random((layers, neurons)) < active
    for t in range(1, tokens):
        u = rng.random((layers, neurons))
        a[t] = np.where(a[t - 1], u < stay, u < rise)
    return a


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace-store")
    return synthetic_store(root, CFG, seed=5)


def test_map_keeps_sparsity_and_overlap():
    src = ActivityTrace(np.concatenate([markov_trace(400, 1, 128, active, stay, seed=i)
                                        for i, (active, stay) in
                                        enumerate([(0.3, 0.6), (0.05, 0.4), (0.1, 0.5)])],
                                       axis=1))
    mapped = map_onto(src, n_layers=6, n_neurons=1024, seed=2, how="proportional")
    assert mapped.shape == (400, 6, 1024)
    s, m = statistics(src.active), statistics(mapped.active)
    assert mapped.meta["layer_map"] == [0, 0, 1, 1, 2, 2]
    for layer, source_layer in enumerate(mapped.meta["layer_map"]):
        # each replica is a cyclic shift of the source tokens: the same mean, exactly
        assert m["active_fraction"][layer] == pytest.approx(s["active_fraction"][source_layer],
                                                            abs=1e-12)
        # overlap and window statistics differ only at the wrap-around token
        assert m["overlap_prev"][layer] == pytest.approx(s["overlap_prev"][source_layer],
                                                         abs=0.02)
        for k in ("1", "4"):
            assert m["new_fraction"][k][layer] == pytest.approx(
                s["new_fraction"][k][source_layer], abs=0.01)
    # the two source layers really differ, so the check above can tell them apart
    assert abs(s["active_fraction"][0] - s["active_fraction"][1]) > 0.1


def test_layer_maps():
    # the first layer stays apart; the rest stretch over the remaining depth
    assert layer_map(6, 32) == [0] + [1 + (i - 1) * 5 // 31 for i in range(1, 32)]
    assert layer_map(6, 32).count(0) == 1 and layer_map(6, 32)[-1] == 5
    assert layer_map(3, 6, "proportional") == [0, 0, 1, 1, 2, 2]
    assert layer_map(3, 6) == [0, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="layer_map must be"):
        layer_map(3, 6, "other")


def test_round_trip_and_errors(tmp_path):
    trace = ActivityTrace(markov_trace(10, 2, 100, 0.1, 0.5), {"note": "x"})
    path = trace.save(tmp_path / "t.npz")
    back = ActivityTrace.load(path)
    assert back.shape == (10, 2, 100) and (back.active == trace.active).all()
    assert back.meta["note"] == "x"
    with pytest.raises(TraceError, match="2 layers x 100 neurons; model has 2 x 512"):
        back.check_shape(2, 512, "model")
    with pytest.raises(TraceError, match="no such activity trace"):
        ActivityTrace.load(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="not an activity trace"):
        ActivityTrace.load(tmp_path / "bad.npz")


def test_engine_with_full_trace_equals_dense(store, tmp_path):
    path = ActivityTrace(np.ones((4, 2, 512), bool)).save(tmp_path / "all.npz")
    dense = flashjax.load(store, progress=False)
    # 1 GB is far more than this model: every layer's buffer holds all 512 neurons
    flash = flashjax.load(store, dram_budget="1GB", predictor=TraceSelector.open(path, store),
                          window=1)
    ids, stats = flash.generate(PROMPT, 6, stop_at_eos=False, return_stats=True)
    assert stats["rows_dropped"] == 0
    assert ids == dense.generate(PROMPT, 6, stop_at_eos=False)
    assert stats["rows_needed"] == stats["tokens"] * 2 * 512
    seq = PROMPT + ids
    assert np.linalg.norm(flash.logits(seq) - dense.logits(seq)) <= 1e-5 * np.linalg.norm(
        dense.logits(seq))


def test_engine_loads_exactly_what_the_trace_needs(store, tmp_path):
    active = markov_trace(32, 2, 512, 0.05, 0.5, seed=3)
    path = ActivityTrace(active).save(tmp_path / "m.npz")
    flash = flashjax.load(store, dram_budget="1GB", predictor=TraceSelector.open(path, store),
                          window=1)
    _, stats, state = flash.generate(PROMPT, 12, stop_at_eos=False, return_stats=True,
                                     return_state=True)
    steps = stats["tokens"]
    for layer in range(2):
        assert set(state.index[layer].resident) == set(np.flatnonzero(active[steps - 1, layer]))
    # window 1 with room to spare: token t loads exactly the neurons token t-1 did not need
    expected = [int(active[0].sum())] + [int((active[t] & ~active[t - 1]).sum())
                                         for t in range(1, steps)]
    assert stats["rows_read_per_token"] == expected
    assert stats["rows_dropped"] == 0 == stats["rows_streamed"]


def test_engine_refuses_a_trace_of_another_shape(store, tmp_path):
    path = ActivityTrace(np.ones((4, 3, 512), bool)).save(tmp_path / "wrong.npz")
    with pytest.raises(TraceError, match="3 layers x 512 neurons"):
        TraceSelector.open(path, store)
    with pytest.raises(TraceError, match="no such activity trace"):
        TraceSelector.open(tmp_path / "absent.npz", store)
