"""``flashjax train-predictors``: fit one low-rank predictor per layer on collected activations.

Loss: binary cross-entropy with the positives weighted by the layer's negative/positive ratio
(a few % of neurons fire, so unweighted BCE learns "never"). Optimiser: AdamW with linear
warmup and cosine decay, one jit-compiled, donating step shared by all layers (same shapes).
Each layer's decision threshold is set on a held-out split to reach ``target_recall`` of the
truly active (token, neuron) pairs. Layers are saved as they finish (orbax) in
MODEL_DIR/predictors.partial/, so an interrupted run resumes at the next layer; the
directory becomes MODEL_DIR/predictors/ when every layer is done.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from flashjax.predictor.collect import open_arrays, read_meta
from flashjax.predictor.model import PREDICTORS_DIR, LowRankPredictor, default_rank
from flashjax.store.manifest import Manifest

PARTIAL = PREDICTORS_DIR + ".partial"
log = logging.getLogger(__name__)


def unpack(bits, n_neurons: int):
    """[..., N/8] uint8 -> [..., N] bool (little bit order, as collected)."""
    return jnp.unpackbits(bits, axis=-1, count=n_neurons, bitorder="little").astype(bool)


def balanced_bce(logits, labels, pos_weight):
    """Mean BCE with positives weighted by ``pos_weight``."""
    labels = labels.astype(jnp.float32)
    return jnp.mean(pos_weight * labels * jax.nn.softplus(-logits)
                    + (1 - labels) * jax.nn.softplus(logits))


def make_optimizer(steps: int, lr: float) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(module: LowRankPredictor, tx: optax.GradientTransformation, params, opt_state,
               x, bits, pos_weight):
    """One AdamW step on a batch: x [B, D] float16, bits [B, N/8]. params/opt_state donated."""
    labels = unpack(bits, module.n_neurons)

    def loss_fn(p):
        return balanced_bce(module.apply({"params": p}, x.astype(jnp.float32)), labels, pos_weight)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=0)
def _logits(module, params, x):
    return module.apply({"params": params}, x.astype(jnp.float32))


def threshold_for_recall(logits: np.ndarray, labels: np.ndarray, recall: float) -> float:
    """The largest threshold t with (logit >= t) covering ``recall`` of the positives."""
    pos = np.sort(logits[labels])
    if pos.size == 0:
        return float("inf")
    k = int(np.floor((1 - recall) * pos.size))  # positives allowed below t
    return float(pos[k])


def layer_metrics(logits: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    predicted = logits >= threshold
    tp = float((predicted & labels).sum())
    return {"recall": tp / max(labels.sum(), 1), "precision": tp / max(predicted.sum(), 1),
            "predicted_active_fraction": float(predicted.mean()),
            "true_active_fraction": float(labels.mean()), "threshold": threshold}


def train_layer(layer: int, data_dir: Path, meta: dict, *, rank: int, steps: int, batch: int,
                lr: float, seed: int, val_fraction: float, target_recall: float,
                progress: bool) -> tuple[dict, dict]:
    n = meta["n_neurons"]
    rows = meta["tokens_written"]
    ffn_in, active = open_arrays(data_dir, layer)
    x_all = ffn_in[:rows].read().result()
    bits_all = active[:rows].read().result()
    split = int(rows * (1 - val_fraction)) // meta["seq_len"] * meta["seq_len"]
    if split <= 0 or split >= rows:
        raise ValueError(f"{data_dir}: {rows} tokens are too few for a validation split of "
                         f"{val_fraction}")
    pos_rate = float(np.bitwise_count(bits_all[:split]).sum()) / (split * n)
    pos_weight = (1 - pos_rate) / max(pos_rate, 1e-6)
    module = LowRankPredictor(rank=rank, n_neurons=n)
    params = module.init(jax.random.key(seed + layer), jnp.zeros((1, meta["d_model"])))["params"]
    tx = make_optimizer(steps, lr)
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed + layer)
    losses = []
    for step in tqdm(range(steps), desc=f"layer {layer}", unit="step", disable=not progress,
                     leave=False):
        idx = np.sort(rng.integers(0, split, batch))
        params, opt_state, loss = train_step(module, tx, params, opt_state, x_all[idx],
                                             bits_all[idx], pos_weight)
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            losses.append((step, float(loss)))
    val_logits = np.concatenate([np.asarray(_logits(module, params, x_all[i:i + 4096]))
                                 for i in range(split, rows, 4096)])
    val_labels = np.unpackbits(bits_all[split:], axis=-1, count=n, bitorder="little").astype(bool)
    threshold = threshold_for_recall(val_logits, val_labels, target_recall)
    metrics = {"layer": layer, "rank": rank, "pos_weight": pos_weight, "loss_curve": losses,
               **layer_metrics(val_logits, val_labels, threshold)}
    return jax.tree.map(np.asarray, params), metrics


def train_predictors(model_dir, data_dir, *, rank: int | None = None, steps: int = 2000,
                     batch: int = 1024, lr: float = 3e-3, seed: int = 0,
                     val_fraction: float = 0.1, target_recall: float = 0.99,
                     overwrite: bool = False, progress: bool = True) -> dict:
    """Train every layer's predictor; returns the metrics saved with them."""
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    manifest = Manifest.read(model_dir)
    cfg = manifest.config
    for name, value, low in (("steps", steps, 1), ("batch", batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"train_predictors: {name} must be an integer >= {low}, got "
                             f"{value!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"train_predictors: rank must be an integer >= 1, got {rank!r}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"train_predictors: target_recall must be in (0, 1], got "
                         f"{target_recall!r}")
    if not lr > 0:
        raise ValueError(f"train_predictors: lr must be > 0, got {lr!r}")
    meta = read_meta(data_dir)
    if (meta["n_layers"], meta["d_model"], meta["n_neurons"]) != \
            (cfg.num_hidden_layers, cfg.hidden_size, cfg.ffn_dim):
        raise ValueError(f"{data_dir} was collected from a model of other shape ({meta})")
    from flashjax.store.place import load_order, order_checksum

    order = order_checksum(load_order(model_dir, manifest))
    if meta.get("neuron_order") != order:
        raise ValueError(f"{data_dir} was collected from the store in another neuron order "
                         f"(order crc32 {meta.get('neuron_order')}; {model_dir} has {order}, "
                         f"see `flashjax place`): collect again from {model_dir}")
    if not meta.get("complete"):
        log.warning("%s: the collection is incomplete (%d of %d tokens; rerun `flashjax "
                    "collect` with the same arguments to finish it): training on the %d "
                    "collected", data_dir, meta["tokens_written"], meta["tokens_target"],
                    meta["tokens_written"])
    if meta["tokens_written"] < 2:
        raise ValueError(f"{data_dir}: {meta['tokens_written']} tokens collected; nothing to "
                         f"train on")
    final = model_dir / PREDICTORS_DIR
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True (--overwrite) to retrain")
    rank = rank or default_rank(cfg.hidden_size)
    partial = model_dir / PARTIAL
    partial.mkdir(exist_ok=True)
    settings = {"rank": rank, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
                "val_fraction": val_fraction, "target_recall": target_recall,
                "data": str(data_dir.absolute()), "tokens": meta["tokens_written"]}
    started = time.perf_counter()
    layers = []
    for layer in tqdm(range(cfg.num_hidden_layers), desc="train predictors", unit="layer",
                      disable=not progress):
        done = partial / f"layer_{layer:03d}.json"
        if done.exists() and json.loads(done.read_text())["settings"] == settings:
            layers.append(json.loads(done.read_text())["metrics"])  # resumed
            continue
        params, metrics = train_layer(layer, data_dir, meta, rank=rank, steps=steps,
                                      batch=batch, lr=lr, seed=seed, val_fraction=val_fraction,
                                      target_recall=target_recall, progress=progress)
        _save(partial, layer, params)
        done.write_text(json.dumps({"settings": settings, "metrics": metrics}))
        layers.append(metrics)
    summary = {
        "settings": settings,
        "train_seconds_this_run": time.perf_counter() - started,
        "layers": layers,
        "recall": float(np.mean([m["recall"] for m in layers])),
        "precision": float(np.mean([m["precision"] for m in layers])),
        "predicted_active_fraction": float(np.mean([m["predicted_active_fraction"] for m in layers])),
        "true_active_fraction": float(np.mean([m["true_active_fraction"] for m in layers])),
    }
    (partial / "metrics.json").write_text(json.dumps(
        {"thresholds": [m["threshold"] for m in layers], **summary}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return summary


def _save(partial: Path, layer: int, params) -> None:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((partial / f"layer_{layer:03d}").absolute(), params, force=True)
    checkpointer.wait_until_finished()
