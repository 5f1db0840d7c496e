"""The engine's jitted pieces. Every layer has the same shapes, so each compiles once (the
row kernels once per padded row count).

Resident weights may be held in a narrower dtype than the computation (to fit a budget); each
piece widens what it uses to the dtype of the activations or KV cache.

Shape legend: B batch, D model width, P FFN parts, N a layer's neurons, C a buffer's rows,
S staged rows (padded), V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flashjax.config import ModelConfig
from flashjax.engine.state import NeuronBuffer
from flashjax.model import decoder
from flashjax.model.bundle import output_bias, row_parts
from flashjax.model.layers import KVCache
from flashjax.model.sparse import sparse_ffn
from flashjax.store.quant import decode_parts_jax


@struct.dataclass
class RowUpdate:
    """A read's small arguments, travelling as one int32 array of 3 S + 2 entries (each numpy
    argument of a jitted call costs ~8 us of dispatch on CPU).

    ids [S]: the neuron ids in the staged rows, padded with 0 (their biases, where the family
    has them, are gathered on the device from the layer's resident bias vector);
    holes [S] <- movers [S]: row moves, holes padded out of range (dropped), movers with 0;
    count: staged rows that are real; start: the slot the first staged row is appended at.
    """

    ids: jax.Array
    holes: jax.Array
    movers: jax.Array
    count: jax.Array
    start: jax.Array

    @staticmethod
    def pack(size: int, ids, *, no_slot: int, holes=(), movers=(), start: int = 0
             ) -> np.ndarray:
        """The int32 array for ``ids`` staged and padded to ``size`` rows, with the moves
        ``holes[i] <- movers[i]`` (at most ``size``) and appends from ``start``; ``no_slot``
        is a slot index past the buffer."""
        packed = np.zeros(3 * size + 2, np.int32)
        packed[:len(ids)] = ids
        packed[size:2 * size] = no_slot
        packed[size:size + len(holes)] = holes
        packed[2 * size:2 * size + len(movers)] = movers
        packed[3 * size] = len(ids)
        packed[3 * size + 1] = start
        return packed

    @classmethod
    def unpack(cls, packed) -> RowUpdate:
        """Inside jit: the fields of a packed array (S from its static length)."""
        size = (packed.shape[0] - 2) // 3
        return cls(ids=packed[:size], holes=packed[size:2 * size],
                   movers=packed[2 * size:3 * size], count=packed[3 * size],
                   start=packed[3 * size + 1])


HEAD_WEIGHTS = ("embed_tokens", "lm_head")  # the parameters the LM head reads


def _widen(tree, like):
    return jax.tree.map(lambda x: x.astype(like.dtype), tree)


def _add(acc, out):
    return out if acc is None else acc + out.astype(acc.dtype)


def _staged_parts(rows, update: RowUpdate, neuron_bias, dtype, d_model: int, quant=None,
                  scales=None):
    """Staging rows [S, P x D] (storage dtype) -> the P parts [S, D] and the bias [S] (or
    None) in ``dtype``, and the mask of real rows [S]. Rows past the real ones are zeroed:
    they hold whatever an earlier read left, which a mask alone would not keep out of a
    matmul if it were not finite. Quantized rows ([S, row bytes] uint8, ``quant`` their
    layout) are decoded here, with the layer's resident ``scales`` [N, G] where the rows do
    not carry theirs."""
    live = jnp.arange(rows.shape[0]) < update.count
    if quant is None:
        parts = row_parts(rows.astype(dtype), rows.shape[1] // d_model)
    else:
        parts = decode_parts_jax(rows, quant, quant.width // d_model,
                                 None if scales is None else scales[update.ids], dtype)
    parts = tuple(jnp.where(live[:, None], p, 0) for p in parts)
    bias = None if neuron_bias is None else neuron_bias[update.ids].astype(dtype)
    return parts, bias, live


@functools.partial(jax.jit, static_argnames="activation")
def ffn_held(buf: NeuronBuffer, mask, ffn_in, acc, *, activation: str, threshold=None):
    """acc + the FFN over the buffer's rows where ``mask`` [C] is True (output bias not
    added; acc None: nothing to add to; threshold: the layer's calibrated activation threshold,
    a scalar, or None)."""
    return _add(acc, sparse_ffn(ffn_in, buf.parts, buf.bias, mask, activation=activation,
                                threshold=threshold))


@functools.partial(jax.jit, static_argnames=("activation", "quant"))
def ffn_staged(rows, packed, neuron_bias, ffn_in, acc, *, activation: str, threshold=None,
               scales=None, quant=None):
    """acc + the FFN over the real rows just read (staging rows [S, P x D], or quantized
    ones with ``quant`` and ``scales``, see ``_staged_parts``; ``packed`` a ``RowUpdate``);
    rows past the count read are stale and masked."""
    parts, bias, live = _staged_parts(rows, RowUpdate.unpack(packed), neuron_bias,
                                      ffn_in.dtype, ffn_in.shape[-1], quant, scales)
    return _add(acc, sparse_ffn(ffn_in, parts, bias, live, activation=activation,
                                threshold=threshold))


@functools.partial(jax.jit, donate_argnums=0, static_argnames="quant")
def update_buffer(buf: NeuronBuffer, rows, packed, neuron_bias, scales=None, *, quant=None):
    """One layer's change in one dispatch: the moves of ``packed``, then its real staged rows
    appended from its start slot (the appended slots may be slots the moves emptied). The
    buffer is donated: rebind it to the result. Also returns a scalar ready only once the new
    buffer is: the fence for the staging rows it read (the buffer itself cannot be one: the
    next update donates it). Quantized rows are decoded on the way in (``quant``,
    ``scales``: see ``_staged_parts``): the buffer holds values."""
    u = RowUpdate.unpack(packed)
    moved = jax.tree.map(lambda x: x.at[u.holes].set(x[u.movers], mode="drop"), buf)
    new_parts, new_bias, live = _staged_parts(rows, u, neuron_bias, buf.parts[0].dtype,
                                              buf.parts[0].shape[1], quant, scales)

    def put(old, new):  # a contiguous write of the real rows; the slots past them keep theirs
        now = jax.lax.dynamic_slice_in_dim(old, u.start, new.shape[0])
        mask = live.reshape(-1, *([1] * (new.ndim - 1)))
        return jax.lax.dynamic_update_slice_in_dim(old, jnp.where(mask, new, now), u.start, 0)

    buf = NeuronBuffer(parts=tuple(map(put, moved.parts, new_parts)),
                       bias=None if new_bias is None else put(moved.bias, new_bias))
    return buf, buf.parts[0][0, 0]


@functools.partial(jax.jit, donate_argnums=0)
def move_rows(buf: NeuronBuffer, packed):
    """A piece of moves only (``packed``'s count is 0): no staged rows cross to the device.
    Returns (buffer, fence) as ``update_buffer``."""
    u = RowUpdate.unpack(packed)
    buf = jax.tree.map(lambda x: x.at[u.holes].set(x[u.movers], mode="drop"), buf)
    return buf, buf.parts[0][0, 0]


@jax.jit
def zeros_like(x):
    """(Built on the device: nothing crosses from the host.)"""
    return jnp.zeros_like(x)


@jax.jit
def all_valid(tokens):
    return jnp.ones(tokens.shape, bool)


def compile_row_kernels(buffers, neuron_biases, staging, capacities, sizes, stream_sizes,
                        dtype, activation, threshold=None, scales=None, quant=None,
                        put=lambda *a: a):
    """Compile the row kernels for every buffer shape and padded size (a layer of each
    distinct capacity, its update sizes ``sizes[l]``, and the streamed ``stream_sizes``), for
    a ``threshold`` like the layers' (a device scalar or None) and rows of layout ``quant``
    (``scales``: the layers' resident scales or None), with host arguments passed as the
    engine passes them (``put``: ``Transfers.put`` without its counts); returns the buffers
    (donated to the updates, which change nothing)."""
    x = zeros_like(jnp.zeros((1, 1, buffers[0].parts[0].shape[1]), dtype))
    staged = set()
    for layer in sorted({capacities.index(c) for c in capacities}):
        buf, bias = buffers[layer], neuron_biases[layer]
        ffn_held(buf, *put(np.zeros(buf.rows, bool)), x, None, activation=activation,
                 threshold=threshold)
        layer_scales = None if scales is None else scales[layer]
        for size in sizes[layer]:
            rows, packed = put(staging[:size], RowUpdate.pack(size, [], no_slot=buf.rows))
            buf, _ = update_buffer(buf, rows, packed, bias, layer_scales, quant=quant)
            buf, _ = move_rows(buf, packed)
        for size in sorted((set(sizes[layer]) | set(stream_sizes)) - staged):
            rows, packed = put(staging[:size], RowUpdate.pack(size, [], no_slot=buf.rows))
            for acc in (None, x):
                ffn_staged(rows, packed, bias, x, acc, activation=activation,
                           threshold=threshold, scales=layer_scales, quant=quant)
            staged.add(size)
        buffers[layer] = buf
    return jax.block_until_ready(buffers)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def embed(cfg: ModelConfig, params, tokens, positions, token_valid, kv: KVCache):
    """tokens, positions, token_valid: [B] -> h [B, 1, D]; marks the new cache slot."""
    valid = jax.lax.dynamic_update_slice_in_dim(kv.valid, token_valid[:, None], kv.index, axis=1)
    params = _widen(params, kv.keys)
    h = decoder.module(cfg).apply({"params": params}, tokens[:, None], positions[:, None],
                                  method="embed")
    return h, kv.replace(valid=valid)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def attend(cfg: ModelConfig, layer_params, h, kv: KVCache, layer, positions):
    """Attention of layer ``layer`` at ``positions`` [B] -> (h, ffn_in [B, 1, D], kv)."""
    layer_params = _widen(layer_params, h)
    keys = jax.lax.dynamic_index_in_dim(kv.keys, layer, keepdims=False)
    values = jax.lax.dynamic_index_in_dim(kv.values, layer, keepdims=False)
    h, ffn_in, keys, values = decoder.layer(cfg).apply(
        {"params": layer_params}, h, keys, values, kv.valid, kv.index, positions[:, None],
        method="attend")
    kv = kv.replace(keys=jax.lax.dynamic_update_index_in_dim(kv.keys, keys, layer, axis=0),
                    values=jax.lax.dynamic_update_index_in_dim(kv.values, values, layer, axis=0))
    return h, ffn_in, kv


@functools.partial(jax.jit, static_argnums=0)
def finish(cfg: ModelConfig, layer_params, h, ffn_out):
    """The layer's FFN output (its output bias added here, once) back into the residual
    stream."""
    layer_params = _widen(layer_params, h)
    bias = output_bias(cfg, layer_params)
    ffn_out = ffn_out if bias is None else ffn_out + bias
    return decoder.layer(cfg).apply({"params": layer_params}, h, ffn_out, method="finish")


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def head(cfg: ModelConfig, params, h, kv: KVCache):
    """-> (logits [B, V] float32, kv with its next slot). The head weights stay as held:
    ``lm_logits`` widens them a slice at a time."""
    params = {k: v if k in HEAD_WEIGHTS else _widen(v, h) for k, v in params.items()}
    logits = decoder.module(cfg).apply({"params": params}, h, method="head")[:, 0]
    return logits, kv.replace(index=kv.index + 1)
