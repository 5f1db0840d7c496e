"""Selectors: which of a layer's neurons a token needs.

A selector answers, per layer and token, with the sorted ids of the neurons whose rows the
FFN is computed over, and optionally a score per neuron (higher: keep first when a buffer
overflows). The engine computes the FFN over exactly that set whatever the budget, window or
schedule; only a selector decides what is computed.

* ``Oracle``: the exact active set, from the full input projections that decide activity
  (held outside the budget): the result equals the dense model's. For tests and as an upper bound.
* ``LowRank``: the trained low-rank predictors, thresholded per layer (an approximation the
  user asks for by choosing it).
* ``Naive``, ``Hybrid``: every neuron, every token (the baselines): naive keeps nothing
  resident and reads every row each time; hybrid keeps what fits and streams only the rest.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.model.bundle import neuron_bias
from flashjax.model.sparse import activity_scores
from flashjax.predictor.model import Predictors, predict_scores


class Selection(NamedTuple):
    ids: np.ndarray  # sorted int32 neuron ids
    scores: np.ndarray | None  # [N] float, or None


class Selector(Protocol):
    name: str
    keeps_rows: bool  # False: rows are never kept resident (every one is streamed)

    def shares(self) -> list[float] | None:
        """Each layer's expected fraction of needed neurons (to size its buffer), if known."""

    def dram_bytes(self, dtype) -> int:
        """What the selector holds inside the DRAM budget, with its weights in ``dtype``."""

    def prepare(self, params, resident_dtype) -> None:
        """Once the model's resident ``params`` are loaded: hold the selector's weights in the
        resident dtype the budget chose, and take what it uses of the params."""

    def select(self, layer: int, ffn_in, token_valid, step: int, fetch=np.asarray
               ) -> Selection:
        """ffn_in [B, 1, D], token_valid [B] (padding rows need nothing), both on the device;
        ``fetch(array)`` brings a device array's value to the host (the engine's counted
        round trip: a selector computes on the device and fetches its decision once)."""


@functools.partial(jax.jit, static_argnames="activation")
def _oracle_scores(weights, bias, ffn_in, token_valid, threshold, *, activation):
    """Exact activity scores [N] (> 0: fires), the max over the batch's real tokens."""
    pres = [jnp.einsum("bsd,dn->bsn", ffn_in, w) for w in weights]
    if bias is not None:
        pres[0] = pres[0] + bias
    scores = activity_scores(pres, activation, threshold)
    scores = jnp.where(token_valid[:, None, None], scores, -jnp.inf)
    return scores.max(axis=(0, 1))


def activity_parts(cfg) -> tuple[str, ...]:
    """The FFN parts whose pre-activations decide whether a neuron fires: OPT's up, a gated
    ReLU's or SwiGLU's gate, dReLU's gate and up."""
    if len(cfg.ffn_parts) == 2:
        return cfg.ffn_parts[:1]
    return cfg.ffn_parts[:2] if cfg.activation == "drelu" else cfg.ffn_parts[:1]


class Oracle:
    """Neurons that fire for some real token of the batch, from the exact pre-activations."""

    name, keeps_rows = "oracle", True

    def __init__(self, cfg, weights, shares=None):
        self.cfg = cfg
        # per layer the kernels [D, N] of ``activity_parts(cfg)`` on the device, in the
        # compute dtype
        self.weights = weights
        self.bias = None  # per layer the resident per-neuron biases, if any (``prepare``)
        # per layer the activation threshold as a device scalar, or None
        self.thresholds = [None if cfg.threshold(i) is None else jnp.float32(cfg.threshold(i))
                           for i in range(len(weights))]
        self._shares = shares

    @property
    def outside_budget_bytes(self) -> int:
        return sum(w.nbytes for ws in self.weights for w in ws)

    def shares(self):
        return self._shares

    def dram_bytes(self, dtype) -> int:
        return 0  # held outside the budget (reported as oracle_bytes)

    def prepare(self, params, resident_dtype) -> None:
        dtype = self.weights[0][0].dtype
        self.bias = [None if b is None else b.astype(dtype)
                     for b in (neuron_bias(self.cfg, params[f"layers_{i}"])
                               for i in range(len(self.weights)))]

    def select(self, layer, ffn_in, token_valid, step, fetch=np.asarray) -> Selection:
        scores = fetch(_oracle_scores(self.weights[layer], self.bias[layer], ffn_in,
                                      token_valid, self.thresholds[layer],
                                      activation=self.cfg.activation))
        return Selection(np.flatnonzero(scores > 0).astype(np.int32), scores)


class LowRank:
    """The trained predictors: neurons whose logit reaches the layer's threshold."""

    name, keeps_rows = "lowrank", True

    def __init__(self, predictors: Predictors):
        self.predictors = predictors

    def shares(self):
        return self.predictors.layer_weights()

    def dram_bytes(self, dtype) -> int:
        return sum(x.size for x in jax.tree.leaves(self.predictors.params)) * \
            jnp.dtype(dtype).itemsize

    def prepare(self, params, resident_dtype) -> None:
        self.predictors.params = jax.tree.map(lambda x: x.astype(resident_dtype),
                                              self.predictors.params)

    def scores(self, layer, ffn_in, token_valid, fetch=np.asarray) -> np.ndarray:
        return fetch(predict_scores(self.predictors.params[layer], ffn_in, token_valid))

    def select(self, layer, ffn_in, token_valid, step, fetch=np.asarray) -> Selection:
        scores = self.scores(layer, ffn_in, token_valid, fetch)
        ids = np.flatnonzero(scores >= self.predictors.thresholds[layer]).astype(np.int32)
        return Selection(ids, scores)


class _AllRows:
    def __init__(self, n_neurons: int):
        self._all = np.arange(n_neurons, dtype=np.int32)

    def shares(self):
        return None

    def dram_bytes(self, dtype) -> int:
        return 0

    def prepare(self, params, resident_dtype) -> None:
        pass

    def select(self, layer, ffn_in, token_valid, step, fetch=np.asarray) -> Selection:
        return Selection(self._all, None)


class Naive(_AllRows):
    """Every row of every layer read from flash for every token."""

    name, keeps_rows = None, False


class Hybrid(_AllRows):
    """Every row every token; the rows that fit stay resident, the rest are read each time."""

    name, keeps_rows = "hybrid", True
