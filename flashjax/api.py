"""``flashjax.load``: open a converted model directory."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from flashjax.runtime import Model, default_compute_dtype
from flashjax.store.convert import NP_DTYPES
from flashjax.store.load import load_tokenizer, read_dense_ffn, read_dram
from flashjax.store.manifest import Manifest


def load(path: str | Path, *, dtype=None, progress: bool = True) -> Model:
    """Load a converted model directory (see ``flashjax convert``).

    Returns a ``Model`` with every weight in DRAM, computing in ``dtype`` (default: float32
    on CPU, the storage dtype on accelerators). FFN bundles are crc32-checked as they load.
    """
    path = Path(path)
    manifest = Manifest.read(path)
    dtype = jnp.dtype(dtype) if dtype is not None else default_compute_dtype(
        NP_DTYPES[manifest.dtype])
    params = read_dram(path, manifest)
    for layer, ffn in enumerate(read_dense_ffn(path, manifest, progress=progress)):
        for name in ("fc1", "fc2"):
            params[f"layers_{layer}"]["ffn"][name].update(ffn[name])
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return Model(manifest.config, params, tokenizer=load_tokenizer(path, manifest), path=path,
                 dtype=dtype)
