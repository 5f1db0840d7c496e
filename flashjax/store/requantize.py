"""``flashjax quantize``: a converted float store -> a new store with int8 or int4 FFN rows.

Everything but the FFN (DRAM checkpoint, tokenizer, predictors, calibration) is carried over
as it is (hard links where the file system allows, else copies); the FFN rows are read,
checked, quantized and written to a hidden sibling directory renamed into place when complete.
With ``method="mse"`` the scales are fitted to the FFN inputs that ``flashjax collect``
recorded (their mean square per feature and layer, see ``flashjax.store.quant``).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from flashjax.store import bundles
from flashjax.store.convert import FFNWriter, _publish, carry_over, new_partial, quant_layout
from flashjax.store.manifest import MANIFEST, Manifest

SKIP = {bundles.FFN_DIR, bundles.SPLIT_DIR, MANIFEST}
CHUNK_TOKENS = 16384


def feature_mean_squares(data_dir: str | Path, cfg, tokens: int | None = None,
                         progress: bool = False) -> np.ndarray:
    """Mean of ffn_in^2 per feature [layers, D] over the first ``tokens`` (default: all) that
    ``flashjax collect`` wrote to ``data_dir``."""
    from flashjax.predictor.collect import open_arrays, read_meta

    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if (meta.get("d_model"), meta.get("n_layers")) != (cfg.hidden_size, cfg.num_hidden_layers):
        raise ValueError(f"{data_dir}: activations of width {meta.get('d_model')} and "
                         f"{meta.get('n_layers')} layers; the model has {cfg.hidden_size} and "
                         f"{cfg.num_hidden_layers}")
    done = int(meta.get("tokens_written", 0))
    count = done if tokens is None else min(tokens, done)
    if count <= 0:
        raise ValueError(f"{data_dir}: no complete tokens recorded")
    out = np.zeros((cfg.num_hidden_layers, cfg.hidden_size), np.float64)
    for layer in tqdm(range(cfg.num_hidden_layers), desc="input statistics", unit="layer",
                      disable=not progress):
        ffn_in, _ = open_arrays(data_dir, layer)
        for start in range(0, count, CHUNK_TOKENS):
            x = ffn_in[start:min(count, start + CHUNK_TOKENS)].read().result()
            out[layer] += np.square(x.astype(np.float32)).sum(0)
    return (out / count).astype(np.float32)


def quantize_store(model_dir: str | Path, out_dir: str | Path, ffn_dtype: str, *,
                   method: str = "rtn", data: str | Path | None = None, tokens: int | None = None,
                   group: int | None = None, scales: str | None = None,
                   progress: bool = True) -> Manifest:
    """Write ``out_dir``: ``model_dir`` (a float store) with its FFN rows at ``ffn_dtype``
    ("int8", "int4"). ``method`` "rtn" (round to nearest) or "mse" (scales fitted to the
    activations in ``data``, the first ``tokens`` of them); ``group`` and ``scales`` as for
    ``flashjax.convert``."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists; choose a new path "
                              f"or remove it first")
    manifest = Manifest.read(model_dir)
    if manifest.quant is not None:
        raise ValueError(f"{model_dir}: its FFN rows are already {manifest.ffn_dtype}; quantize "
                         f"a float store (the one it was made from)")
    cfg = manifest.config
    feature_sq = None
    if data is not None:
        feature_sq = feature_mean_squares(data, cfg, tokens, progress)
    q = quant_layout(cfg, ffn_dtype, group=group, scales=scales, method=method,
                     feature_sq=feature_sq)
    if q is None:
        raise ValueError(f"ffn_dtype {ffn_dtype!r}: quantize to 'int8' or 'int4'")
    checksums = bundles.load_checksums(model_dir)

    tmp = new_partial(out_dir)
    try:
        carry_over(model_dir, tmp, SKIP)
        ffn = FFNWriter(tmp, cfg, q, feature_sq)
        for layer in tqdm(range(cfg.num_hidden_layers), desc=f"quantize {q.name}",
                          unit="layer", disable=not progress):
            ffn.layer(layer, bundles.read_layer(model_dir, layer, checksums).astype(np.float32))
        source = {**manifest.source, "quantized_from": str(model_dir.absolute())}
        out = dataclasses.replace(manifest, source=source, row_checksum="crc32c",
                                  **ffn.finish())
        out.write(tmp)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
