"""``flashjax.load``: open a converted model directory, densely or flash-backed."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from flashjax.budget import (BudgetTooSmall, choose_resident_dtype, dense_bytes, minimum_budget,
                             parse_budget, read_gap)
from flashjax.runtime import Model, default_compute_dtype
from flashjax.store import bundles
from flashjax.store.convert import NP_DTYPES
from flashjax.model.bundle import rows_to_kernels
from flashjax.store.load import load_tokenizer, read_dense_ffn, read_dram
from flashjax.store.manifest import Manifest

log = logging.getLogger(__name__)
PREDICTORS = ("auto", "oracle", "lowrank", "hybrid", "naive", None)


COMPILATION_CACHE_ENV = "FLASHJAX_COMPILATION_CACHE"  # "0": off; a path: that directory


def enable_compilation_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in the flashjax cache directory (its
    ``xla/``), unless the environment says ``FLASHJAX_COMPILATION_CACHE=0`` or the caller has
    set a JAX cache directory already; every compiled function is kept, so a repeat run
    compiles nothing. Returns the directory in use, or None."""
    from flashjax.shipped import cache_root

    setting = os.environ.get(COMPILATION_CACHE_ENV, "")
    if setting == "0":
        return None
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    path = Path(setting) if setting else cache_root() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def load(path: str | Path, *, dram_budget=None, predictor="auto", window: int | None = None,
         dtype=None, progress: bool = True, **engine_options) -> Model:
    """Load a converted model directory (see ``flashjax convert``).

    Without ``dram_budget`` every weight is read into DRAM: the dense model. With
    ``dram_budget`` the FFN weights stay on flash and the model holds at most that many bytes:
    an int, "6GB", "512MiB", a fraction (0.5) or percentage ("50%") of the model's dense size
    in the compute dtype. ``predictor`` chooses the neurons each token's FFN is computed over:
    "lowrank" (the trained predictors: an approximation), "oracle" (exact, from the full
    up-projection held outside the budget: for testing and as an upper bound), "naive" or None
    (every row, every token, read from flash each time: the baseline), "hybrid" (every row;
    those that fit stay resident), or a ``flashjax.engine.Selector``; "auto" is "lowrank"
    when the model has predictors, else "oracle". The budget never changes what is computed:
    rows a token needs that do not fit are streamed through the staging buffer. ``window``
    (default 4) keeps neurons used by the last k tokens. Computation is in ``dtype`` (default
    float32 on CPU, the storage dtype on accelerators). Further keyword arguments set
    ``flashjax.engine.EngineOptions``; all of these need ``dram_budget``. Compiled code is
    kept in JAX's persistent compilation cache (``enable_compilation_cache``).
    """
    path = Path(path)
    manifest = Manifest.read(path)
    enable_compilation_cache()
    dtype = jnp.dtype(dtype) if dtype is not None else default_compute_dtype(
        NP_DTYPES[manifest.dtype])
    if dram_budget is None:
        flash_only = [name for name, given in (("predictor", predictor != "auto"),
                                               ("window", window is not None))
                      if given] + sorted(engine_options)
        if flash_only:
            raise ValueError(f"{', '.join(flash_only)}: only for a flash-backed model; pass "
                             f"dram_budget= too (1.0 for the whole model's size), or leave "
                             f"{'it' if len(flash_only) == 1 else 'them'} out for the dense "
                             f"model")
        return _load_dense(path, manifest, dtype, progress)
    if window is not None:
        engine_options["window"] = window
    return _load_flash(path, manifest, dtype, dram_budget, predictor, engine_options)


def _load_dense(path: Path, manifest: Manifest, dtype, progress: bool) -> Model:
    params = read_dram(path, manifest)
    for layer, ffn in enumerate(read_dense_ffn(path, manifest, progress=progress)):
        tree = params[f"layers_{layer}"].setdefault("ffn", {})
        for name, kernels in ffn.items():
            tree.setdefault(name, {}).update(kernels)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return Model(manifest.config, params, tokenizer=load_tokenizer(path, manifest), path=path,
                 dtype=dtype)


