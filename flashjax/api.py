"""``flashjax.load``: open a converted model directory, densely or flash-backed."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from flashjax.budget import MemoryPlan, parse_budget, split_rows
from flashjax.cache import slack_rows
from flashjax.runtime import Model, default_compute_dtype
from flashjax.store import bundles
from flashjax.store.convert import NP_DTYPES
from flashjax.store.load import load_tokenizer, read_dense_ffn, read_dram, split_bundles
from flashjax.store.manifest import DTYPE_BYTES, Manifest
from flashjax.store.reader import block_span

log = logging.getLogger(__name__)
MIN_CAPACITY = 32  # fewer resident rows per layer than this is not a useful configuration
RESIDENT_MARGIN = 1.1  # compute-dtype resident weights need room for this x predicted rows


def load(path: str | Path, *, dram_budget=None, predictor="auto", window: int = 4,
         dtype=None, progress: bool = True, **engine_options) -> Model:
    """Load a converted model directory (see ``flashjax convert``).

    Without ``dram_budget`` (and with the default ``predictor``) every weight is read into
    DRAM: the dense model. With ``dram_budget`` the FFN weights stay on flash and the model
    holds at most that many bytes: an int, "6GB", "512MiB", a fraction (0.5) or percentage
    ("50%") of the model's dense size in the compute dtype. ``predictor`` chooses the
    neurons each token reads: "oracle" (exact, from the full up-projection held outside the
    budget: for testing and as an upper bound), "lowrank" (trained predictors), "trace" (the
    needed sets of an activity trace, ``trace=FILE``, with an untrained predictor of the same
    shape run for its cost: benchmarks on synthetic stores), None (every row, every token: the
    naive baseline); "auto" is "lowrank" when the model has predictors,
    else "oracle". ``window`` keeps neurons used by the last k tokens. Computation is in
    ``dtype`` (default float32 on CPU, the storage dtype on accelerators). Further keyword
    arguments set ``flashjax.engine.EngineOptions``.
    """
    path = Path(path)
    manifest = Manifest.read(path)
    dtype = jnp.dtype(dtype) if dtype is not None else default_compute_dtype(
        NP_DTYPES[manifest.dtype])
    flash = dram_budget is not None or predictor != "auto" or engine_options
    if not flash:
        return _load_dense(path, manifest, dtype, progress)
    if predictor == "auto":
        predictor = "lowrank" if (path / "predictors").exists() else "oracle"
        if predictor == "oracle":
            log.warning("%s has no trained predictors: using the oracle, which keeps the whole "
                        "up-projection in DRAM outside the budget", path)
    return _load_flash(path, manifest, dtype, dram_budget, predictor, window, engine_options)


def _load_dense(path: Path, manifest: Manifest, dtype, progress: bool) -> Model:
    params = read_dram(path, manifest)
    for layer, ffn in enumerate(read_dense_ffn(path, manifest, progress=progress)):
        for name in ("fc1", "fc2"):
            params[f"layers_{layer}"]["ffn"][name].update(ffn[name])
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return Model(manifest.config, params, tokenizer=load_tokenizer(path, manifest), path=path,
                 dtype=dtype)


def dense_bytes(manifest: Manifest, dtype) -> int:
    """The model's size when held whole in DRAM in ``dtype``: what fractions refer to."""
    return manifest.total_bytes * jnp.dtype(dtype).itemsize // DTYPE_BYTES[manifest.dtype]


