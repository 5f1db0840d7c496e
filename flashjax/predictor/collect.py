"""``flashjax collect``: record the dense model's FFN inputs and neuron activity on text.

Per layer, two TensorStore zarr3 arrays in DATA_DIR/layer_NNN/: ``ffn_in`` [T, D] float16
(the normalised attention output that feeds the FFN) and ``active`` [T, N/8] uint8 (bit j of
a row: neuron j fires: its ReLU's input > 0, for dReLU both; little bit order). Written a
batch at a time, so memory does not grow with T; ``meta.json`` records how many tokens are
complete, and a rerun with the same arguments resumes from there.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

from flashjax.config import ModelConfig
from flashjax.model.layers import KVCache
from flashjax.model import decoder
from flashjax.predictor.text import sequences

META = "meta.json"
log = logging.getLogger(__name__)


def _activations(module, tokens, positions, valid, cache: KVCache):
    ins, bits = [], []

    def record(i, layer, ffn_in):  # the dense FFN, keeping its input and which neurons fire
        out, scores = layer.ffn.activity(ffn_in)
        ins.append(ffn_in.astype(jnp.float16))
        bits.append(jnp.packbits(scores > 0, axis=-1, bitorder="little"))
        return out

    logits, _ = module(tokens, positions, valid, cache, ffn=record)
    return jnp.stack(ins), jnp.stack(bits), logits


@functools.partial(jax.jit, static_argnums=0)
def ffn_activations(cfg: ModelConfig, params, tokens):
    """tokens [B, S] (full sequences) -> (ffn_in [L, B, S, D] float16,
    active bits [L, B, S, N/8] uint8, logits [B, S, V])."""
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    valid = jnp.ones((b, s), bool)
    cache = KVCache.init(cfg, b, s, params["embed_tokens"]["embedding"].dtype)
    return decoder.module(cfg).apply({"params": params}, tokens, positions, valid, cache,
                                     method=_activations)


def _array(path: Path, shape, dtype, chunk_rows: int, create: bool) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if not create:
        return ts.open(spec, open=True).result()
    return ts.open(spec, create=True, delete_existing=True, dtype=dtype, shape=list(shape),
                   chunk_layout=ts.ChunkLayout(chunk_shape=[chunk_rows, shape[1]])).result()


def open_arrays(data_dir: Path, layer: int, create=False, meta=None):
    d = data_dir / f"layer_{layer:03d}"
    if create:
        rows, chunk = meta["tokens_target"], meta["seq_len"] * meta["batch"]
        return (_array(d / "ffn_in", (rows, meta["d_model"]), ts.float16, chunk, True),
                _array(d / "active", (rows, meta["n_neurons"] // 8), ts.uint8, chunk, True))
    return _array(d / "ffn_in", None, None, 0, False), _array(d / "active", None, None, 0, False)


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META
    if not path.exists():
        raise FileNotFoundError(f"{path}: not an activation data directory (run "
                                f"`flashjax collect` first)")
    return json.loads(path.read_text())


def _write_meta(data_dir: Path, meta: dict) -> None:
    tmp = data_dir / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, data_dir / META)


def _order_checksum(model_dir) -> int | None:
    from flashjax.store.manifest import Manifest
    from flashjax.store.place import load_order, order_checksum

    if model_dir is None or not (Path(model_dir) / "manifest.json").exists():
        return None
    return order_checksum(load_order(model_dir, Manifest.read(model_dir, check_files=False)))


def collect(model, text, out_dir, *, tokens: int = 100_000, seq_len: int = 256,
            batch: int = 8, progress: bool = True) -> dict:
    """Run the dense ``model`` (a loaded ``flashjax.runtime.Model`` with a tokenizer) over
    ``text`` and store its FFN inputs and activity in ``out_dir``; returns the metadata."""
    cfg = model.cfg
    for name, value, low in (("tokens", tokens, 1), ("seq_len", seq_len, 2), ("batch", batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"collect: {name} must be an integer >= {low}, got {value!r}")
    if model.tokenizer is None:
        raise ValueError(f"model {model.path} has no tokenizer to read text with")
    if cfg.ffn_dim % 8:
        raise ValueError(f"ffn_dim {cfg.ffn_dim} is not a multiple of 8 (activity is bit-packed)")
    seq_len = min(seq_len, cfg.max_sequence)
    out_dir = Path(out_dir)
    wanted = {"model": str(Path(model.path).absolute()), "text": str(Path(text).absolute()),
              "seq_len": seq_len, "batch": batch, "n_layers": cfg.num_hidden_layers,
              "d_model": cfg.hidden_size, "n_neurons": cfg.ffn_dim,
              # the store's neuron order the activity is recorded in (None: the checkpoint's)
              "neuron_order": _order_checksum(model.path),
              "tokens_target": -(-tokens // (seq_len * batch)) * seq_len * batch}
    done = 0
    if (out_dir / META).exists():
        meta = read_meta(out_dir)
        same = {k: meta.get(k) for k in wanted} == wanted
        if not same:
            raise FileExistsError(f"{out_dir} holds a collection with other settings "
                                  f"({meta}); choose another --out")
        done = meta["tokens_written"]
        arrays = [open_arrays(out_dir, i) for i in range(cfg.num_hidden_layers)]
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {**wanted, "tokens_written": 0, "complete": False}
        arrays = [open_arrays(out_dir, i, create=True, meta=meta)
                  for i in range(cfg.num_hidden_layers)]
        _write_meta(out_dir, meta)
    if meta.get("complete"):
        return meta
    stream = sequences(text, model.tokenizer, seq_len=seq_len, bos_id=cfg.bos_token_id,
                       eos_id=cfg.eos_token_id, max_tokens=meta["tokens_target"])
    rows_per_batch = seq_len * batch
    bar = tqdm(total=meta["tokens_target"], initial=done, unit="tok", desc="collect",
               disable=not progress)
    pending: list[np.ndarray] = []
    seen = 0
    for seq in stream:
        seen += seq_len
        if seen <= done:  # resuming: these tokens are already stored
            continue
        pending.append(seq)
        if len(pending) < batch:
            continue
        ins, bits, _ = ffn_activations(cfg, model.params, jnp.asarray(np.stack(pending)))
        ins, bits = np.asarray(ins), np.asarray(bits)
        start = done
        futures = []
        for layer, (ffn_in, active) in enumerate(arrays):
            futures.append(ffn_in[start:start + rows_per_batch].write(
                ins[layer].reshape(rows_per_batch, -1)))
            futures.append(active[start:start + rows_per_batch].write(
                bits[layer].reshape(rows_per_batch, -1)))
        for f in futures:
            f.result()
        done += rows_per_batch
        meta["tokens_written"] = done
        _write_meta(out_dir, meta)
        bar.update(rows_per_batch)
        pending = []
    bar.close()
    if done == 0:
        raise ValueError(f"{text}: not one batch of {batch} sequences of {seq_len} tokens in "
                         f"the text; nothing to collect (use more text, or a smaller --seq-len "
                         f"or --batch)")
    if done < meta["tokens_target"]:
        log.warning("%s: the text ran out after %d of the %d tokens asked for; collected those",
                    text, done, meta["tokens_target"])
    meta["complete"] = True
    _write_meta(out_dir, meta)
    return meta
