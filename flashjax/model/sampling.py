"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (nucleus).

All knobs are traced values, so changing them never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def greedy(logits):
    """logits [B, V] -> token ids [B]."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@jax.jit
def sample(logits, key, temperature, top_k, top_p):
    """Draw one token per row of logits [B, V].

    temperature > 0 scales the logits; top_k > 0 keeps the k most likely tokens (0: all);
    top_p in (0, 1] keeps the smallest set of most likely tokens whose probability reaches
    top_p. Ties at a cut-off are kept.
    """
    logits = logits.astype(jnp.float32) / temperature
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], descending
    kth = jnp.take(ordered, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)[:, None]
    keep_k = jnp.where(top_k > 0, logits >= kth, True)
    ordered = jnp.where(jnp.where(top_k > 0, ordered >= kth, True), ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    keep = keep_k & (logits >= cutoff)
    return jax.random.categorical(key, jnp.where(keep, logits, -jnp.inf)).astype(jnp.int32)
