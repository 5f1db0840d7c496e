"""A layer's FFN as bundle rows and back, for any family.

Row i of a layer's bundle matrix [N, P x D] holds neuron i's slice of each of the P FFN parts
(``cfg.ffn_parts``) one after the other: each input part's weight row (its Flax kernel's column
i) and the down projection's row i. The parameter tree holds them as Flax kernels under
``layers_<l>/ffn/<part>/kernel``: input parts [D, N], the down part [N, D].
"""

from __future__ import annotations

import numpy as np

from flashjax.config import ModelConfig


def row_parts(rows, n_parts: int) -> tuple:
    """Bundle rows [..., P x D] -> P arrays [..., D] (views)."""
    d = rows.shape[-1] // n_parts
    return tuple(rows[..., i * d:(i + 1) * d] for i in range(n_parts))


def rows_to_kernels(cfg: ModelConfig, rows: np.ndarray) -> dict:
    """Bundle rows [N, P x D] -> {part: {"kernel": ...}} (contiguous copies)."""
    parts = row_parts(rows, len(cfg.ffn_parts))
    out = {name: {"kernel": np.ascontiguousarray(p.T)}
           for name, p in zip(cfg.ffn_parts[:-1], parts[:-1])}
    out[cfg.ffn_parts[-1]] = {"kernel": np.ascontiguousarray(parts[-1])}
    return out


def kernels_to_rows(cfg: ModelConfig, ffn: dict) -> np.ndarray:
    """The inverse of ``rows_to_kernels``: a layer's ``ffn`` subtree -> rows [N, P x D]."""
    *inputs, down = cfg.ffn_parts
    return np.concatenate([np.asarray(ffn[p]["kernel"]).T for p in inputs]
                          + [np.asarray(ffn[down]["kernel"])], axis=1)


def neuron_bias(cfg: ModelConfig, layer_params):
    """The per-neuron bias [N] of a layer's first FFN part (OPT's fc1), or None."""
    return layer_params["ffn"][cfg.ffn_parts[0]]["bias"] if cfg.ffn_bias else None


def output_bias(cfg: ModelConfig, layer_params):
    """The bias [D] added to a layer's FFN output (OPT's fc2), or None."""
    return layer_params["ffn"][cfg.ffn_parts[-1]]["bias"] if cfg.ffn_bias else None
