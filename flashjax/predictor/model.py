"""The low-rank predictor: one logit per FFN neuron from the FFN's input, and its storage.

Shape legend: B batch, S tokens, D model width, R rank, N neurons.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PREDICTORS_DIR = "predictors"
METRICS_FILE = "metrics.json"


def default_rank(d_model: int) -> int:
    """The paper's OPT-6.7B setting is rank 128 for width 4096 (1/32); small models keep at
    least 64 (the shipped 256-wide model reaches 1.3x the true active set at rank 64,
    1.8x at rank 32)."""
    return max(64, d_model // 32)


class LowRankPredictor(nn.Module):
    """logits = (x A) B + b: A [D, R], B [R, N], b [N]."""

    rank: int
    n_neurons: int

    @nn.compact
    def __call__(self, x):
        """x [..., D] -> logits [..., N] (float32)."""
        h = nn.Dense(self.rank, use_bias=False, name="A")(x)
        return nn.Dense(self.n_neurons, name="B")(h).astype(jnp.float32)


@jax.jit
def predictor_logits(params, x):
    """The predictor of ``params`` (any rank) on x [..., D] -> logits [..., N], computed in
    x's dtype whatever dtype the parameters are held in."""
    module = LowRankPredictor(rank=params["A"]["kernel"].shape[1],
                              n_neurons=params["B"]["kernel"].shape[1])
    return module.apply({"params": jax.tree.map(lambda p: p.astype(x.dtype), params)}, x)


@jax.jit
def predict_scores(params, x, token_valid):
    """Max logit over the batch's real tokens: x [B, S, D], token_valid [B] -> [N]."""
    logits = predictor_logits(params, x)  # [B, S, N]
    return jnp.where(token_valid[:, None, None], logits, -jnp.inf).max(axis=(0, 1))


def layer_weights(metrics: dict, n_layers: int) -> list[float] | None:
    """Each layer's predicted-active fraction from trained predictors' ``metrics``, or None
    unless they cover ``n_layers`` layers."""
    layers = metrics.get("layers")
    if not layers or len(layers) != n_layers:
        return None
    return [m["predicted_active_fraction"] for m in layers]


def saved_layer_weights(model_dir: str | Path, n_layers: int) -> list[float] | None:
    """``layer_weights`` of the predictors saved in ``model_dir``, without loading them; None
    when there are none."""
    meta = Path(model_dir) / PREDICTORS_DIR / METRICS_FILE
    return layer_weights(json.loads(meta.read_text()), n_layers) if meta.exists() else None


@dataclasses.dataclass
class Predictors:
    """Per-layer predictor parameters, decision thresholds on the logits, and metrics."""

    params: list[dict]
    thresholds: list[float]
    metrics: dict

    def layer_weights(self) -> list[float] | None:
        """Each layer's predicted-active fraction on held-out tokens (to size its buffer)."""
        return layer_weights(self.metrics, len(self.params))

    @classmethod
    def random(cls, d_model: int, n_neurons: int, n_layers: int, rank: int | None = None,
               seed: int = 0, dtype=jnp.float32) -> Predictors:
        """Untrained predictors of the given shape: their cost is real, their output is not
        (for benchmarks whose needed sets come from elsewhere, e.g. an activity trace)."""
        module = LowRankPredictor(rank=rank or default_rank(d_model), n_neurons=n_neurons)
        keys = jax.random.split(jax.random.key(seed), n_layers)
        x = jnp.zeros((1, d_model), dtype)
        params = [jax.tree.map(lambda a: a.astype(dtype), module.init(k, x)["params"])
                  for k in keys]
        return cls(params=params, thresholds=[0.0] * n_layers, metrics={})

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.params))

    @classmethod
    def load(cls, model_dir: str | Path, n_layers: int, dtype=jnp.float32) -> Predictors:
        root = Path(model_dir) / PREDICTORS_DIR
        meta = root / METRICS_FILE
        if not meta.exists():
            raise FileNotFoundError(f"{root}: no trained predictors ({METRICS_FILE} missing); "
                                    f"run `flashjax train-predictors`")
        metrics = json.loads(meta.read_text())
        thresholds = metrics.pop("thresholds")
        if len(thresholds) != n_layers:
            raise ValueError(f"{meta}: {len(thresholds)} thresholds for {n_layers} layers")
        checkpointer = ocp.StandardCheckpointer()
        params = [jax.tree.map(lambda x: jnp.asarray(x, dtype),
                               checkpointer.restore((root / f"layer_{i:03d}").absolute()))
                  for i in range(n_layers)]
        return cls(params=params, thresholds=[float(t) for t in thresholds], metrics=metrics)