def plan_memory(manifest: Manifest, dtype, budget: int, resident_bytes: int, options,
                predictor_bytes: int = 0, weights=None) -> MemoryPlan:
    """Split ``budget``: fixed parts first, then the neuron buffers, shared among layers in
    proportion to ``weights`` (each layer's expected share of needed neurons; default equal)."""
    cfg = manifest.config
    item = jnp.dtype(dtype).itemsize
    layers, n, d = cfg.num_hidden_layers, cfg.ffn_dim, cfg.hidden_size
    kv = (2 * layers * options.max_batch * options.max_context * d * item
          + options.max_batch * options.max_context)
    predictors = predictor_bytes
    index_fixed = layers * n * 4  # neuron -> slot maps
    # transient, per row of an update: TensorStore's read buffer and the device copy of the
    # staged rows (storage dtype; on CPU jax usually shares the staging memory instead), their
    # up/down halves converted to the compute dtype, and the gathered rows of a move
    update_row = 2 * manifest.row_bytes + 2 * (2 * d + 1) * item
    slots = 2 if options.overlap else 1  # staging buffers: one is read while one is used
    rows = options.update_rows
    if rows is None:  # the largest power of two up to 1024 whose staging uses <= 1/16 budget
        rows = 1024
        while (rows > MIN_CAPACITY
               and rows * (update_row + slots * manifest.row_bytes) > budget // 16):
            rows //= 2
    rows = min(n, rows)
    staging = slots * rows * manifest.row_bytes
    # plus the io_uring reader's scratch where rows are not whole blocks: one span of blocks per
    # read in flight, as many as reader_threads within 1/32 of the budget
    span = block_span(manifest.row_bytes, options.bundled)
    block_slots = min(options.reader_threads, max(1, budget // 32 // span)) if span else 0
    workspace = rows * update_row + block_slots * span
    # per row of capacity, in every layer: up + down rows and bias, slot id and last use
    layer_row = (2 * d + 1) * item + 4 + 8
    per_row = layers * layer_row
    slack = slack_rows(rows)  # each buffer's extra rows for padded contiguous writes
    slack_bytes = layers * slack * (2 * d + 1) * item
    fixed = resident_bytes + kv + predictors + index_fixed + staging + workspace + slack_bytes
    capacities = split_rows(max(0, budget - fixed) // layer_row, weights or [1.0] * layers, n)
    need = min(n, MIN_CAPACITY)
    if min(capacities) < need:
        minimum = fixed + need * per_row
        raise ValueError(
            f"dram_budget of {budget:,} bytes is below the minimum {minimum:,} bytes for "
            f"{cfg.num_hidden_layers} layers x {need} neurons: resident weights {resident_bytes:,}"
            f" + KV cache {kv:,} (max_batch {options.max_batch} x max_context "
            f"{options.max_context}) + predictors {predictors:,} + index {index_fixed:,} + "
            f"staging and workspace "
            f"{staging + workspace:,} + neuron buffers {need * per_row + slack_bytes:,}")
    return MemoryPlan(budget=budget, resident=resident_bytes, kv_cache=kv, predictors=predictors,
                      staging=staging, workspace=workspace,
                      index=index_fixed + sum(capacities) * 12,
                      buffers=sum(capacities) * (2 * d + 1) * item + slack_bytes,
                      capacities=tuple(capacities), update_rows=int(min(rows, max(capacities))),
                      slack_rows=slack, staging_slots=slots,
                      block_slots=block_slots)


def _choose_resident_dtype(manifest: Manifest, dtype, budget: int, options, predictors,
                           weights=None):
    """Hold resident weights (and predictors) in the compute dtype when the budget then still
    gives every layer room for 1.1x its predicted-active rows (one token's set with a
    margin); otherwise in the narrower storage dtype, widened inside each jitted step, which
    leaves more room for neurons. The compute dtype wins whenever it fits: on CPU a matmul
    over weights widened inside jit runs ~9x slower (notes in docs/BENCHMARKS.md), which at
    OPT-6.7B shape costs seconds per token, far more than a longer window saves in reads."""
    storage = jnp.dtype(NP_DTYPES[manifest.dtype])
    if options.resident_dtype is not None:
        candidates = [jnp.dtype(options.resident_dtype)]
    elif storage.itemsize < dtype.itemsize:
        candidates = [dtype, storage]
    else:
        candidates = [dtype]
    n = manifest.config.ffn_dim
    elements = sum(x.size for x in jax.tree.leaves(predictors.params)) if predictors else 0
    if predictors is not None:
        weights = predictors.layer_weights()
    wanted = [min(n, int(RESIDENT_MARGIN * w * n)) for w in weights] if weights else None
    for i, candidate in enumerate(candidates):
        last = i == len(candidates) - 1
        resident = manifest.dram_bytes // storage.itemsize * candidate.itemsize
        try:
            plan = plan_memory(manifest, dtype, budget, resident, options,
                               predictor_bytes=elements * candidate.itemsize, weights=weights)
        except ValueError:
            if last:
                raise
            continue
        if last or wanted is None or all(c >= w for c, w in zip(plan.capacities, wanted)):
            return candidate, plan
    raise AssertionError("unreachable")


def _load_flash(path: Path, manifest: Manifest, dtype, dram_budget, predictor, window,
                engine_options) -> Model:
    from flashjax.engine import PREDICTORS, EngineOptions, FlashModel
    from flashjax.store.reader import FlashReader

    if predictor not in PREDICTORS:
        raise ValueError(f"predictor {predictor!r} is not one of {PREDICTORS}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    cfg = manifest.config
    options = EngineOptions(predictor=predictor, window=window, **engine_options)
    if options.max_context is None:
        options = dataclasses.replace(options,
                                      max_context=min(cfg.max_position_embeddings, 256))
    budget = parse_budget(dram_budget if dram_budget is not None else 1.0,
                          dense_bytes(manifest, dtype))
    predictors = trace = None
    if predictor == "trace":
        from flashjax.bench.activity import ActivityTrace
        from flashjax.predictor.model import Predictors

        if options.trace is None:
            raise ValueError("predictor 'trace' needs trace=<activity trace file>")
        trace = ActivityTrace.load(options.trace)
        trace.meta["path"] = options.trace
        trace.check_shape(cfg.num_hidden_layers, cfg.ffn_dim, str(path))
        predictors = Predictors.random(cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers,
                                       dtype=dtype)
        predictors.metrics = {"layers": [{"predicted_active_fraction": f}
                                         for f in trace.layer_fractions()]}
    elif predictor == "lowrank":
        from flashjax.predictor.model import Predictors

        try:
            predictors = Predictors.load(path, cfg.num_hidden_layers, dtype)
        except FileNotFoundError as e:
            raise ValueError(f"predictor 'lowrank': {e}; or use predictor='oracle'") from None
    weights = None
    if predictor == "oracle":  # size the buffers as for the trained predictors, when known
        from flashjax.predictor.model import saved_layer_weights

        weights = saved_layer_weights(path, cfg.num_hidden_layers)
    resident_dtype, plan = _choose_resident_dtype(manifest, dtype, budget, options, predictors,
                                                  weights)
    params = read_dram(path, manifest, convert=lambda x: jnp.asarray(x, resident_dtype))
    if predictors is not None:
        predictors.params = jax.tree.map(lambda x: x.astype(resident_dtype), predictors.params)
    log.info("flash model %s: budget %d bytes, resident weights in %s, %d rows per layer",
             path, budget, resident_dtype, plan.capacity)
    oracle = None
    if predictor == "oracle":
        checksums = bundles.load_checksums(path)
        oracle = []
        for layer in range(cfg.num_hidden_layers):
            up, _ = split_bundles(bundles.read_layer(path, layer, checksums), cfg.hidden_size)
            bias = params[f"layers_{layer}"]["ffn"]["fc1"]["bias"]
            oracle.append((jnp.asarray(up, dtype), jnp.asarray(bias, dtype)))
    reader = FlashReader(path, manifest, max_rows=plan.update_rows, direct_io=options.direct_io,
                         concurrency=options.reader_threads, verify=options.verify_reads,
                         bundled=options.bundled, slots=plan.staging_slots,
                         block_slots=plan.block_slots or None,
                         io_uring=options.io_uring)
    return FlashModel(cfg, params, reader=reader, plan=plan, options=options, oracle=oracle,
                      predictors=predictors, trace=trace,
                      tokenizer=load_tokenizer(path, manifest), path=path, dtype=dtype)
