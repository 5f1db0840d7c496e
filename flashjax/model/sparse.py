"""The FFN over a set of neuron rows: the flash path's one FFN, and the activity rule that
says which neurons it needs.

An FFN has input parts (OPT: up; gated: gate and up) that read the FFN input and a down part
that writes the output. Its pre-activations ``pres`` are the input parts applied to x, one
[..., C] array per part. Shape legend: B batch, S tokens, D model width, C rows (a neuron
buffer's slots, rows just read into a staging buffer, or all of a layer's neurons).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ffn_hidden(pres, activation: str, threshold=None):
    """The FFN's hidden activations from its pre-activations: OPT relu(up); gated
    relu(gate) * up, with ``activation`` "drelu" relu(gate) * relu(up), with "silu"
    silu(gate) * up, where a ``threshold`` (SwiGLU calibrated, a scalar) zeroes every
    |silu(gate)| at or below it."""
    if len(pres) == 1:
        return jax.nn.relu(pres[0])
    gate, up = pres
    if activation == "silu":
        act = jax.nn.silu(gate)
        if threshold is not None:
            act = jnp.where(jnp.abs(act) > threshold, act, 0)
        return act * up
    return jax.nn.relu(gate) * (jax.nn.relu(up) if activation == "drelu" else up)


def activity_scores(pres, activation: str, threshold=None):
    """A score per neuron that is > 0 exactly where the neuron fires (its hidden activation
    can be non-zero): the ReLU's input, for dReLU the smaller of the two, for SwiGLU
    |silu(gate)| less the layer's threshold (without one: every neuron whose silu is not
    exactly 0 fires). ``pres`` may hold only the parts that decide activity (the oracle's)."""
    if activation == "silu":  # (gated only: the gate decides)
        score = jnp.abs(jax.nn.silu(pres[0]))
        return score if threshold is None else score - threshold
    if len(pres) == 1 or activation != "drelu":
        return pres[0]
    return jnp.minimum(*pres)


def sparse_ffn(x, parts, bias, mask, *, activation: str = "relu", threshold=None):
    """The FFN over the rows where ``mask`` is True.

    x: [B, S, D]; parts: the rows' input parts then their down part, each [C, D]; bias: [C]
    (the first input part's, OPT) or None; mask: [C] bool; threshold: the layer's activation
    threshold (SwiGLU calibrated), a scalar, or None -> [B, S, D] in the parts' dtype.

    The rows hold any subset of a layer's neurons in any order; masked rows (stale slots,
    rows resident but not needed by this token, padding) contribute nothing. An output bias
    (OPT's fc2) is added by the caller, once per layer, however many row sets the layer's FFN
    is summed over. With every neuron that fires for x among the unmasked rows, the result
    equals the dense FFN's (minus that bias).
    """
    *inputs, down = parts
    x = x.astype(down.dtype)
    # [B, S, C] per input part
    pres = [jnp.einsum("bsd,cd->bsc", x, w) for w in inputs]
    if bias is not None:
        pres[0] = pres[0] + bias
    h = jnp.where(mask, ffn_hidden(pres, activation, threshold), 0)
    # [B, S, D]
    return jnp.einsum("bsc,cd->bsd", h, down)
