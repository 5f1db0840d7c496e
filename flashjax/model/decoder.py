"""The decoder of any supported family and its two jitted entry points.

``module(cfg)`` is the family's Flax module (``OPT`` or ``Llama``), ``layer(cfg)`` one of its
layers; both share one interface (``embed``, ``layers[i].attend`` / ``ffn`` / ``finish``,
``head``), so everything above them is family-agnostic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flashjax.config import ModelConfig
from flashjax.model.layers import DecoderLayer, KVCache, run_layers  # noqa: F401 (re-export)
from flashjax.model.llama import Llama, LlamaLayer
from flashjax.model.opt import OPT

_MODULES = {"opt": (OPT, DecoderLayer), "llama": (Llama, LlamaLayer)}


def module(cfg: ModelConfig):
    return _MODULES[cfg.family][0](cfg)


def layer(cfg: ModelConfig):
    return _MODULES[cfg.family][1](cfg)


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """Random parameters with the tree that the converter produces (for training and tests)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = KVCache.init(cfg, batch=1, slots=1, dtype=dtype)
    params = module(cfg).init(jax.random.key(seed), tokens, tokens, tokens > -1, cache)["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def forward(cfg: ModelConfig, params, tokens, positions, token_valid, cache: KVCache):
    """Prefill/teacher-forced forward: all logits [B, S, V]. The cache is donated."""
    return module(cfg).apply({"params": params}, tokens, positions, token_valid, cache)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def decode_step(cfg: ModelConfig, params, tokens, positions, cache: KVCache):
    """One new token per sequence: tokens, positions [B]; returns (logits [B, V], cache).
    The cache is donated: the caller must rebind it to the returned one."""
    logits, cache = module(cfg).apply(
        {"params": params}, tokens[:, None], positions[:, None],
        jnp.ones((tokens.shape[0], 1), bool), cache)
    return logits[:, 0], cache
