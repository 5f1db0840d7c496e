"""``flashjax eval``: perplexity dense vs flash-with-predictors, and predictor quality.

Teacher-forced on held-out text: the dense model gives the reference perplexity and, per
layer, the true activity and FFN inputs on which the predictors are scored (recall,
precision, predicted vs true active fraction); the flash model (lowrank predictors, budget,
window) runs the same sequences token by token through the sparse path for its perplexity
and flash bytes per token.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

import flashjax
from flashjax.predictor.collect import ffn_activations
from flashjax.predictor.model import predictor_logits
from flashjax.predictor.text import sequences
from flashjax.predictor.train import layer_metrics


def _nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Next-token negative log-likelihoods [S-1] from logits [S, V] of tokens [S]."""
    logits = logits[:-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return logz - logits[np.arange(len(logits)), tokens[1:]]


def evaluate(model_dir, text, *, dram_budget="50%", window: int = 4, tokens: int = 2048,
             seq_len: int = 256, progress: bool = True, **engine_options) -> dict:
    import jax.numpy as jnp

    dense = flashjax.load(model_dir, progress=False)
    flash = flashjax.load(model_dir, dram_budget=dram_budget, predictor="lowrank",
                          window=window, **engine_options)
    cfg = dense.cfg
    seq_len = min(seq_len, cfg.max_sequence)
    seqs = list(sequences(text, dense.tokenizer, seq_len=seq_len, bos_id=cfg.bos_token_id,
                          eos_id=cfg.eos_token_id, max_tokens=tokens))
    if not seqs:
        raise ValueError(f"{text}: fewer than {seq_len} tokens of text to evaluate on")
    nll_dense, nll_sparse = [], []
    logits_per_layer = [[] for _ in range(cfg.num_hidden_layers)]
    labels_per_layer = [[] for _ in range(cfg.num_hidden_layers)]
    flash_bytes = storage_bytes = flash_tokens = 0
    streamed = 0
    for seq in tqdm(seqs, desc="eval", unit="seq", disable=not progress):
        ins, bits, logits = ffn_activations(cfg, dense.params, jnp.asarray(seq[None]))
        nll_dense.append(_nll(np.asarray(logits[0]), seq))
        ins, bits = np.asarray(ins), np.asarray(bits)
        for layer, params in enumerate(flash.selector.predictors.params):
            x = jnp.asarray(ins[layer, 0].astype(np.float32))  # [S, D], one token each
            logits_per_layer[layer].append(np.asarray(predictor_logits(params, x)))
            labels_per_layer[layer].append(np.unpackbits(bits[layer, 0], axis=-1,
                                                         count=cfg.ffn_dim,
                                                         bitorder="little").astype(bool))
        sparse_logits, state = flash.logits(seq, return_state=True)
        sparse_logits, stats = sparse_logits[0], flash.report(state)
        nll_sparse.append(_nll(sparse_logits, seq))
        flash_bytes += stats["flash_bytes_read"]
        storage_bytes += stats["storage_bytes_read"] or 0
        flash_tokens += stats["tokens"]
        streamed += stats["rows_streamed"]
    layers = [layer_metrics(np.concatenate(lg), np.concatenate(lb), thr)
              for lg, lb, thr in zip(logits_per_layer, labels_per_layer,
                                     flash.selector.predictors.thresholds)]
    ppl_dense = float(np.exp(np.concatenate(nll_dense).mean()))
    ppl_sparse = float(np.exp(np.concatenate(nll_sparse).mean()))
    return {
        "tokens": int(sum(len(s) for s in seqs)),
        "ppl_dense": ppl_dense,
        "ppl_sparse": ppl_sparse,
        "ppl_ratio": ppl_sparse / ppl_dense,
        "recall": float(np.mean([m["recall"] for m in layers])),
        "precision": float(np.mean([m["precision"] for m in layers])),
        "predicted_active_fraction": float(np.mean([m["predicted_active_fraction"] for m in layers])),
        "true_active_fraction": float(np.mean([m["true_active_fraction"] for m in layers])),
        "layers": layers,
        "flash_bytes_per_token": flash_bytes / max(flash_tokens, 1),
        "storage_bytes_per_token": storage_bytes / max(flash_tokens, 1),
        "rows_streamed": streamed,
        "dram_budget_bytes": flash.memory.budget,
        "capacity": flash.memory.capacity,
        "window": window,
    }

