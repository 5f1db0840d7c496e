"""Streaming: tokens as they are chosen, equal to generate's; the persistent compile cache."""

from __future__ import annotations

import pytest

import flashjax
from flashjax.testing import synthetic_store, tiny_opt_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    cfg = tiny_opt_config(hidden_size=64, ffn_dim=1024, num_hidden_layers=2)
    return synthetic_store(tmp_path_factory.mktemp("stream"), cfg, seed=2, ffn_active=0.1)


@pytest.mark.parametrize("flash", [False, True])
def test_stream_equals_generate_and_is_lazy(store, flash):
    kw = {"dram_budget": 0.6, "predictor": "oracle"} if flash else {"progress": False}
    model = flashjax.load(store, **kw)
    prompt = [2, 11, 22, 33]
    for options in ({}, {"temperature": 0.9, "top_p": 0.9, "seed": 3}):
        want = model.generate(prompt, 12, stop_at_eos=False, **options)
        decodes = []
        real = model._decode
        model._decode = lambda *a: (decodes.append(1), real(*a))[1]
        try:
            tokens = model.stream(prompt, 12, stop_at_eos=False, **options)
            first = next(tokens)
            assert decodes == []  # the first token is out before any further step ran
            got = [first, *tokens]
        finally:
            model._decode = real
        assert got == want and len(decodes) == 11
    seen = []
    ids = model.generate(prompt, 5, stop_at_eos=False, on_token=lambda ids: seen.append(list(ids)))
    assert seen == [ids[:i] for i in range(1, 6)]
    with pytest.raises(ValueError, match="stream takes one prompt"):
        next(model.stream([prompt, prompt], 3))


def test_compilation_cache_is_on_unless_turned_off(monkeypatch, tmp_path):
    import jax

    from flashjax.api import enable_compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("FLASHJAX_COMPILATION_CACHE", "0")
        jax.config.update("jax_compilation_cache_dir", None)
        assert enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("FLASHJAX_COMPILATION_CACHE", str(tmp_path / "xla"))
        assert enable_compilation_cache() == tmp_path / "xla"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        # a directory the caller chose is kept
        monkeypatch.setenv("FLASHJAX_COMPILATION_CACHE", str(tmp_path / "other"))
        assert enable_compilation_cache() == tmp_path / "xla"
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
