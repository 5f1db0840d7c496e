"""The FFN over a layer's padded neuron buffer (the flash path's FFN).

Shape legend: B batch, S tokens, D model width, C buffer capacity.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class SparseFFN(nn.Module):
    """relu(x @ up.T + bias) @ down over the live slots [first, n_live) of a neuron buffer.

    The slots hold any subset of the layer's neurons in any order; rows at slots >= n_live
    are stale and contribute nothing. The fc2 bias is added by the caller (once per layer,
    also when a layer is streamed through the buffer in several chunks). With every neuron
    that fires for x resident, the result equals the dense FFN's (minus fc2's bias).
    """

    @nn.compact
    def __call__(self, x, up, down, bias, n_live, first=0):
        """x: [B, S, D]; up, down: [C, D]; bias: [C]; n_live, first: int32 scalars -> [B, S, D]."""
        slot = jnp.arange(up.shape[0])
        live = (slot >= first) & (slot < n_live)  # [C]
        # [B, S, C]
        h = jnp.einsum("bsd,cd->bsc", x.astype(up.dtype), up) + bias
        h = jnp.where(live, jax.nn.relu(h), 0)
        # [B, S, D]
        return jnp.einsum("bsc,cd->bsd", h, down)
