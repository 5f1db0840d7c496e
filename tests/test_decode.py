"""Decoding with the KV cache equals recomputing the whole sequence, with no recompilation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import flashjax
from flashjax.model import decoder as opt
from flashjax.model.layers import KVCache


def test_cached_decode_equals_full_recompute(converted):
    c = converted("odd")
    model = flashjax.load(c.model_dir, progress=False)
    cfg = model.cfg
    seq = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(2, 30)).astype(np.int32)
    full = model.logits(seq)  # one teacher-forced pass over all 30 tokens
    prompt = 7
    cache = KVCache.init(cfg, batch=2, slots=64)
    positions = np.broadcast_to(np.arange(prompt, dtype=np.int32), (2, prompt))
    logits, cache = opt.forward(cfg, model.params, jnp.asarray(seq[:, :prompt]),
                                jnp.asarray(positions), jnp.ones((2, prompt), bool), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :prompt], rtol=1e-4, atol=1e-4)
    for t in range(prompt, seq.shape[1]):
        step_logits, cache = opt.decode_step(cfg, model.params, jnp.asarray(seq[:, t]),
                                             jnp.full((2,), t, jnp.int32), cache)
        np.testing.assert_allclose(np.asarray(step_logits), full[:, t], rtol=1e-4, atol=1e-4)
    assert int(cache.index) == seq.shape[1]


def test_decode_step_compiles_once(converted):
    c = converted("pre_ln")
    model = flashjax.load(c.model_dir, progress=False)
    model.generate([2, 5, 9], max_new_tokens=3)  # warm up: one prefill, one decode shape
    compiled = opt.decode_step._cache_size()
    model.generate([2, 7, 11, 4], max_new_tokens=20, stop_at_eos=False)
    assert opt.decode_step._cache_size() == compiled
    # the same shapes under jax_no_tracing: any retrace would raise
    with jax.no_tracing():
        model.generate([2, 8, 3], max_new_tokens=20, stop_at_eos=False)
