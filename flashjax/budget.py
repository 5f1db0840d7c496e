"""DRAM budgets: parsing, what a flash-backed model holds in DRAM, and how a budget is split."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from flashjax.cache import slack_rows
from flashjax.store.convert import NP_DTYPES
from flashjax.store.manifest import DTYPE_BYTES, Manifest
from flashjax.store.reader import ALIGN, READ_GAP, READ_SPAN, block_span

MIN_CAPACITY = 32  # fewer resident rows per layer than this is not a useful configuration
RESIDENT_MARGIN = 1.1  # compute-dtype resident weights need room for this x predicted rows

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


MIN_BYTES = 1024  # a unitless byte count below this is a typo for a fraction


def read_gap(options) -> int:
    """The gap bytes the reader may read between needed rows under ``options``."""
    return READ_GAP if options.read_gap is None else options.read_gap


def parse_budget(budget, model_bytes: int) -> int:
    """Bytes from ``budget``: an int byte count, "6GB"/"512MiB", a fraction of ``model_bytes``
    (0.5) or a percentage ("50%")."""
    if isinstance(budget, bool):
        raise ValueError(f"dram_budget {budget!r} is not a size")
    if isinstance(budget, int):
        if budget < MIN_BYTES:
            raise ValueError(f"dram_budget {budget!r}: a byte count must be >= {MIN_BYTES} "
                             f"(or give a unit: '6GB'; a fraction: 0.5; a percentage: '50%')")
        value = budget
    elif isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"dram_budget {budget!r}: a fraction must be in (0, 1] (bytes "
                             f"need a unit or an integer >= {MIN_BYTES})")
        value = int(budget * model_bytes)
    elif isinstance(budget, str):
        text = budget.strip().upper().replace(" ", "")
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ValueError(f"dram_budget {budget!r}: a percentage must be in (0, 100]")
            value = int(pct / 100 * model_bytes)
        else:
            m = re.fullmatch(r"([0-9]*\.?[0-9]+)([A-Z]*)", text)
            if not m or m.group(2) not in _UNITS:
                raise ValueError(f"dram_budget {budget!r}: expected bytes, '6GB', '512MiB', a "
                                 f"fraction like 0.5 or a percentage like '50%'")
            number = float(m.group(1))
            if m.group(2) == "" and "." in m.group(1):  # "0.5" on the command line
                return parse_budget(number, model_bytes)
            if m.group(2) == "":
                return parse_budget(int(m.group(1)), model_bytes)
            value = int(number * _UNITS[m.group(2)])
    else:
        raise ValueError(f"dram_budget {budget!r} is not a size")
    if value <= 0:
        raise ValueError(f"dram_budget {budget!r} is not positive")
    return value


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes held in DRAM by a flash-backed model, by part."""

    budget: int
    resident: int  # embeddings, attention, norms, biases, in the compute dtype
    kv_cache: int  # for max_batch x max_context
    predictors: int
    staging: int  # host buffer the reader fills
    workspace: int  # transient copies made while moving and appending rows
    index: int  # per-layer slot <-> neuron maps and last-use steps
    buffers: int  # per-layer neuron buffers at full capacity
    capacities: tuple[int, ...]  # rows of each layer's buffer
    update_rows: int  # most rows read or written in one update (in a layer: at most its capacity)
    slack_rows: int = 0  # rows past each buffer's capacity that padded writes may touch
    staging_slots: int = 1  # staging buffers the reader alternates between (in ``staging``)
    block_slots: int = 0  # io_uring scratch slots for rows that are not whole blocks or are
    #                       read with gaps (in ``workspace``): such reads in flight at once
    block_bytes: int = 0  # bytes of one such slot: the longest such read

    @property
    def capacity(self) -> int:
        """The largest layer buffer's rows."""
        return max(self.capacities)

    @property
    def total(self) -> int:
        return (self.resident + self.kv_cache + self.predictors + self.staging + self.workspace
                + self.index + self.buffers)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "capacities": list(self.capacities),
                "total": self.total}


