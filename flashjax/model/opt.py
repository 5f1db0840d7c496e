"""The OPT decoder as a pure-functional Flax module, and its two jitted entry points.

Shape legend: B batch, S tokens in this call, V vocabulary, T KV-cache slots.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from flashjax.config import ModelConfig
from flashjax.model.layers import DecoderLayer, KVCache


def run_layers(n_layers: int, h, kv, *, attend, ffn, finish):
    """The decoder's layer loop, the one every path runs: per layer ``attend(i, h, kv) ->
    (h, ffn_in, kv)``, ``ffn(i, ffn_in) -> ffn_out``, ``finish(i, h, ffn_out) -> h``. The dense
    model calls it inside jit with its modules; the flash engine on the host with jitted
    pieces and the FFN from flash; activation collection with an FFN that records."""
    for i in range(n_layers):
        h, ffn_in, kv = attend(i, h, kv)
        h = finish(i, h, ffn(i, ffn_in))
    return h, kv


class OPT(nn.Module):
    """Embeddings, ``num_hidden_layers`` decoder layers, final norm and the tied LM head."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.word_embed_proj_dim)
        self.embed_positions = nn.Embed(
            cfg.max_position_embeddings + cfg.POSITION_OFFSET, cfg.hidden_size)
        if cfg.has_projections:
            self.project_in = nn.Dense(cfg.hidden_size, use_bias=False)
            self.project_out = nn.Dense(cfg.word_embed_proj_dim, use_bias=False)
        self.layers = [DecoderLayer(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
        if cfg.has_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False)

    def embed(self, tokens, positions):
        """tokens, positions: [B, S] int -> h [B, S, D]."""
        h = self.embed_tokens(tokens)
        if self.cfg.has_projections:
            h = self.project_in(h)
        return h + self.embed_positions(positions + self.cfg.POSITION_OFFSET)

    def head(self, h):
        """h [B, S, D] -> logits [B, S, V] in float32."""
        if self.cfg.has_final_layer_norm:
            h = self.final_layer_norm(h)
        if self.cfg.has_projections:
            h = self.project_out(h)
        if self.cfg.tie_word_embeddings:
            # h @ E.T as one contraction over E's rows: flax's Embed.attend writes E.T out as a
            # copy on XLA:CPU first (414 ms vs 24 ms per token at OPT-6.7B shape, 50272 x 4096)
            embedding = self.embed_tokens.embedding
            logits = jnp.einsum("bsd,vd->bsv", h.astype(embedding.dtype), embedding)
        else:
            logits = self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens, positions, token_valid, cache: KVCache, ffn=None):
        """Run S tokens through every layer, writing them into the cache at ``cache.index``.
        token_valid: [B, S] bool (False for padding). ``ffn(i, layer, ffn_in)``, when given,
        computes layer i's FFN instead of its dense FFN (activation collection records with
        it). Returns (logits, cache)."""
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_valid, cache.index, axis=1)
        ffn = ffn or (lambda i, layer, x: layer.ffn(x))

        def attend(i, h, kv):
            keys, values = kv
            h, ffn_in, k, v = self.layers[i].attend(h, keys[i], values[i], valid, cache.index)
            return h, ffn_in, (keys.at[i].set(k), values.at[i].set(v))

        h, (keys, values) = run_layers(
            len(self.layers), self.embed(tokens, positions), (cache.keys, cache.values),
            attend=attend, ffn=lambda i, x: ffn(i, self.layers[i], x),
            finish=lambda i, h, out: self.layers[i].finish(h, out))
        cache = KVCache(keys=keys, values=values, valid=valid,
                        index=cache.index + tokens.shape[1])
        return self.head(h), cache


def init_params(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32):
    """Random parameters with the tree that the converter produces (for training and tests)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = KVCache.init(cfg, batch=1, slots=1, dtype=dtype)
    params = OPT(cfg).init(jax.random.key(seed), tokens, tokens, tokens > -1, cache)["params"]
    return jax.tree.map(lambda x: x.astype(dtype), params)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def forward(cfg: ModelConfig, params, tokens, positions, token_valid, cache: KVCache):
    """Prefill/teacher-forced forward: all logits [B, S, V]. The cache is donated."""
    return OPT(cfg).apply({"params": params}, tokens, positions, token_valid, cache)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def decode_step(cfg: ModelConfig, params, tokens, positions, cache: KVCache):
    """One new token per sequence: tokens, positions [B]; returns (logits [B, V], cache).
    The cache is donated: the caller must rebind it to the returned one."""
    logits, cache = OPT(cfg).apply(
        {"params": params}, tokens[:, None], positions[:, None],
        jnp.ones((tokens.shape[0], 1), bool), cache)
    return logits[:, 0], cache
