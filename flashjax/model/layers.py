"""Pure-functional Flax (Linen) building blocks of an OPT decoder layer.

Shape legend: B batch, S query tokens in this call, T KV-cache slots, H heads, K head width,
D model width (hidden_size), N FFN neurons.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from flashjax.config import ModelConfig

# Softmax logit for masked keys: finite, so a query with no visible key (a left-pad slot)
# yields a uniform average instead of NaN; its output is never used.
_MASKED = -1e30


@struct.dataclass
class KVCache:
    """Fixed-shape attention state for all layers.

    keys, values: [L, B, T, H, K]; valid: [B, T] True where a slot holds a real token;
    index: int32 scalar, the next slot to write (the same for the whole batch because
    prompts are left-padded).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, slots, cfg.num_attention_heads, cfg.head_dim)
        return cls(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))

    @property
    def slots(self) -> int:
        return self.keys.shape[2]


class Attention(nn.Module):
    """OPT multi-head self-attention over one layer's slice of the KV cache."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, keys, values, valid, index):
        """x: [B, S, D]; keys, values: [B, T, H, K]; valid: [B, T] (already includes this call's
        tokens); index: first slot this call writes. Returns (out [B, S, D], keys, values)."""
        cfg = self.cfg
        b, s, _ = x.shape
        heads = (cfg.num_attention_heads, cfg.head_dim)
        q = nn.DenseGeneral(heads, name="q_proj")(x) * cfg.head_dim ** -0.5
        k = nn.DenseGeneral(heads, name="k_proj")(x)
        v = nn.DenseGeneral(heads, name="v_proj")(x)
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), index, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), index, axis=1)
        # [B, H, S, T]
        scores = jnp.einsum("bshk,bthk->bhst", q, keys).astype(jnp.float32)
        slot = jnp.arange(keys.shape[1])
        causal = slot[None, :] <= (index + jnp.arange(s))[:, None]  # [S, T]
        allowed = causal[None, None] & valid[:, None, None, :]
        scores = jnp.where(allowed, scores, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        # [B, S, H, K]
        out = jnp.einsum("bhst,bthk->bshk", probs, values)
        out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), name="out_proj")(out)
        return out, keys, values


class DenseFFN(nn.Module):
    """fc2(relu(fc1(x))): the whole FFN, weights in DRAM."""

    cfg: ModelConfig

    def setup(self):
        self.fc1 = nn.Dense(self.cfg.ffn_dim)
        self.fc2 = nn.Dense(self.cfg.hidden_size)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


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

    def attend(self, h, keys, values, valid, index):
        """h: [B, S, D] -> (h [B, S, D], ffn_in [B, S, D], keys, values)."""
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