def split_rows(total: int, weights, n_neurons: int, granule: int = 16) -> list[int]:
    """Share ``total`` buffer rows among layers in proportion to ``weights`` (the share of
    neurons each layer is expected to need), none above ``n_neurons``: what a capped layer
    cannot use goes to the others. Rounded down to multiples of ``granule`` below the cap."""
    weights = [max(float(w), 1e-9) for w in weights]
    rows = [0.0] * len(weights)
    free = list(range(len(weights)))
    left = float(total)
    while free and left > 0:
        scale = left / sum(weights[i] for i in free)
        capped = [i for i in free if weights[i] * scale >= n_neurons]
        if not capped:
            for i in free:
                rows[i] = weights[i] * scale
            break
        for i in capped:
            rows[i] = n_neurons
            left -= n_neurons
            free.remove(i)
    return [n_neurons if r >= n_neurons else int(r) // granule * granule for r in rows]


def dense_bytes(manifest: Manifest, dtype) -> int:
    """The model's size when held whole in DRAM in ``dtype``: what fractions refer to (for a
    quantized store, that of the same model with float FFN rows, so that a fraction is the
    same number of bytes for a model's float16, int8 and int4 stores)."""
    cfg = manifest.config
    values = (manifest.dram_bytes // DTYPE_BYTES[manifest.dtype]
              + cfg.num_hidden_layers * cfg.ffn_dim * cfg.bundle_width)
    return values * jnp.dtype(dtype).itemsize


class BudgetTooSmall(ValueError):
    """A DRAM budget too small for the model: says the minimum and what it holds."""

    def __init__(self, budget: int, minimum: int, parts: str):
        self.budget, self.minimum, self.parts = budget, minimum, parts
        super().__init__(f"dram_budget of {budget:,} bytes is below the minimum {minimum:,} "
                         f"bytes for {parts}")

    def with_minimum(self, minimum: int) -> BudgetTooSmall:
        return BudgetTooSmall(self.budget, minimum, self.parts)


def plan_memory(manifest: Manifest, dtype, budget: int, resident_bytes: int, options,
                predictor_bytes: int = 0, weights=None) -> MemoryPlan:
    """Split ``budget``: fixed parts first, then the neuron buffers, shared among layers in
    proportion to ``weights`` (each layer's expected share of needed neurons; default equal)."""
    cfg = manifest.config
    item = jnp.dtype(dtype).itemsize
    layers, n = cfg.num_hidden_layers, cfg.ffn_dim
    # values per buffer row: one slice of every FFN part, and the neuron's bias if it has one
    row_values = cfg.bundle_width + int(cfg.ffn_bias)
    kv_width = cfg.num_key_value_heads * cfg.head_dim
    kv = (2 * layers * options.max_batch * options.max_context * kv_width * item
          + options.max_batch * options.max_context)
    predictors = predictor_bytes
    index_fixed = layers * n * 4  # neuron -> slot maps
    # transient, per row of an update: TensorStore's read buffer and the device copy of the
    # staged rows (storage dtype; on CPU jax usually shares the staging memory instead), their
    # parts converted to the compute dtype, and the gathered rows of a move
    update_row = 2 * manifest.row_bytes + 2 * row_values * item
    slots = 2 if options.overlap else 1  # staging buffers: one is read while one is used
    rows = options.update_rows
    if rows is None:  # the largest power of two up to 1024 whose staging uses <= 1/16 budget
        rows = 1024
        while (rows > MIN_CAPACITY
               and rows * (update_row + slots * manifest.row_bytes) > budget // 16):
            rows //= 2
    rows = min(n, rows)
    staging = slots * rows * manifest.row_bytes
    # plus the io_uring reader's scratch where rows are not whole blocks or gaps are read: one
    # slot per read in flight, as many as reader_threads within 1/32 of the budget (slots of
    # READ_SPAN, narrower where a small budget would otherwise hold fewer than reads in flight)
    share = budget // 32 // options.reader_threads // ALIGN * ALIGN
    span = block_span(manifest.row_bytes, options.bundled, len(cfg.ffn_parts),
                      read_gap(options), max(ALIGN, min(READ_SPAN, share)))
    block_slots = min(options.reader_threads, max(1, budget // 32 // span)) if span else 0
    workspace = rows * update_row + block_slots * span
    # per row of capacity, in every layer: the parts' rows and bias, slot id and last use
    layer_row = row_values * item + 4 + 8
    per_row = layers * layer_row
    slack = slack_rows(rows)  # each buffer's extra rows for padded contiguous writes
    slack_bytes = layers * slack * row_values * item
    # a quantized store's row scales stay resident (float16) when they are not in the rows
    resident_bytes += manifest.scale_bytes
    fixed = resident_bytes + kv + predictors + index_fixed + staging + workspace + slack_bytes
    capacities = split_rows(max(0, budget - fixed) // layer_row, weights or [1.0] * layers, n)
    need = min(n, MIN_CAPACITY)
    if min(capacities) < need:
        raise BudgetTooSmall(
            budget, fixed + need * per_row,
            f"{cfg.num_hidden_layers} layers x at least {need} neurons: resident weights "
            f"{resident_bytes:,} + KV cache {kv:,} (max_batch {options.max_batch} x "
            f"max_context {options.max_context}) + predictors {predictors:,} + index "
            f"{index_fixed:,} + staging and workspace {staging + workspace:,} + neuron buffers "
            f"(here {slack_bytes + need * per_row:,} at the least, shared among the layers by "
            f"their predicted activity)")
    return MemoryPlan(budget=budget, resident=resident_bytes, kv_cache=kv, predictors=predictors,
                      staging=staging, workspace=workspace,
                      index=index_fixed + sum(capacities) * 12,
                      buffers=sum(capacities) * row_values * item + slack_bytes,
                      capacities=tuple(capacities), update_rows=int(min(rows, max(capacities))),
                      slack_rows=slack, staging_slots=slots,
                      block_slots=block_slots, block_bytes=span)


def choose_resident_dtype(manifest: Manifest, dtype, budget: int, options, selector):
    """Hold resident weights (and the selector's weights) in the compute dtype when the budget then still
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
    weights = selector.shares()
    wanted = [min(n, int(RESIDENT_MARGIN * w * n)) for w in weights] if weights else None
    for i, candidate in enumerate(candidates):
        last = i == len(candidates) - 1
        resident = manifest.dram_bytes // storage.itemsize * candidate.itemsize
        try:
            plan = plan_memory(manifest, dtype, budget, resident, options,
                               predictor_bytes=selector.dram_bytes(candidate), weights=weights)
        except ValueError:
            if last:
                raise
            continue
        if last or wanted is None or all(c >= w for c, w in zip(plan.capacities, wanted)):
            return candidate, plan
    raise AssertionError("unreachable")


def minimum_budget(manifest: Manifest, dtype, options, selector) -> int:
    """The smallest DRAM budget (bytes) that ``flashjax.load`` accepts for this model, compute
    dtype, engine options and selector: found by bisection over the (monotone) plan."""
    def fits(budget: int) -> bool:
        try:
            choose_resident_dtype(manifest, dtype, budget, options, selector)
        except ValueError:
            return False
        return True

    lo, hi = 0, dense_bytes(manifest, dtype) * 2  # lo never fits, hi does
    while not fits(hi):
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi
