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
    D the model width, P the FFN's parts (OPT: up, down; gated: gate, up, down).

    parts: P arrays [C, D], slot j's row of each part; bias: [C] the first part's bias of
    each slot's neuron (OPT's fc1), or None. Rows at slots >= n are stale and masked out.
    """

    parts: tuple[jax.Array, ...]
    bias: jax.Array | None

    @classmethod
    def init(cls, rows: int, d_model: int, dtype=jnp.float32, *, n_parts: int = 2,
             bias: bool = True) -> NeuronBuffer:
        return cls(parts=tuple(jnp.zeros((rows, d_model), dtype) for _ in range(n_parts)),
                   bias=jnp.zeros((rows,), dtype) if bias else None)

    @property
    def up(self) -> jax.Array:
        """The up projection's rows (the part just before the down projection)."""
        return self.parts[-2]

    @property
    def down(self) -> jax.Array:
        return self.parts[-1]

    @property
    def rows(self) -> int:
        return self.parts[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


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
