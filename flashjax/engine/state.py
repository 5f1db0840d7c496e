"""What a flash-backed model carries from token to token.

``FlashState`` is one pytree: the KV cache and every layer's neuron buffer, passed into each
decode step and returned from it (the buffers are donated to the updates that change them, so
their memory is reused in place). Beside it, on the host, each layer's ``NeuronCache`` (slot
<-> neuron, last use) and the generation's ``Stats``: they describe the buffers' contents and
change with them, but jit never sees them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from flashjax.cache import NeuronCache
from flashjax.engine.stats import Stats
from flashjax.model.layers import KVCache


@struct.dataclass
class NeuronBuffer:
    """One layer's resident rows, fixed shape. Let C be the rows held (capacity plus slack),
    D the model width.

    up: [C, D] up-projection columns (fc1 rows); down: [C, D] down-projection rows;
    bias: [C] fc1 bias of each slot's neuron. Rows at slots >= n are stale and masked out.
    """

    up: jax.Array
    down: jax.Array
    bias: jax.Array

    @classmethod
    def init(cls, rows: int, d_model: int, dtype=jnp.float32) -> NeuronBuffer:
        return cls(up=jnp.zeros((rows, d_model), dtype), down=jnp.zeros((rows, d_model), dtype),
                   bias=jnp.zeros((rows,), dtype))

    @property
    def rows(self) -> int:
        return self.up.shape[0]

    @property
    def nbytes(self) -> int:
        return self.up.nbytes + self.down.nbytes + self.bias.nbytes


@struct.dataclass
class FlashState:
    """kv: the attention cache; buffers: per layer, the neuron rows in DRAM (device arrays).
    index and stats are host objects beside the pytree (not leaves): ``index[l]`` says which
    neuron each slot of ``buffers[l]`` holds; ``step`` counts the tokens fed so far."""

    kv: KVCache
    buffers: tuple[NeuronBuffer, ...]
    index: tuple[NeuronCache, ...] = struct.field(pytree_node=False)
    stats: Stats = struct.field(pytree_node=False)
    step: int = struct.field(pytree_node=False, default=0)

    @classmethod
    def init(cls, kv: KVCache, buffers, capacities, n_neurons: int) -> FlashState:
        """A state with nothing resident, over ``buffers`` (whose memory is reused: their rows
        are stale until the index says otherwise)."""
        return cls(kv=kv, buffers=tuple(buffers),
                   index=tuple(NeuronCache(n_neurons, c) for c in capacities), stats=Stats())

    def next_token(self, kv: KVCache, buffers) -> FlashState:
        return dataclasses.replace(self, kv=kv, buffers=tuple(buffers), step=self.step + 1)
