"""flashjax parameter tree -> Hugging Face checkpoint (``config.json`` + ``model.safetensors``).

The exact inverse of the converter's table (``dram_table``) plus the FFN weights: every entry's
HF tensor is rebuilt from the flashjax array and pushed back through the table's own transform,
which must give the flashjax array again, so a wrong inverse fails here and not in a user's
model. The output goes to a hidden sibling directory renamed into place only when complete.

Shape legend: D hidden_size, N ffn_dim.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from flashjax.config import FFN_ACTIVATION_FIELD, THRESHOLDS_FIELD, ModelConfig
from flashjax.store.convert import Entry, dram_table, ffn_keys

PREFIXES = {"opt": "model.decoder.", "llama": "model."}
log = logging.getLogger(__name__)
EXPORT_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


def export_hf(params, cfg: ModelConfig, out_dir: str | Path, dtype: str = "float16", *,
              overwrite: bool = False) -> Path:
    """Write ``params`` (the tree of ``init_params``/``flashjax.load``) as a Hugging Face
    checkpoint in ``out_dir`` that its family's ``from_pretrained`` (``OPTForCausalLM``,
    ``LlamaForCausalLM``, ...) loads. A dReLU model's config says so in a field
    (``ffn_activation``) that only flashjax reads: transformers would compute
    relu(gate) * up with its weights, so it is written with a warning.

    ``dtype`` (float16 or float32) is the storage type of every tensor. The LM head is tied to
    the token embedding unless ``cfg.tie_word_embeddings`` is False, so ``lm_head.weight`` is
    written only then. ``out_dir`` must not exist unless ``overwrite``. Returns ``out_dir``.
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists; pass overwrite=True "
                              f"or remove it first")
    tensors = hf_tensors(params, cfg, EXPORT_DTYPES[dtype])
    _warn_drelu(cfg, out_dir)
    hf_config = _hf_config(cfg, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


SHARD_BYTES = 2 << 30  # safetensors shard size of a streamed export, as HF writes them


def export_model_dir(model_dir: str | Path, out_dir: str | Path, dtype: str | None = None, *,
                     shard_bytes: int = SHARD_BYTES, progress: bool = True) -> Path:
    """Write the converted model in ``model_dir`` back out as a Hugging Face checkpoint in
    ``out_dir``, one DRAM group and one layer's FFN at a time (so peak memory is about one
    shard, whatever the model's size): sharded ``model-NNNNN-of-NNNNN.safetensors`` with its
    index once larger than ``shard_bytes``, ``config.json`` and the tokenizer files. Every FFN
    row is crc32-checked on the way. ``dtype`` (float16 or float32) defaults to the store's
    (bfloat16 stores are written as float32). ``out_dir`` must not exist."""
    from tqdm.auto import tqdm

    from flashjax.model.bundle import rows_to_kernels
    from flashjax.store import bundles
    from flashjax.store.convert import TOKENIZER_FILES, dram_group, dram_groups
    from flashjax.store.load import read_dram_group
    from flashjax.store.manifest import Manifest
    from flashjax.store.place import load_order, neuron_params

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    manifest = Manifest.read(model_dir)
    cfg = manifest.config
    dtype = dtype or (manifest.dtype if manifest.dtype in EXPORT_DTYPES else "float32")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists; choose a new path "
                              f"or remove it first")
    np_dtype = EXPORT_DTYPES[dtype]
    prefix = PREFIXES[cfg.family]
    table = dram_table(cfg, prefix)
    checksums = bundles.load_checksums(model_dir)
    scales = bundles.load_scales(model_dir, manifest)
    order = load_order(model_dir, manifest)  # a placed store's rows go back to neuron order
    if manifest.quant is not None:
        log.warning("%s: the FFN rows are %s; exporting them dequantized to %s (the "
                    "quantization error stays in the weights)", model_dir, manifest.ffn_dtype,
                    dtype)
    _warn_drelu(cfg, out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards: list[list[str]] = []  # the tensor names of each shard written
        pending: dict[str, np.ndarray] = {}

        def flush():
            if pending:
                save_file(pending, str(tmp / f"shard-{len(shards):05d}"),
                          metadata={"format": "pt"})
                shards.append(list(pending))
                pending.clear()

        for group in tqdm(dram_groups(cfg), desc="export", unit="group", disable=not progress):
            flat = _flatten(read_dram_group(model_dir, group))
            layer = None if group == "top" else int(group.split("_")[1])
            # a placed store's neuron-indexed tensors back in the checkpoint's neuron order
            back = None if order is None or layer is None else np.argsort(order[layer])
            if back is not None:
                for path in neuron_params(cfg):
                    key = (f"layers_{layer}", *path)
                    flat[key] = np.asarray(flat[key])[..., back]
            tensors = {e.key: _invert(e, np.asarray(flat[e.path], np.float32))
                       for e in table if dram_group(e.path) == group}
            if layer is not None:
                rows = bundles.read_layer_values(model_dir, layer, manifest, checksums, scales)
                if back is not None:
                    rows = rows[back]
                ffn = rows_to_kernels(cfg, rows)
                for part, key in zip(cfg.ffn_parts, ffn_keys(cfg, prefix, layer)):
                    tensors[key] = ffn[part]["kernel"].T  # torch Linear [out, in]
            for key, w in tensors.items():
                pending[key] = np.ascontiguousarray(np.asarray(w).astype(np_dtype))
            if sum(x.nbytes for x in pending.values()) >= shard_bytes:
                flush()
        flush()
        if len(shards) == 1:
            os.rename(tmp / "shard-00000", tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.rename(tmp / f"shard-{i:05d}", tmp / name)
                weight_map.update(dict.fromkeys(names, name))
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": sum((tmp / n).stat().st_size
                                                for n in set(weight_map.values()))},
                 "weight_map": weight_map}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(_hf_config(cfg, dtype), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _hf_config(cfg: ModelConfig, dtype: str) -> dict:
    return cfg.to_hf_config() | {"torch_dtype": dtype, "dropout": 0.0, "attention_dropout": 0.0}


def _warn_drelu(cfg: ModelConfig, out_dir: Path) -> None:
    if cfg.activation == "drelu":
        log.warning("%s: a dReLU model; transformers' %s ignores the %r field and would "
                    "compute relu(gate) * up: load it with flashjax or custom modeling code",
                    out_dir, cfg.to_hf_config()["architectures"][0], FFN_ACTIVATION_FIELD)
    if cfg.activation_thresholds is not None:
        log.warning("%s: a calibrated SwiGLU model; transformers' %s ignores the %r field and "
                    "computes the dense model (every neuron): load it with flashjax for the "
                    "thresholded one", out_dir, cfg.to_hf_config()["architectures"][0],
                    THRESHOLDS_FIELD)


def hf_tensors(params, cfg: ModelConfig, np_dtype=np.dtype(np.float32)) -> dict[str, np.ndarray]:
    """Every HF tensor of the checkpoint, keyed by its HF name, cast to ``np_dtype``.

    Raises ValueError if the tree has a missing, extra or misshapen parameter.
    """
    prefix = PREFIXES[cfg.family]
    table = dram_table(cfg, prefix)
    flat = _flatten(params)
    expected = {e.path for e in table}
    for i in range(cfg.num_hidden_layers):
        expected |= {(f"layers_{i}", "ffn", part, "kernel") for part in cfg.ffn_parts}
    missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
    if missing or extra:
        raise ValueError(f"parameter tree does not match the config: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")

    out = {}
    for e in table:
        out[e.key] = _invert(e, np.asarray(flat[e.path], np.float32))
    for i in range(cfg.num_hidden_layers):
        # torch Linear weight [out, in] = Flax kernel [in, out].T
        for part, (key, shape) in zip(cfg.ffn_parts, ffn_keys(cfg, prefix, i).items()):
            w = np.asarray(flat[(f"layers_{i}", "ffn", part, "kernel")], np.float32).T
            if w.shape != shape:
                raise ValueError(f"layers_{i}/ffn/{part}/kernel has HF shape {w.shape}, "
                                 f"expected {shape}")
            out[key] = w
    return {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in out.items()}


def _invert(e: Entry, x: np.ndarray) -> np.ndarray:
    """The HF tensor that ``e.fn`` maps to ``x``: kernels are [in..., out...] -> [out, in]."""
    if e.path[-1] == "kernel":
        n_out = e.hf_shape[0]
        w = x.reshape(-1, n_out).T
    else:
        w = x.reshape(e.hf_shape)
    if w.shape != e.hf_shape or not np.array_equal(np.asarray(e.fn(w)), x):
        raise ValueError(f"{'/'.join(e.path)} of shape {x.shape} does not invert to "
                         f"{e.key} of shape {e.hf_shape}")
    return w


def _flatten(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if hasattr(v, "items"):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out
