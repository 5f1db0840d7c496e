"""`flashjax place`: neurons reordered on flash by co-activation compute what they computed
before (dense and flash), cost fewer requests, and export restores the checkpoint's order."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import flashjax
from flashjax import StoreError
from flashjax.bench.activity import ActivityTrace, TraceSelector
from flashjax.cli import main
from flashjax.store import bundles, place
from flashjax.store.export import export_model_dir
from flashjax.store.manifest import Manifest
from flashjax.store.verify import verify
from flashjax.testing import synthetic_store, tiny_opt_config
from tests.test_predictor import llama_with_activations

PROMPT = [2, 11, 25, 37, 48, 59, 60, 71]
SPARSE = tiny_opt_config(hidden_size=64, ffn_dim=1024, num_hidden_layers=3)


def clustered_trace(layers: int, n: int, tokens: int = 600, group: int = 16, seed: int = 0):
    """Activity in which neurons fire in groups of ``group`` (each token a few groups, a few
    stray neurons), the groups scattered over the layer by a random permutation."""
    rng = np.random.default_rng(seed)
    active = np.zeros((tokens, layers, n), bool)
    for layer in range(layers):
        scatter = rng.permutation(n)
        for t in range(tokens):
            for g in rng.choice(n // group, 3, replace=False):
                active[t, layer, scatter[g * group:(g + 1) * group]] = True
            active[t, layer, rng.integers(0, n, 4)] = True
    return ActivityTrace(active, {"source": "test"})


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    root = tmp_path_factory.mktemp("place")
    fp = synthetic_store(root, SPARSE, seed=3, ffn_active=0.05)
    trace = clustered_trace(3, 1024).save(root / "trace.npz")
    out = root / "placed"
    manifest, placements = flashjax.place(fp, trace=trace, out_dir=out, progress=False)
    return fp, out, trace, manifest, placements


def test_placed_store_computes_what_the_original_does(placed):
    """Dense logits within float32 rounding (the FFN sums its neurons in another order) and
    the same greedy tokens; oracle flash tokens identical; every row is the original row of
    the neuron the order names."""
    fp, out, _, manifest, _ = placed
    a, b = flashjax.load(fp, progress=False), flashjax.load(out, progress=False)
    seq = PROMPT + a.generate(PROMPT, 12, stop_at_eos=False)
    la, lb = a.logits(seq), b.logits(seq)
    assert np.linalg.norm(la - lb) / np.linalg.norm(la) <= 1e-5
    assert b.generate(PROMPT, 12, stop_at_eos=False) == seq[len(PROMPT):]
    fa = flashjax.load(fp, dram_budget=0.4, predictor="oracle", window=3)
    fb = flashjax.load(out, dram_budget=0.4, predictor="oracle", window=3)
    ids_b, stats = fb.generate(PROMPT, 12, stop_at_eos=False, return_stats=True)
    assert fa.generate(PROMPT, 12, stop_at_eos=False) == ids_b == seq[len(PROMPT):]
    assert stats["rows_loaded"] > 0
    # reads that span gaps of unneeded rows (io_uring where available) change nothing
    fg = flashjax.load(out, dram_budget=0.4, predictor="oracle", window=3, read_gap=16384)
    np.testing.assert_array_equal(fg.logits(seq), fb.logits(seq))
    assert fg.generate(PROMPT, 12, stop_at_eos=False) == ids_b
    order = place.load_order(out, manifest)
    for layer in range(SPARSE["num_hidden_layers"]):
        np.testing.assert_array_equal(bundles.read_layer(out, layer),
                                      bundles.read_layer(fp, layer)[order[layer]])
    assert order.dtype == np.int32 and (np.sort(order, 1) == np.arange(1024)).all()


def test_placement_cuts_the_requests_of_clustered_activity(placed):
    """On activity that fires in scattered groups, the kept orders need far fewer requests
    per token on held-out tokens than the store's order, and so does the engine."""
    fp, out, trace, manifest, placements = placed
    for p in placements:
        assert p.method != "current"
        kept, current = p.scores[p.method], p.scores["current"]
        assert kept["device_us"] < 0.5 * current["device_us"], p.scores
        assert kept["request_bytes"] < 0.5 * current["request_bytes"], p.scores
    doc = json.loads((out / "manifest.json").read_text())["layout"]["ffn"]["order"]
    assert doc["file"] == "ffn/order.npy" and doc["methods"] == [p.method for p in placements]
    # the engine driven by the trace: fewer storage requests per token on the placed store
    reqs = {}
    for name, path in (("before", fp), ("after", out)):
        model = flashjax.load(path, dram_budget=0.9, window=4,
                              predictor=TraceSelector.open(trace, path))
        _, stats = model.generate(PROMPT, 24, stop_at_eos=False, return_stats=True)
        reqs[name] = float(np.median(stats["request_bytes_per_token"][1:]))  # after prefill
    assert reqs["after"] < 0.7 * reqs["before"], reqs


def test_trace_names_the_same_neurons_on_a_placed_store(placed):
    fp, out, trace, manifest, _ = placed
    before, after = TraceSelector.open(trace, fp), TraceSelector.open(trace, out)
    order = place.load_order(out, manifest)
    for step in (0, 5):
        for layer in range(3):
            np.testing.assert_array_equal(np.sort(order[layer][after.trace.needed(step, layer)]),
                                          before.trace.needed(step, layer))


