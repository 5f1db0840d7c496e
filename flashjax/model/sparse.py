"""The FFN over a set of neuron rows: the flash path's one FFN.

Shape legend: B batch, S tokens, D model width, C rows (a neuron buffer's slots, or rows
just read into a staging buffer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sparse_ffn(x, up, down, bias, mask):
    """relu(x @ up.T + bias) @ down over the rows where ``mask`` is True.

    x: [B, S, D]; up, down: [C, D]; bias: [C]; mask: [C] bool -> [B, S, D] in up's dtype.

    The rows hold any subset of a layer's neurons in any order; masked rows (stale slots,
    rows resident but not needed by this token, padding) contribute nothing. The fc2 bias
    is added by the caller, once per layer, however many row sets the layer's FFN is summed
    over. With every neuron that fires for x among the unmasked rows, the result equals the
    dense FFN's (minus fc2's bias).
    """
    # [B, S, C]
    h = jnp.einsum("bsd,cd->bsc", x.astype(up.dtype), up) + bias
    h = jnp.where(mask, jax.nn.relu(h), 0)
    # [B, S, D]
    return jnp.einsum("bsc,cd->bsd", h, down)
