"""Read a converted model directory back: DRAM parameters, FFN bundles, tokenizer."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from flashjax.model.bundle import rows_to_kernels
from flashjax.store import bundles
from flashjax.store.manifest import DRAM_DIR, Manifest


def read_dram(model_dir: str | Path, manifest: Manifest, convert=None) -> dict:
    """The DRAM-resident parameter tree, without the FFN weights: numpy in the storage dtype,
    or whatever ``convert`` makes of each array (applied group by group, so that only one
    group's storage copy exists at a time)."""
    from flashjax.store.convert import dram_groups

    params: dict = {}
    checkpointer = ocp.StandardCheckpointer()
    for group in dram_groups(manifest.config):
        tree = read_dram_group(model_dir, group, checkpointer)
        params.update(tree if convert is None else jax.tree.map(convert, tree))
    return params


def read_dram_group(model_dir: str | Path, group: str, checkpointer=None) -> dict:
    """One DRAM checkpoint group ("top" or "layer_NNN", see ``convert.dram_groups``)."""
    path = (Path(model_dir) / DRAM_DIR / group).absolute()
    try:
        return (checkpointer or ocp.StandardCheckpointer()).restore(path)
    except Exception as e:
        raise bundles.StoreError(f"{path}: cannot restore the DRAM checkpoint ({e})") from None


def split_bundles(rows: np.ndarray, d_model: int) -> tuple[np.ndarray, np.ndarray]:
    """OPT bundle rows [n, 2D] -> (fc1 kernel [D, n], fc2 kernel [n, D])."""
    if rows.shape[1] != 2 * d_model:
        raise ValueError(f"rows of width {rows.shape[1]} are not OPT bundles of 2 x {d_model}")
    return rows[:, :d_model].T, rows[:, d_model:]


def read_dense_ffn(model_dir: str | Path, manifest: Manifest, progress: bool = True,
                   dtype=None) -> list[dict]:
    """Every layer's FFN kernels ({part: {"kernel"}}) rebuilt from its bundles, crc32-checked."""
    checksums = bundles.load_checksums(model_dir)
    cfg = manifest.config
    if checksums.shape != (cfg.num_hidden_layers, cfg.ffn_dim):
        raise bundles.StoreError(f"{Path(model_dir) / bundles.FFN_DIR / bundles.CHECKSUM_FILE}: "
                                 f"shape {checksums.shape}, expected "
                                 f"{(cfg.num_hidden_layers, cfg.ffn_dim)}")
    out = []
    for layer in tqdm(range(cfg.num_hidden_layers), desc="read FFN", unit="layer",
                      disable=not progress):
        rows = bundles.read_layer(model_dir, layer, checksums)
        if dtype is not None:
            rows = rows.astype(dtype)
        out.append(rows_to_kernels(cfg, rows))
    return out


def load_tokenizer(model_dir: str | Path, manifest: Manifest):
    """A ``tokenizers.Tokenizer`` for the model, or None when the directory has none."""
    if manifest.tokenizer is None:
        return None
    from tokenizers import Tokenizer
    from tokenizers.implementations import ByteLevelBPETokenizer

    model_dir = Path(model_dir)
    if manifest.tokenizer == "tokenizer.json":
        return Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return ByteLevelBPETokenizer(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"))
