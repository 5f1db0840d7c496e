"""``flashjax verify``: check that a model directory is complete and its bundles intact."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from flashjax.store import bundles
from flashjax.store.load import read_dram
from flashjax.store.manifest import Manifest


def verify(model_dir: str | Path) -> str:
    """Read every file of the model; raise ``StoreError`` naming the first problem found."""
    model_dir = Path(model_dir)
    manifest = Manifest.read(model_dir)
    cfg = manifest.config
    read_dram(model_dir, manifest)
    checksums = bundles.load_checksums(model_dir)
    for layer in tqdm(range(cfg.num_hidden_layers), desc="verify FFN", unit="layer"):
        store = bundles.open_layer(model_dir, layer)
        if tuple(store.shape) != (cfg.ffn_dim, cfg.bundle_width):
            raise bundles.StoreError(f"{model_dir}/{bundles.FFN_DIR}/{bundles.layer_key(layer)}: "
                                     f"shape {tuple(store.shape)}, expected "
                                     f"{(cfg.ffn_dim, cfg.bundle_width)}")
        bundles.read_layer(model_dir, layer, checksums)
    return (f"{model_dir}: OK ({cfg.num_hidden_layers} layers x {cfg.ffn_dim} bundles, "
            f"{manifest.total_bytes / 1e6:.1f} MB, {manifest.dtype})")
