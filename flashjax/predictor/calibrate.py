"""``flashjax calibrate``: training-free activation sparsity for a SwiGLU model.

A SwiGLU FFN computes ``down(silu(W_gate x) * (W_up x))``: no neuron is exactly inactive, but
most have a small ``|silu(W_gate x)|``. As in CATS (Lee et al., 2024), a neuron whose
``|silu(W_gate x)|`` is at or below its layer's threshold is skipped: its gate activation is
taken as 0. The thresholds are set on the dense model's own activations over a calibration
text so that each layer skips the requested fraction of its neurons per token on average.

One target, the same fraction in every layer (rather than TEAL's greedy per-layer allocation
that minimises the output error for a total): every layer's buffer, reads and compute then
shrink alike, which is what the DRAM budget and the flash path plan with, and the fraction
of FFN rows read per token is the number the user chose. A layer's activations depend on the
thresholds of the layers before it, so the thresholds are refined in ``passes`` sweeps over
the text (each sets every layer's threshold from activations computed with the previous
sweep's thresholds), and a last sweep measures the sparsity they give.

Thresholds are stored with the model (``activation_thresholds`` in its config); activity is
then "above the threshold" for everything that reads it: the dense model, the oracle,
``collect`` and the predictors trained on what it records, the flash path and ``eval``.
Sparsity 0 stores thresholds of 0, which skip only neurons whose activation is exactly 0: the
dense model's result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from flashjax.config import THRESHOLDS_FIELD, ModelConfig
from flashjax.model import decoder
from flashjax.model.layers import KVCache
from flashjax.predictor.text import sequences
from flashjax.store.manifest import Manifest

log = logging.getLogger(__name__)

CALIBRATION = "calibration.json"
SAMPLE_VALUES = 2_000_000  # activations kept per layer for its quantile
TOLERANCE = 0.02  # a layer's measured sparsity further than this from the target is warned of


def _gate_magnitudes(module, tokens, positions, valid, cache: KVCache):
    mags = []

    def record(i, layer, ffn_in):  # the (thresholded) FFN, keeping |silu(W_gate x)|
        out, _ = layer.ffn.activity(ffn_in)
        mags.append(jnp.abs(jax.nn.silu(layer.ffn.gate(ffn_in))))
        return out

    module(tokens, positions, valid, cache, ffn=record)
    return jnp.stack(mags)


@functools.partial(jax.jit, static_argnums=0)
def gate_magnitudes(cfg: ModelConfig, params, tokens):
    """tokens [B, S] -> |silu(W_gate x)| [L, B, S, N] of the model ``cfg`` describes (with
    its thresholds, if any, applied in every layer)."""
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cache = KVCache.init(cfg, b, s, params["embed_tokens"]["embedding"].dtype)
    return decoder.module(cfg).apply({"params": params}, tokens, positions,
                                     jnp.ones((b, s), bool), cache, method=_gate_magnitudes)


def _batches(seqs: list[np.ndarray], batch: int):
    for i in range(0, len(seqs), batch):
        yield jnp.asarray(np.stack(seqs[i:i + batch]))


def _sweep(cfg, params, seqs, batch, thresholds, keep: float, rng, bar):
    """One pass over ``seqs`` with ``thresholds``: per layer a sample of |silu(gate)| values
    (each token's whole row kept with probability ``keep``) and the fraction at or below the
    threshold (all tokens)."""
    cfg = dataclasses.replace(cfg, activation_thresholds=thresholds)
    samples = [[] for _ in range(cfg.num_hidden_layers)]
    skipped = np.zeros(cfg.num_hidden_layers)
    count = 0
    for tokens in _batches(seqs, batch):
        mags = np.asarray(gate_magnitudes(cfg, params, tokens))  # [L, B, S, N]
        mags = mags.reshape(mags.shape[0], -1, mags.shape[-1])
        rows = rng.random(mags.shape[1]) < keep
        for layer in range(mags.shape[0]):
            samples[layer].append(mags[layer, rows].ravel())
            t = 0.0 if thresholds is None else thresholds[layer]
            skipped[layer] += (mags[layer] <= t).sum()
        count += mags.shape[1] * mags.shape[2]
        bar.update(int(tokens.size))
    return [np.concatenate(s) for s in samples], skipped / count


def calibrate(model_dir, text, *, sparsity: float, tokens: int = 16384, seq_len: int = 256,
              batch: int = 8, passes: int = 2, force: bool = False, seed: int = 0,
              progress: bool = True) -> dict:
    """Set the per-layer thresholds of the SwiGLU model in ``model_dir`` (a converted store)
    so that each layer skips ``sparsity`` of its neurons per token on ``text``; store them in
    its manifest, and the record in ``calibration.json``. Returns the record.

    A store with trained predictors is refused (they predict the activity of the old
    thresholds) unless ``force``, which removes them: train them again after calibrating.
    """
    import flashjax

    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) \
            or not 0 <= sparsity < 1:
        raise ValueError(f"calibrate: sparsity must be a fraction in [0, 1), got {sparsity!r}")
    for name, value in (("tokens", tokens), ("seq_len", seq_len), ("batch", batch),
                        ("passes", passes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"calibrate: {name} must be a positive integer, got {value!r}")
    model_dir = Path(model_dir)
    manifest = Manifest.read(model_dir)
    cfg = manifest.config
    if cfg.activation != "silu":
        raise ValueError(f"{model_dir}: activation {cfg.activation!r}; calibration is for SiLU "
                         f"(SwiGLU) models, whose neurons are never exactly inactive. This "
                         f"model's FFN is sparse by its activation already")
    predictors = model_dir / "predictors"
    if predictors.exists() and not force:
        raise FileExistsError(f"{predictors}: trained for the model's current activity; "
                              f"calibrating changes which neurons fire. Pass --force to remove "
                              f"them (then train them again)")
    model = flashjax.load(model_dir, progress=False)
    if model.tokenizer is None:
        raise ValueError(f"model {model_dir} has no tokenizer to read {text} with")
    seq_len = min(seq_len, cfg.max_sequence)
    seqs = list(sequences(text, model.tokenizer, seq_len=seq_len, bos_id=cfg.bos_token_id,
                          eos_id=cfg.eos_token_id, max_tokens=tokens))
    if not seqs:
        raise ValueError(f"{text}: fewer than {seq_len} tokens of text to calibrate on")
    n_tokens = len(seqs) * seq_len
    keep = min(1.0, SAMPLE_VALUES / (n_tokens * cfg.ffn_dim))
    rng = np.random.default_rng(seed)
    dense_cfg = dataclasses.replace(cfg, activation_thresholds=None)
    thresholds, sampled = None, 0
    if sparsity == 0:  # skip only exact zeros: the dense result
        thresholds, passes = (0.0,) * cfg.num_hidden_layers, 0
    bar = tqdm(total=(passes + 1) * n_tokens, unit="tok", desc="calibrate",
               disable=not progress)
    for _ in range(passes):
        samples, _ = _sweep(dense_cfg, model.params, seqs, batch, thresholds, keep, rng, bar)
        thresholds = tuple(float(np.quantile(s, sparsity)) for s in samples)
        sampled = int(len(samples[0]))
    _, measured = _sweep(dense_cfg, model.params, seqs, batch, thresholds, 0.0, rng, bar)
    bar.close()
    off = [i for i, m in enumerate(measured) if abs(m - sparsity) > TOLERANCE]
    if off:
        log.warning("calibrate: layers %s skip %s of their neurons on the calibration text, "
                    "not %.1f%% (more --passes or --tokens may help)", off,
                    [f"{100 * measured[i]:.1f}%" for i in off], 100 * sparsity)
    record = {"sparsity": float(sparsity), "rule": "the same fraction in every layer",
              "thresholds": list(thresholds),
              "measured_sparsity": [round(float(m), 4) for m in measured],
              "measured_mean": round(float(np.mean(measured)), 4),
              "text": str(Path(text).absolute()), "tokens": n_tokens, "seq_len": seq_len,
              "passes": passes, "sampled_per_layer": sampled}
    if predictors.exists():  # (force)
        shutil.rmtree(predictors)
        log.warning("calibrate: removed %s (trained for the previous activity)", predictors)
    calibrated = dataclasses.replace(cfg, activation_thresholds=thresholds)
    manifest = dataclasses.replace(manifest, config=calibrated)
    manifest.write(model_dir)
    tmp = model_dir / f".{CALIBRATION}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, model_dir / CALIBRATION)
    log.info("calibrate: %s now skips %.1f%% of FFN neurons per token (%s in its config)",
             model_dir, 100 * record["measured_mean"], THRESHOLDS_FIELD)
    return record
