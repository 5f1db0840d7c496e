"""The Llama-family decoder (Llama, Mistral, Qwen2 with a gated ReLU or SiLU FFN) as a
pure-functional Flax module, with the same interface as ``OPT``: ``embed``, ``layers[i].attend`` /
``.ffn`` / ``.finish`` and ``head``.

Shape legend: B batch, S tokens in this call, T KV-cache slots, H query heads, G key/value
heads, K head width, D model width, N FFN neurons, V vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flashjax.config import LlamaConfig, rope_frequencies
from flashjax.model.layers import KVCache, cached_attention, decode_layers, lm_logits
from flashjax.model.sparse import activity_scores, ffn_hidden


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 and cast back before the scale (as HF does)."""

    eps: float

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), x.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                                            + self.eps))
        return scale * x32.astype(x.dtype)


def rotate(x, positions, inv_freq):
    """Rotary embedding in HF's half-split layout: x [B, S, n, K], positions [B, S],
    inv_freq [K/2] -> x rotated by position x frequency."""
    # [B, S, K/2]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary positions over one layer's cache slice."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, keys, values, valid, index, positions):
        """x: [B, S, D]; keys, values: [B, T, G, K]; positions: [B, S]. Returns
        (out [B, S, D], keys, values)."""
        cfg = self.cfg
        k_dim = cfg.head_dim
        inv_freq = rope_frequencies(cfg)
        q = nn.DenseGeneral((cfg.num_attention_heads, k_dim), use_bias=cfg.qkv_bias,
                            name="q_proj")(x)
        k = nn.DenseGeneral((cfg.num_key_value_heads, k_dim), use_bias=cfg.qkv_bias,
                            name="k_proj")(x)
        v = nn.DenseGeneral((cfg.num_key_value_heads, k_dim), use_bias=cfg.qkv_bias,
                            name="v_proj")(x)
        q = rotate(q, positions, inv_freq) * k_dim ** -0.5
        k = rotate(k, positions, inv_freq)
        out, keys, values = cached_attention(q, k, v, keys, values, valid, index)
        out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=cfg.o_bias,
                              name="o_proj")(out)
        return out, keys, values


class GatedFFN(nn.Module):
    """down(act(gate(x)) * up(x)) (dReLU: relu of both; SwiGLU: silu, zeroed at or below the
    layer's calibrated threshold where there is one), no biases."""

    cfg: LlamaConfig
    index: int = 0  # the layer's (for its activation threshold)

    def setup(self):
        n, d = self.cfg.ffn_dim, self.cfg.hidden_size
        self.gate = nn.Dense(n, use_bias=False)
        self.up = nn.Dense(n, use_bias=False)
        self.down = nn.Dense(d, use_bias=False)

    def activity(self, x):
        """(the FFN's output [B, S, D], activity scores [B, S, N]: > 0 where a neuron fires)."""
        pres = [self.gate(x), self.up(x)]
        act, threshold = self.cfg.activation, self.cfg.threshold(self.index)
        return (self.down(ffn_hidden(pres, act, threshold)),
                activity_scores(pres, act, threshold))

    def hidden(self, x):
        """(the FFN's output [B, S, D], its hidden activations [B, S, N])."""
        h = ffn_hidden([self.gate(x), self.up(x)], self.cfg.activation,
                       self.cfg.threshold(self.index))
        return self.down(h), h

    def __call__(self, x):
        return self.activity(x)[0]


class LlamaLayer(nn.Module):
    """One pre-norm Llama layer, split at the FFN like OPT's ``DecoderLayer``."""

    cfg: LlamaConfig
    index: int = 0

    def setup(self):
        self.input_layernorm = RMSNorm(self.cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(self.cfg)
        self.post_attention_layernorm = RMSNorm(self.cfg.rms_norm_eps)
        self.ffn = GatedFFN(self.cfg, self.index)

    def attend(self, h, keys, values, valid, index, positions):
        """h: [B, S, D] -> (h, ffn_in [B, S, D], keys, values)."""
        x, keys, values = self.self_attn(self.input_layernorm(h), keys, values, valid, index,
                                         positions)
        h = h + x
        return h, self.post_attention_layernorm(h), keys, values

    def finish(self, h, ffn_out):
        return h + ffn_out


class Llama(nn.Module):
    """Token embeddings, ``num_hidden_layers`` layers, the final RMSNorm and the LM head."""

    cfg: LlamaConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size)
        self.layers = [LlamaLayer(cfg, i, name=f"layers_{i}")
                       for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False)

    def embed(self, tokens, positions):
        """tokens [B, S] -> h [B, S, D] (positions enter through the rotary attention)."""
        return self.embed_tokens(tokens)

    def head(self, h):
        """h [B, S, D] -> logits [B, S, V] in float32."""
        return lm_logits(self, self.norm(h))

    def __call__(self, tokens, positions, token_valid, cache: KVCache, ffn=None):
        return decode_layers(self, tokens, positions, token_valid, cache, ffn)
