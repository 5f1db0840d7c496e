"""Pure-functional Flax (Linen) building blocks shared by the decoder families, and OPT's
decoder layer.

Shape legend: B batch, S query tokens in this call, T KV-cache slots, H heads, G key/value
heads (H for OPT), K head width, D model width (hidden_size), N FFN neurons.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from flashjax.config import ModelConfig
from flashjax.model.sparse import activity_scores, ffn_hidden

# Softmax logit for masked keys: finite, so a query with no visible key (a left-pad slot)
# yields a uniform average instead of NaN; its output is never used.
_MASKED = -1e30


@struct.dataclass
class KVCache:
    """Fixed-shape attention state for all layers.

    keys, values: [L, B, T, G, K]; valid: [B, T] True where a slot holds a real token;
    index: int32 scalar, the next slot to write (the same for the whole batch because
    prompts are left-padded).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))

    @property
    def slots(self) -> int:
        return self.keys.shape[2]


def run_layers(n_layers: int, h, kv, *, attend, ffn, finish):
    """The decoder's layer loop, the one every path runs: per layer ``attend(i, h, kv) ->
    (h, ffn_in, kv)``, ``ffn(i, ffn_in) -> ffn_out``, ``finish(i, h, ffn_out) -> h``. The dense
    model calls it inside jit with its modules; the flash engine on the host with jitted
    pieces and the FFN from flash; activation collection with an FFN that records."""
    for i in range(n_layers):
        h, ffn_in, kv = attend(i, h, kv)
        h = finish(i, h, ffn(i, ffn_in))
    return h, kv


def decode_layers(model, tokens, positions, token_valid, cache: KVCache, ffn=None):
    """A decoder module's ``__call__``: S tokens through every layer of ``model`` (with
    ``embed``, ``layers``, ``head``), written into the cache at ``cache.index``.
    token_valid: [B, S] bool (False for padding). ``ffn(i, layer, ffn_in)``, when given,
    computes layer i's FFN instead of its dense FFN. Returns (logits, cache)."""
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_valid, cache.index, axis=1)
    ffn = ffn or (lambda i, layer, x: layer.ffn(x))

    def attend(i, h, kv):
        keys, values = kv
        h, ffn_in, k, v = model.layers[i].attend(h, keys[i], values[i], valid, cache.index,
                                                 positions)
        return h, ffn_in, (keys.at[i].set(k), values.at[i].set(v))

    h, (keys, values) = run_layers(
        len(model.layers), model.embed(tokens, positions), (cache.keys, cache.values),
        attend=attend, ffn=lambda i, x: ffn(i, model.layers[i], x),
        finish=lambda i, h, out: model.layers[i].finish(h, out))
    cache = KVCache(keys=keys, values=values, valid=valid, index=cache.index + tokens.shape[1])
    return model.head(h), cache


HEAD_ROWS = 2048  # vocabulary rows of a narrower head weight widened at a time


