"""Read a converted model directory back: DRAM parameters, FFN bundles, tokenizer."""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from flashjax.model.bundle import rows_to_kernels
from flashjax.store import bundles
from flashjax.store.manifest import DRAM_DIR, MANIFEST, Manifest, dram_groups, tensor_checksum

log = logging.getLogger(__name__)
_warned_unchecked: set[str] = set()  # model dirs warned about once: no DRAM checksums


def read_dram(model_dir: str | Path, manifest: Manifest, convert=None) -> dict:
    """The DRAM-resident parameter tree, without the FFN weights: numpy in the storage dtype,
    or whatever ``convert`` makes of each array (applied group by group, so that only one
    group's storage copy exists at a time). Each group is checked against the manifest's
    crc32s as soon as it is restored (``StoreError`` naming the group and tensor)."""
    params: dict = {}
    checkpointer = ocp.StandardCheckpointer()
    for group in dram_groups(manifest.config):
        tree = read_dram_group(model_dir, group, checkpointer, manifest=manifest)
        params.update(tree if convert is None else jax.tree.map(convert, tree))
    return params


def warn_unchecked(model_dir: str | Path) -> None:
    """Warn, once per model directory, that its manifest records no DRAM checksums."""
    key = str(Path(model_dir).absolute())
    if key not in _warned_unchecked:
        _warned_unchecked.add(key)
        log.warning("%s: format version 1 records no checksums of the DRAM part (embeddings, "
                    "attention, norms), so it cannot be checked for corruption; reconvert the "
                    "model with this flashjax to add them", Path(model_dir) / MANIFEST)


def _flatten(tree, prefix: tuple[str, ...] = ()) -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (str(k),)))
        else:
            out["/".join(prefix + (str(k),))] = v
    return out


def check_dram_group(model_dir: str | Path, manifest: Manifest, group: str, tree: dict
                     ) -> list[str]:
    """What is wrong with a restored DRAM group: tensors missing or unexpected, of another
    dtype than the manifest's, or whose crc32 differs from the manifest's (nothing to compare
    for a version-1 manifest but the dtype)."""
    where = (Path(model_dir) / DRAM_DIR / group).absolute()
    expected = None if manifest.dram_checksums is None else manifest.dram_checksums[group]
    flat = _flatten(tree) if isinstance(tree, dict) else {}
    problems = []
    if expected is not None:
        missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
        if missing:
            problems.append(f"{where}: tensor(s) {missing[:5]} missing; "
                            f"{Path(model_dir) / MANIFEST} lists them")
        if extra:
            problems.append(f"{where}: tensor(s) {extra[:5]} not in "
                            f"{Path(model_dir) / MANIFEST}")
    to_check = {}
    for name, x in flat.items():
        x = np.asarray(x)
        if x.dtype.name != manifest.dtype:
            problems.append(f"{where}: tensor {name!r} is stored as {x.dtype.name}, expected "
                            f"{manifest.dtype} (the manifest's 'dtype')")
        elif expected is not None and name in expected:
            to_check[name] = x
    for name, found in zip(to_check, _checksums(list(to_check.values()))):
        if found != expected[name]:
            problems.append(f"{where}: tensor {name!r} has crc32 {found}, expected "
                            f"{expected[name]} (recorded in {Path(model_dir) / MANIFEST})")
    return problems


PARALLEL_CRC_BYTES = 32 << 20  # a group at least this large is checksummed in threads


def _checksums(arrays: list[np.ndarray]) -> list[int]:
    """``tensor_checksum`` of each array; in threads for large groups (zlib releases the GIL)."""
    workers = min(8, os.cpu_count() or 1)
    if workers == 1 or len(arrays) < 2 or sum(x.nbytes for x in arrays) < PARALLEL_CRC_BYTES:
        return [tensor_checksum(x) for x in arrays]
    with ThreadPoolExecutor(workers, thread_name_prefix="dram-crc32") as pool:
        return list(pool.map(tensor_checksum, arrays))


def read_dram_group(model_dir: str | Path, group: str, checkpointer=None, *,
                    manifest: Manifest | None = None, check: bool = True) -> dict:
    """One DRAM checkpoint group ("top" or "layer_NNN", see ``manifest.dram_groups``), numpy
    in the storage dtype. With ``check`` its tensors are checked against the crc32s of
    ``manifest`` (read from ``model_dir`` when not given): ``StoreError`` naming the group and
    each bad tensor."""
    path = (Path(model_dir) / DRAM_DIR / group).absolute()
    try:
        tree = (checkpointer or ocp.StandardCheckpointer()).restore(path)
    except Exception as e:
        _quiet_closed_loop_callbacks()
        raise bundles.StoreError(f"{path}: cannot restore the DRAM checkpoint ({e}); run "
                                 f"`flashjax verify {model_dir}`") from None
    if check:
        manifest = manifest or Manifest.read(model_dir, check_files=False)
        if manifest.dram_checksums is None:
            warn_unchecked(model_dir)
        problems = check_dram_group(model_dir, manifest, group, tree)
        if problems:
            raise bundles.StoreError("; ".join(problems) + "; the DRAM checkpoint is corrupt, "
                                     "reconvert the model")
    return tree


def _quiet_closed_loop_callbacks() -> None:
    """After a failed orbax restore, TensorStore's reads still in flight complete into the
    event loop orbax has closed, and each prints a 'RuntimeError: Event loop is closed'
    traceback (through ``sys.unraisablehook``), burying the error that matters. Drop those
    (only those) from now on."""
    previous = sys.unraisablehook
    if getattr(previous, "_flashjax_quiet", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook._flashjax_quiet = True
    sys.unraisablehook = hook


def split_bundles(rows: np.ndarray, d_model: int) -> tuple[np.ndarray, np.ndarray]:
    """OPT bundle rows [n, 2D] -> (fc1 kernel [D, n], fc2 kernel [n, D])."""
    if rows.shape[1] != 2 * d_model:
        raise ValueError(f"rows of width {rows.shape[1]} are not OPT bundles of 2 x {d_model}")
    return rows[:, :d_model].T, rows[:, d_model:]


def read_dense_ffn(model_dir: str | Path, manifest: Manifest, progress: bool = True,
                   dtype=None) -> list[dict]:
    """Every layer's FFN kernels ({part: {"kernel"}}) rebuilt from its bundles, crc32-checked
    (a quantized store's dequantized, in float32 unless ``dtype``)."""
    cfg = manifest.config
    checksums = bundles.load_checksums(model_dir, (cfg.num_hidden_layers, cfg.ffn_dim))
    scales = bundles.load_scales(model_dir, manifest)
    out = []
    for layer in tqdm(range(cfg.num_hidden_layers), desc="read FFN", unit="layer",
                      disable=not progress):
        rows = bundles.read_layer_values(model_dir, layer, manifest, checksums, scales)
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