def test_export_restores_the_checkpoint_order(placed, tmp_path):
    fp, out, *_ = placed
    export_model_dir(fp, tmp_path / "a", progress=False)
    export_model_dir(out, tmp_path / "b", progress=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(
        tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_damaged_order_file_and_wrong_data_are_named(placed, tmp_path):
    import shutil

    fp, out, *_ = placed
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    order = np.load(copy / "ffn" / "order.npy")
    order[0, [0, 1]] = order[0, [1, 0]]
    np.save(copy / "ffn" / "order.npy", order)
    with pytest.raises(StoreError, match=r"order.npy: crc32 \d+ differs from the manifest"):
        export_model_dir(copy, tmp_path / "x", progress=False)
    with pytest.raises(StoreError, match=r"order.npy: crc32"):
        verify(copy, progress=False)
    (copy / "ffn" / "order.npy").unlink()
    with pytest.raises(StoreError, match="order.npy: missing neuron order file"):
        place.load_order(copy, Manifest.read(copy))
    wrong = clustered_trace(2, 1024, tokens=40).save(tmp_path / "wrong.npz")
    with pytest.raises(ValueError, match="is for 2 layers x 1024 neurons"):
        flashjax.place(fp, trace=wrong, out_dir=tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_place_in_place_with_trained_predictors(tmp_path):
    """A trained Llama model placed in place from its collected activations: the same dense
    logits and greedy tokens, the same low-rank flash tokens (the predictors' outputs moved
    with the rows), and activations of the old order are refused for training."""
    from flashjax.predictor.collect import collect
    from flashjax.predictor.train import train_predictors

    fp, model, text = llama_with_activations(tmp_path)
    train_predictors(fp, tmp_path / "acts", steps=60, batch=256, progress=False)
    prompt = [1, 20, 33, 41, 57, 68, 90, 101]
    seq = prompt + model.generate(prompt, 10, stop_at_eos=False)
    ref_logits = model.logits(seq)
    low = flashjax.load(fp, dram_budget=0.95, predictor="lowrank", window=2)
    ref_low = low.generate(prompt, 10, stop_at_eos=False)
    del model, low
    assert main(["place", str(fp), "--data", str(tmp_path / "acts"),
                 "--methods", "greedy,spectral"]) == 0
    manifest = Manifest.read(fp)
    assert manifest.order is not None and not list(tmp_path.glob(".fj.*"))
    placed_model = flashjax.load(fp, progress=False)
    got = placed_model.logits(seq)
    assert np.linalg.norm(got - ref_logits) / np.linalg.norm(ref_logits) <= 1e-5
    assert placed_model.generate(prompt, 10, stop_at_eos=False) == seq[len(prompt):]
    low = flashjax.load(fp, dram_budget=0.95, predictor="lowrank", window=2)
    assert low.generate(prompt, 10, stop_at_eos=False) == ref_low
    with pytest.raises(ValueError, match="collected from the store in another neuron order"):
        train_predictors(fp, tmp_path / "acts", steps=2, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="another neuron order"):
        flashjax.place(fp, data=tmp_path / "acts", progress=False)
    # activations collected after placement: placing again composes the orders
    collect(placed_model, text, tmp_path / "acts2", tokens=1024, seq_len=64, batch=8,
            progress=False)
    flashjax.place(fp, data=tmp_path / "acts2", out_dir=tmp_path / "again", progress=False)
    again = flashjax.load(tmp_path / "again", progress=False)
    assert again.generate(prompt, 10, stop_at_eos=False) == seq[len(prompt):]
    order = place.load_order(tmp_path / "again", Manifest.read(tmp_path / "again"))
    first = place.load_order(fp, manifest)
    rows = bundles.read_layer(tmp_path / "again", 1)
    original = bundles.read_layer(fp, 1)[np.argsort(first[1])]  # checkpoint order
    np.testing.assert_array_equal(rows, original[order[1]])


def test_request_counts_follow_the_merging_rules():
    """Scoring's request count: whole blocks, gaps up to `gap` spanned, `limit` splits."""
    pos = np.array([0, 1, 2, 3, 8, 9, 40])  # 1 KiB rows: blocks 0, 2, 10
    assert place.request_counts(pos, 1024, 0, 1 << 20) == (3, 3 * 4096)
    assert place.request_counts(pos, 1024, 4096, 1 << 20) == (2, 3 * 4096 + 4096)
    assert place.request_counts(np.arange(10), 8192, 0, 32768) == (3, 10 * 8192)
    assert place.request_counts(np.zeros(0, np.int64), 8192, 0, 32768) == (0, 0)


def test_quantized_store_with_resident_scales_is_placed_with_its_scales(placed, tmp_path):
    """int4 rows with resident scales: the scales move with their rows, and oracle flash
    tokens stay the same."""
    fp, _, trace, *_ = placed
    q = tmp_path / "int4"
    flashjax.convert(fp.parent / "hf", q, ffn_dtype="int4", scales="dram", progress=False)
    manifest, _ = flashjax.place(q, trace=trace, out_dir=tmp_path / "int4-placed",
                                 progress=False)
    order = place.load_order(tmp_path / "int4-placed", manifest)
    before = bundles.load_scales(q, Manifest.read(q))
    after = bundles.load_scales(tmp_path / "int4-placed", manifest)
    np.testing.assert_array_equal(after[1], before[1][order[1]])
    ids = [flashjax.load(p, dram_budget=0.4, predictor="oracle", window=3).generate(
        PROMPT, 10, stop_at_eos=False) for p in (q, tmp_path / "int4-placed")]
    assert ids[0] == ids[1]
