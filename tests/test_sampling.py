"""Sampling knobs: seeds, top-k and top-p behave as documented."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import flashjax
from flashjax.model import sampling


def _draws(logits, n, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    return np.stack([np.asarray(sampling.sample(logits, k, kw.get("temperature", 1.0),
                                                kw.get("top_k", 0), kw.get("top_p", 1.0)))
                     for k in keys])


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.05, 0.05]]))
    assert set(_draws(logits, 300, top_k=2).ravel()) == {0, 1}
    # top_p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the third token (0.2) completes the set
    assert set(_draws(logits, 300, top_p=0.75).ravel()) == {0, 1, 2}
    assert set(_draws(logits, 300, top_p=0.3).ravel()) == {0}
    assert set(_draws(logits, 300).ravel()) == {0, 1, 2, 3, 4}


def test_sampling_frequencies_follow_temperature():
    logits = jnp.log(jnp.array([[0.7, 0.3]]))
    draws = _draws(logits, 2000)
    assert abs((draws == 0).mean() - 0.7) < 0.05
    cold = _draws(logits, 500, temperature=0.1)  # p0 = 0.7^10 / (0.7^10 + 0.3^10) ~ 1
    assert (cold == 0).mean() > 0.99


def test_generate_sampling_is_seeded(converted):
    model = flashjax.load(converted("pre_ln").model_dir, progress=False)
    prompt = [2, 40, 41, 42]
    a = model.generate(prompt, 16, temperature=1.0, seed=1, stop_at_eos=False)
    assert a == model.generate(prompt, 16, temperature=1.0, seed=1, stop_at_eos=False)
    assert a != model.generate(prompt, 16, temperature=1.0, seed=2, stop_at_eos=False)
    greedy = model.generate(prompt, 16, stop_at_eos=False)
    assert model.generate(prompt, 16, temperature=1.0, top_k=1, seed=3,
                          stop_at_eos=False) == greedy


def test_generation_stops_at_eos(converted):
    """With eos set to a token greedy decoding emits, each sequence stops right after it."""
    model = flashjax.load(converted("pre_ln").model_dir, progress=False)
    prompts = [[2, 5, 6], [2, 7]]
    free = model.generate(prompts, max_new_tokens=12, stop_at_eos=False)
    eos = free[0][3]
    stopping = type(model)(dataclasses.replace(model.cfg, eos_token_id=eos), model.params,
                           dtype=model.dtype)
    out = stopping.generate(prompts, max_new_tokens=12)
    for seq, full in zip(out, free):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert seq == full[:cut]
    assert len(out[0]) <= 4