def _widened_head(h, weight, vocab_axis: int):
    """h [B, S, D] against a head weight narrower than h (tied [V, D], ``vocab_axis`` 0, or
    [D, V], 1), widened to h's dtype one slice of at most ``HEAD_ROWS`` vocabulary rows at a
    time: widening it whole holds a widened copy for the call (392 MB for OPT-1.3B's 50272 x
    2048 in float32) and runs slower on XLA:CPU (170 against 23 ms there), and contracting in
    the narrow dtype instead would round h."""
    vocab = weight.shape[vocab_axis]
    size = vocab // next(k for k in range(1, vocab + 1)
                         if vocab % k == 0 and vocab // k <= HEAD_ROWS)
    if size < 64:  # a vocabulary without a usable divisor: widen it whole
        size = vocab

    def part(i):
        w = jax.lax.dynamic_slice_in_dim(weight, i * size, size, axis=vocab_axis)
        w = w.astype(h.dtype)
        return jnp.einsum("bsd,vd->bsv", h, w) if vocab_axis == 0 else h @ w

    out = jax.lax.map(part, jnp.arange(vocab // size))  # [chunks, B, S, size]
    return jnp.moveaxis(out, 0, 2).reshape(*h.shape[:2], vocab)


def lm_logits(model, h):
    """The LM head of ``model`` (``embed_tokens``, and ``lm_head`` unless tied) on h [B, S, D]
    -> logits [B, S, V] in float32. Tied: h @ E.T as one contraction over E's rows; flax's
    Embed.attend writes E.T out as a copy on XLA:CPU first (414 ms vs 24 ms per token at
    OPT-6.7B shape, 50272 x 4096). A head weight held narrower than h (float16 resident
    weights, float32 compute) is widened slice by slice (``_widened_head``)."""
    tied = model.cfg.tie_word_embeddings
    if tied:
        weight = model.embed_tokens.embedding
    else:  # (none yet while the module is being initialised)
        weight = model.lm_head.get_variable("params", "kernel")
    if weight is not None and jnp.dtype(weight.dtype).itemsize < jnp.dtype(h.dtype).itemsize:
        logits = _widened_head(h, weight, 0 if tied else 1)
    elif tied:
        logits = jnp.einsum("bsd,vd->bsv", h.astype(weight.dtype), weight)
    else:
        logits = model.lm_head(h)
    return logits.astype(jnp.float32)


def cached_attention(q, k, v, keys, values, valid, index):
    """Scaled dot-product attention of this call's queries over the cache, after writing this
    call's keys and values into it at ``index``.

    q: [B, S, H, K] (already scaled); k, v: [B, S, G, K] with H a multiple of G (each key/value
    head serves H / G query heads); keys, values: [B, T, G, K]; valid: [B, T] (including this
    call's tokens). Returns (out [B, S, H, K], keys, values)."""
    b, s, h, kd = q.shape
    g = keys.shape[2]
    keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), index, axis=1)
    values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), index, axis=1)
    q = q.reshape(b, s, g, h // g, kd)
    # [B, G, H/G, S, T]
    scores = jnp.einsum("bsgqk,btgk->bgqst", q, keys.astype(q.dtype)).astype(jnp.float32)
    slot = jnp.arange(keys.shape[1])
    causal = slot[None, :] <= (index + jnp.arange(s))[:, None]  # [S, T]
    allowed = causal[None, None, None] & valid[:, None, None, None, :]
    scores = jnp.where(allowed, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    # [B, S, G, H/G, K]
    out = jnp.einsum("bgqst,btgk->bsgqk", probs, values)
    return out.reshape(b, s, h, kd), keys, values


class Attention(nn.Module):
    """OPT multi-head self-attention over one layer's slice of the KV cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, keys, values, valid, index):
        """x: [B, S, D]; keys, values: [B, T, H, K]; valid: [B, T] (already includes this call's
        tokens); index: first slot this call writes. Returns (out [B, S, D], keys, values)."""
        cfg = self.cfg
        heads = (cfg.num_attention_heads, cfg.head_dim)
        q = nn.DenseGeneral(heads, name="q_proj")(x) * cfg.head_dim ** -0.5
        k = nn.DenseGeneral(heads, name="k_proj")(x)
        v = nn.DenseGeneral(heads, name="v_proj")(x)
        out, keys, values = cached_attention(q, k, v, keys, values, valid, index)
        out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), name="out_proj")(out)
        return out, keys, values


class DenseFFN(nn.Module):
    """fc2(relu(fc1(x))): the whole FFN, weights in DRAM."""

    cfg: ModelConfig

    def setup(self):
        self.fc1 = nn.Dense(self.cfg.ffn_dim)
        self.fc2 = nn.Dense(self.cfg.hidden_size)

    def activity(self, x):
        """(the FFN's output [B, S, D], activity scores [B, S, N]: > 0 where a neuron fires)."""
        pres = [self.fc1(x)]
        return self.fc2(ffn_hidden(pres, "relu")), activity_scores(pres, "relu")

    def hidden(self, x):
        """(the FFN's output [B, S, D], its hidden activations [B, S, N])."""
        h = ffn_hidden([self.fc1(x)], "relu")
        return self.fc2(h), h

    def __call__(self, x):
        return self.activity(x)[0]


def _layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name)


class DecoderLayer(nn.Module):
    """One OPT layer, split at the FFN so that the FFN can be computed elsewhere.

    ``attend`` runs attention and returns the residual stream plus the FFN input;
    ``finish`` adds the FFN output back; ``ffn`` is the dense FFN between them (the decoder's
    ``run_layers`` puts the three together). Neither half touches the FFN's parameters, so
    they run on a parameter tree without them.
    """

    cfg: ModelConfig

    def setup(self):
        self.self_attn = Attention(self.cfg)
        self.self_attn_layer_norm = _layer_norm(self.cfg, "self_attn_layer_norm")
        self.final_layer_norm = _layer_norm(self.cfg, "final_layer_norm")
        self.ffn = DenseFFN(self.cfg)

    def attend(self, h, keys, values, valid, index, positions=None):
        """h: [B, S, D] -> (h [B, S, D], ffn_in [B, S, D], keys, values). (Positions enter
        OPT through its embeddings, not here.)"""
        pre_ln = self.cfg.do_layer_norm_before
        x = self.self_attn_layer_norm(h) if pre_ln else h
        x, keys, values = self.self_attn(x, keys, values, valid, index)
        h = h + x
        if not pre_ln:
            h = self.self_attn_layer_norm(h)
        ffn_in = self.final_layer_norm(h) if pre_ln else h
        return h, ffn_in, keys, values

    def finish(self, h, ffn_out):
        h = h + ffn_out
        return h if self.cfg.do_layer_norm_before else self.final_layer_norm(h)