def _selector(path: Path, manifest: Manifest, dtype, predictor):
    """The selector for ``predictor`` (see ``load``)."""
    from flashjax.engine import selectors

    if not isinstance(predictor, str | None):
        return predictor  # a Selector made by the caller
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor {predictor!r} is not one of {PREDICTORS} or a Selector")
    cfg = manifest.config
    if predictor == "auto":
        predictor = "lowrank" if (path / "predictors").exists() else "oracle"
        if predictor == "oracle":
            log.warning("%s has no trained predictors: using the oracle, which keeps the whole "
                        "up-projection in DRAM outside the budget", path)
    if predictor in ("naive", None):
        return selectors.Naive(cfg.ffn_dim)
    if predictor == "hybrid":
        return selectors.Hybrid(cfg.ffn_dim)
    if predictor == "lowrank":
        from flashjax.predictor.model import Predictors

        try:
            return selectors.LowRank(Predictors.load(path, cfg.num_hidden_layers, dtype))
        except FileNotFoundError as e:
            raise ValueError(f"predictor 'lowrank': {e}; or use predictor='oracle'") from None
    from flashjax.predictor.model import saved_layer_weights

    checksums, scales = bundles.load_checksums(path), bundles.load_scales(path, manifest)
    weights = []
    for layer in range(cfg.num_hidden_layers):
        kernels = rows_to_kernels(cfg, bundles.read_layer_values(path, layer, manifest, checksums,
                                                                 scales))
        weights.append([jnp.asarray(kernels[p]["kernel"], dtype)
                        for p in selectors.activity_parts(cfg)])
        del kernels
    # sized as for the trained predictors, when known
    return selectors.Oracle(cfg, weights,
                            shares=saved_layer_weights(path, cfg.num_hidden_layers))


def _load_flash(path: Path, manifest: Manifest, dtype, dram_budget, predictor,
                engine_options) -> Model:
    from flashjax.engine import EngineOptions, FlashModel
    from flashjax.engine.options import option_names
    from flashjax.store.reader import READ_SPAN, FlashReader

    unknown = sorted(set(engine_options) - set(option_names()))
    if unknown:
        raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; expected one of "
                        f"{', '.join(option_names())}")
    cfg = manifest.config
    if cfg.activation == "silu" and cfg.activation_thresholds is None:
        log.warning("%s: a SwiGLU model without calibrated thresholds: every neuron fires every "
                    "token, so every FFN row is read for every token. `flashjax calibrate` "
                    "makes it sparse (an approximation), scripts/relufy.py a ReLU model", path)
    options = EngineOptions(**engine_options)
    if options.max_context is None:
        options = dataclasses.replace(options,
                                      max_context=min(cfg.max_sequence, 256))
    budget = parse_budget(dram_budget, dense_bytes(manifest, dtype))
    selector = _selector(path, manifest, dtype, predictor)
    try:
        resident_dtype, plan = choose_resident_dtype(manifest, dtype, budget, options, selector)
    except BudgetTooSmall as e:  # the plan's own figure assumes equal layers: find the real one
        raise e.with_minimum(minimum_budget(manifest, dtype, options, selector)) from None
    params = read_dram(path, manifest, convert=lambda x: jnp.asarray(x, resident_dtype))
    selector.prepare(params, resident_dtype)
    log.info("flash model %s: budget %d bytes, resident weights in %s, %d rows per layer",
             path, budget, resident_dtype, plan.capacity)
    reader = FlashReader(path, manifest, max_rows=plan.update_rows, direct_io=options.direct_io,
                         concurrency=options.reader_threads, verify=options.verify_reads,
                         bundled=options.bundled, unbundled_dir=options.unbundled_dir,
                         slots=plan.staging_slots,
                         block_slots=plan.block_slots or None,
                         io_uring=options.io_uring, gap=read_gap(options),
                         span=plan.block_bytes or READ_SPAN)
    return FlashModel(cfg, params, reader=reader, plan=plan, options=options, selector=selector,
                      row_scales=bundles.load_scales(path, manifest),
                      tokenizer=load_tokenizer(path, manifest), path=path, dtype=dtype)
