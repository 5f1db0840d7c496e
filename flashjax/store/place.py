"""``flashjax place``: reorder each layer's neurons on flash so that neurons that fire together
sit next to each other, and a token's rows form fewer, longer runs (fewer, larger reads).

An FFN is invariant under a permutation of its neurons when everything indexed by neuron moves
together: the bundle rows (up rows and down columns), the up-projection bias (OPT's fc1 bias,
in DRAM), the row checksums and resident scales, and the predictors' output dimension. So a
placed store computes exactly what the store it came from computes; only the rows' positions
in the shard files change. ``ffn/order.npy`` ([layers, neurons] int32, crc32 in the manifest
under ``layout.ffn.order``) records which original neuron each row holds (row ``i`` of layer
``l`` is neuron ``order[l, i]`` of the checkpoint); ``flashjax export`` writes the checkpoint
back in its original order, and activity traces (which name original neurons) are mapped
through it.

The orders are fitted to co-activation statistics: the true activity ``flashjax collect``
recorded (or an activity trace), the first ``fit`` of its tokens. Candidates per layer:

* ``frequency``: most often active first (hot rows together);
* ``greedy``: a path through the co-activation graph, from the most frequent neuron always on
  to the unplaced neuron that fires most often with the last one placed;
* ``greedy-cosine``: the same path on co-activation counts normalised by both neurons'
  frequencies (``c_ij / sqrt(f_i f_j)``), so that a few neurons active with almost every
  token (the partners of everyone that made the paper drop pairwise bundling) do not pull
  the path towards themselves;
* ``spectral``: neurons sorted by the second eigenvector of the normalised co-activation
  graph (a one-dimensional embedding that keeps strongly linked neurons close).

Each is scored on the remaining tokens by what reading a window's new rows costs the device
(the rows a token needs that none of the previous ``window`` tokens needed, read with the
reader's merging rules: a request spans adjacent rows, and gaps up to ``gap`` bytes of unneeded
rows, up to ``limit`` bytes; each request costs a fixed time plus its bytes, fitted to the
device sweep); per layer the cheapest is kept, and the store's current order when
nothing beats it. Runs are written to a hidden sibling directory; in place, it then takes the
model directory's name in one atomic exchange (renameat2 RENAME_EXCHANGE, where the system
has it) and the old one is removed.

Shape legend: T tokens, L layers, N neurons.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from flashjax.store import bundles
from flashjax.store.manifest import DRAM_DIR, MANIFEST, Manifest, tensor_checksum

ORDER_FILE = "order.npy"
METHODS = ("frequency", "greedy", "greedy-cosine", "spectral")
ALIGN = 4096
# The device model orders are scored with: a request costs REQUEST_US plus its bytes at
# READ_BYTES_PER_US, fitted to this machine's random-read sweep at 32 reads in flight (4 KiB:
# 60k reads/s, 32 KiB: 28k, 128 KiB: 9.3k); so a gap of unneeded bytes is worth reading
# below REQUEST_US x READ_BYTES_PER_US (about 19 KB), where reader.GAP_CROSSOVER sits.
REQUEST_US = 13.8
READ_BYTES_PER_US = 1410.0
SCORE_TOKENS = 4096  # held-out tokens a candidate is scored on, at most
FIT_TOKENS = 32768  # tokens the co-activation counts come from, at most (a [T, N] matmul)


class PlacementError(ValueError):
    """Placement data that does not fit the model, or a store that cannot be placed."""


# ---------------------------------------------------------------------------------------------
# orders


def coactivation(active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Co-activation counts [N, N] (diagonal zero) and activity counts [N] of bool [T, N]."""
    a = active.astype(np.float32)
    co = a.T @ a
    freq = np.diag(co).copy()
    np.fill_diagonal(co, 0)
    return co, freq


def _cosine(co: np.ndarray, freq: np.ndarray) -> np.ndarray:
    inv = 1 / np.sqrt(np.maximum(freq, 1))
    return co * inv[:, None] * inv[None, :]


def greedy_order(weights: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """A path through the graph of ``weights`` [N, N]: from the most frequent neuron, always
    to the unplaced neuron most strongly linked to the last one placed (the most frequent
    unplaced one when none is linked)."""
    n = len(freq)
    placed = np.zeros(n, bool)
    by_freq = np.argsort(-freq, kind="stable")
    order = np.empty(n, np.int64)
    order[0] = by_freq[0]
    placed[by_freq[0]] = True
    next_free = 0  # position in by_freq of the most frequent unplaced neuron, at least
    work = np.empty(n, weights.dtype)
    for i in range(1, n):
        np.copyto(work, weights[order[i - 1]])
        work[placed] = -1
        j = int(np.argmax(work))
        if work[j] <= 0:
            while placed[by_freq[next_free]]:
                next_free += 1
            j = int(by_freq[next_free])
        order[i] = j
        placed[j] = True
    return order


def spectral_order(co: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Neurons by the second eigenvector of the normalised co-activation graph; neurons never
    active go last, most frequent first among ties."""
    from scipy.sparse.linalg import eigsh

    live = np.flatnonzero(freq > 0)
    dead = np.flatnonzero(freq <= 0)
    if len(live) < 3:
        return np.concatenate([live, dead])
    w = _cosine(co[np.ix_(live, live)], freq[live])
    degree = w.sum(1)
    inv = 1 / np.sqrt(np.maximum(degree, 1e-12))
    m = w * inv[:, None] * inv[None, :]
    _, vecs = eigsh(m.astype(np.float64), k=2, which="LA", tol=1e-6,
                    v0=np.full(len(live), 1 / np.sqrt(len(live))))
    key = vecs[:, 0] * inv  # eigsh returns ascending eigenvalues: [:, 0] is the second largest
    return np.concatenate([live[np.lexsort((-freq[live], key))], dead])


def candidate_orders(active: np.ndarray, methods=METHODS) -> dict[str, np.ndarray]:
    """Each method's order of the neurons of bool ``active`` [T, N]."""
    co, freq = coactivation(active)
    out = {}
    for method in methods:
        if method == "frequency":
            out[method] = np.argsort(-freq, kind="stable")
        elif method == "greedy":
            out[method] = greedy_order(co, freq)
        elif method == "greedy-cosine":
            out[method] = greedy_order(_cosine(co, freq), freq)
        elif method == "spectral":
            out[method] = spectral_order(co, freq)
        else:
            raise PlacementError(f"placement method {method!r} is not one of {METHODS}")
    return out


# ---------------------------------------------------------------------------------------------
# scoring


def new_rows(active: np.ndarray, window: int) -> np.ndarray:
    """bool [T, N]: needed at token t and by none of the ``window`` tokens before it."""
    t = len(active)
    seen = np.zeros_like(active)
    for k in range(1, window + 1):
        seen[k:] |= active[:t - k]
    return active & ~seen


def request_counts(positions: np.ndarray, row_bytes: int, gap: int, limit: int
                   ) -> tuple[int, int]:
    """Requests and bytes to read rows at sorted ``positions`` (row i at i x ``row_bytes``)
    when a request covers whole 4 KiB blocks, spans gaps of at most ``gap`` bytes, and holds
    at most ``limit`` bytes (a longer span counts as that many requests)."""
    if positions.size == 0:
        return 0, 0
    off = positions.astype(np.int64) * row_bytes
    lo = off // ALIGN * ALIGN
    hi = -(-(off + row_bytes) // ALIGN) * ALIGN
    starts = np.concatenate([[True], lo[1:] - hi[:-1] > gap])
    first = np.flatnonzero(starts)
    last = np.concatenate([first[1:] - 1, [len(off) - 1]])
    spans = hi[last] - lo[first]
    return int((-(-spans // limit)).sum()), int(spans.sum())


def score(active: np.ndarray, order: np.ndarray, row_bytes: int, *, window: int, gap: int,
          limit: int) -> dict:
    """Mean per token of bool ``active`` [T, N] with neuron ``order[i]`` at row i: requests
    and request bytes for the window's new rows, and runs of adjacent rows among all the rows
    it needs."""
    pos = np.empty(len(order), np.int64)
    pos[order] = np.arange(len(order))
    fresh = new_rows(active, window)
    requests = nbytes = runs = 0
    for t in range(len(active)):
        r, b = request_counts(np.sort(pos[np.flatnonzero(fresh[t])]), row_bytes, gap, limit)
        requests += r
        nbytes += b
        p = np.sort(pos[np.flatnonzero(active[t])])
        runs += 1 + int((np.diff(p) > 1).sum()) if p.size else 0
    t = max(len(active), 1)
    return {"requests": requests / t, "request_bytes": nbytes / t, "runs": runs / t,
            "device_us": (requests * REQUEST_US + nbytes / READ_BYTES_PER_US) / t}


def run_lengths(active: np.ndarray, order: np.ndarray, window: int) -> np.ndarray:
    """Lengths of the runs of adjacent rows among each token's new rows (for the plot)."""
    pos = np.empty(len(order), np.int64)
    pos[order] = np.arange(len(order))
    out = []
    for row in new_rows(active, window):
        p = np.sort(pos[np.flatnonzero(row)])
        if p.size:
            cuts = np.flatnonzero(np.diff(p) > 1)
            edges = np.concatenate([[-1], cuts, [len(p) - 1]])
            out.append(np.diff(edges))
    return np.concatenate(out) if out else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------
# data


class _Activity:
    """Which rows of the store's current order each token needs, per layer: from ``flashjax
    collect`` output (recorded in some store order) or an activity trace (original neurons)."""

    def __init__(self, model_dir: Path, manifest: Manifest, data=None, trace=None,
                 tokens: int | None = None):
        if (data is None) == (trace is None):
            raise PlacementError("give the activations `flashjax collect` wrote (data) or an "
                                 "activity trace (trace), one of them")
        cfg = manifest.config
        self.n, self.n_layers = cfg.ffn_dim, cfg.num_hidden_layers
        current = load_order(model_dir, manifest)
        if data is not None:
            from flashjax.predictor.collect import open_arrays, read_meta

            self.data = Path(data)
            meta = read_meta(self.data)
            shape = (meta.get("n_layers"), meta.get("n_neurons"))
            if shape != (cfg.num_hidden_layers, cfg.ffn_dim):
                raise PlacementError(f"{self.data}: activations of {shape[0]} layers x "
                                     f"{shape[1]} neurons; {model_dir} has "
                                     f"{cfg.num_hidden_layers} x {cfg.ffn_dim}")
            self.tokens = int(meta.get("tokens_written", 0))
            if meta.get("neuron_order") != order_checksum(current):
                raise PlacementError(
                    f"{self.data}: collected from the store in another neuron order (order "
                    f"crc32 {meta.get('neuron_order')}, {model_dir} has "
                    f"{order_checksum(current)}); collect again from {model_dir}")
            self._open = lambda layer: open_arrays(self.data, layer)[1]
            self.trace = None
        else:
            from flashjax.bench.activity import ActivityTrace

            self.trace = ActivityTrace.load(trace)
            self.trace.check_shape(cfg.num_hidden_layers, cfg.ffn_dim, str(model_dir))
            self.tokens = self.trace.shape[0]
        if tokens is not None:
            self.tokens = min(self.tokens, tokens)
        if self.tokens < 8:
            raise PlacementError(f"{data or trace}: {self.tokens} tokens of activity; too few "
                                 f"to fit and score an order")
        self.current = current

    def layer(self, layer: int) -> np.ndarray:
        """bool [T, N] in the store's current row order."""
        if self.trace is None:
            bits = self._open(layer)[:self.tokens].read().result()
            return np.unpackbits(bits, axis=-1, count=self.n, bitorder="little").astype(bool)
        bits = self.trace.bits[:self.tokens, layer]
        active = np.unpackbits(bits, axis=-1, count=self.n, bitorder="little").astype(bool)
        return active if self.current is None else active[:, self.current[layer]]


# ---------------------------------------------------------------------------------------------
# the order file


def order_checksum(order: np.ndarray | None) -> int | None:
    return None if order is None else tensor_checksum(np.ascontiguousarray(order, np.int32))


def load_order(model_dir: str | Path, manifest: Manifest) -> np.ndarray | None:
    """int32 [layers, neurons]: the original neuron each row holds; None for a store in the
    checkpoint's order. Checked: the manifest's crc32, and a permutation per layer."""
    if manifest.order is None:
        return None
    cfg = manifest.config
    path = Path(model_dir) / bundles.FFN_DIR / ORDER_FILE
    shape = (cfg.num_hidden_layers, cfg.ffn_dim)
    wanted = f"expected the rows' neuron order, an int32 array of shape {shape}"
    order = bundles.load_array(path, np.int32, shape, "neuron order file", wanted)
    if tensor_checksum(order) != manifest.order["crc32"]:
        raise bundles.StoreError(f"{path}: crc32 {tensor_checksum(order)} differs from the "
                                 f"manifest's {manifest.order['crc32']}; the order is corrupt")
    if not (np.sort(order, axis=1) == np.arange(cfg.ffn_dim)).all():
        raise bundles.StoreError(f"{path}: a layer's order is not a permutation of its "
                                 f"{cfg.ffn_dim} neurons")
    return order


def neuron_params(cfg) -> list[tuple[str, ...]]:
    """Paths, within a layer's DRAM group, of the tensors indexed by neuron (last axis)."""
    return [("ffn", "fc1", "bias")] if cfg.family == "opt" else []


# ---------------------------------------------------------------------------------------------
# fitting and writing


@dataclasses.dataclass
class LayerPlacement:
    layer: int
    method: str  # the order kept ("current": none beat the store's own)
    perm: np.ndarray  # new row j holds current row perm[j]
    scores: dict  # method -> score() on the held-out tokens ("current" included)


def fit(activity: _Activity, row_bytes: int, *, methods=METHODS, fit_fraction: float = 0.75,
        window: int = 4, gap: int, limit: int, progress: bool = True) -> list[LayerPlacement]:
    """Per layer, the candidate order whose held-out reads cost the device least per token
    (requests and bytes under the device model)."""
    if not 0 < fit_fraction < 1:
        raise PlacementError(f"fit fraction must be in (0, 1), got {fit_fraction}")
    split = int(activity.tokens * fit_fraction)
    out = []
    for layer in tqdm(range(activity.n_layers), desc="place", unit="layer", disable=not progress):
        active = activity.layer(layer)
        train, test = active[max(0, split - FIT_TOKENS):split], active[split:][:SCORE_TOKENS]
        orders = {"current": np.arange(activity.n), **candidate_orders(train, methods)}
        scores = {m: score(test, o, row_bytes, window=window, gap=gap, limit=limit)
                  for m, o in orders.items()}
        best = min(scores, key=lambda m: (scores[m]["device_us"], m != "current"))
        out.append(LayerPlacement(layer, best, orders[best], scores))
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: not on this kernel or fs
            return False
        raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")
    return True


def _write_predictors(src: Path, dst: Path, perms: list[np.ndarray]) -> None:
    """The trained predictors with their output dimension in the new row order."""
    import orbax.checkpoint as ocp

    from flashjax.predictor.model import PREDICTORS_DIR
    from flashjax.store.convert import link_or_copy

    src, dst = src / PREDICTORS_DIR, dst / PREDICTORS_DIR
    dst.mkdir()
    for entry in src.iterdir():
        if entry.is_file():
            link_or_copy(entry, dst / entry.name)
    checkpointer = ocp.StandardCheckpointer()
    try:
        for layer, perm in enumerate(perms):
            params = checkpointer.restore((src / f"layer_{layer:03d}").absolute())
            b = params["B"]
            b["kernel"] = np.ascontiguousarray(np.asarray(b["kernel"])[:, perm])
            b["bias"] = np.ascontiguousarray(np.asarray(b["bias"])[perm])
            checkpointer.save((dst / f"layer_{layer:03d}").absolute(), params)
            checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def place_store(model_dir: str | Path, *, data: str | Path | None = None,
                trace: str | Path | None = None, out_dir: str | Path | None = None,
                methods=METHODS, tokens: int | None = None, fit_fraction: float = 0.75,
                window: int = 4, gap: int | None = None, limit: int | None = None,
                progress: bool = True) -> tuple[Manifest, list[LayerPlacement]]:
    """Reorder the neurons of ``model_dir`` (see the module docstring) from the activity in
    ``data`` (``flashjax collect`` output) or ``trace`` (an activity trace); write the placed
    store to ``out_dir``, or by default in place. ``gap`` and ``limit``: the reader's merging
    rules the orders are scored under (default: the reader's). Returns the new manifest and
    each layer's placement."""
    from flashjax.store import reader as reader_mod
    from flashjax.store.convert import _publish, carry_over, new_partial, save_dram_group
    from flashjax.store.load import read_dram_group

    model_dir = Path(model_dir)
    manifest = Manifest.read(model_dir)
    cfg = manifest.config
    in_place = out_dir is None
    out_dir = model_dir if in_place else Path(out_dir)
    if not in_place and out_dir.exists():
        raise FileExistsError(f"output directory {out_dir} already exists; choose a new path "
                              f"or remove it first")
    gap = reader_mod.READ_GAP if gap is None else gap
    limit = reader_mod.MERGE if limit is None else limit
    activity = _Activity(model_dir, manifest, data, trace, tokens)
    placements = fit(activity, manifest.row_bytes, methods=methods, fit_fraction=fit_fraction,
                     window=window, gap=gap, limit=limit, progress=progress)
    perms = [p.perm for p in placements]
    current = activity.current if activity.current is not None else \
        np.tile(np.arange(cfg.ffn_dim, dtype=np.int32), (cfg.num_hidden_layers, 1))
    order = np.stack([current[layer][perm] for layer, perm in enumerate(perms)]).astype(np.int32)

    checksums = bundles.load_checksums(model_dir)
    scales = bundles.load_scales(model_dir, manifest)
    tmp = new_partial(out_dir)
    try:
        from flashjax.predictor.model import PREDICTORS_DIR

        carry_over(model_dir, tmp, {bundles.FFN_DIR, bundles.SPLIT_DIR, MANIFEST, DRAM_DIR,
                                    PREDICTORS_DIR}, skip_hidden=True)
        # DRAM: the groups without neuron-indexed tensors are linked, the others rewritten
        dram_checksums = {g: dict(c) for g, c in (manifest.dram_checksums or {}).items()}
        (tmp / DRAM_DIR).mkdir()
        paths = neuron_params(cfg)
        layer_groups = {e.name for e in (model_dir / DRAM_DIR).iterdir()
                        if e.name.startswith("layer_")} if paths else set()
        carry_over(model_dir / DRAM_DIR, tmp / DRAM_DIR, layer_groups)
        for layer in range(cfg.num_hidden_layers if paths else 0):
            group = f"layer_{layer:03d}"
            tree = read_dram_group(model_dir, group, manifest=manifest)
            for path in paths:
                node = tree[f"layers_{layer}"]
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = np.ascontiguousarray(np.asarray(node[path[-1]])[perms[layer]])
                if manifest.dram_checksums is not None:
                    dram_checksums[group]["/".join((f"layers_{layer}", *path))] = \
                        tensor_checksum(node[path[-1]])
            save_dram_group(tmp, group, tree)
        # FFN rows, their checksums and resident scales
        context = bundles.write_context()
        (tmp / bundles.FFN_DIR).mkdir()
        new_checksums = np.zeros_like(np.asarray(checksums))
        for layer in tqdm(range(cfg.num_hidden_layers), desc="rewrite rows", unit="layer",
                          disable=not progress):
            rows = bundles.read_layer(model_dir, layer, checksums)[perms[layer]]
            bundles.create_layer(tmp, layer, rows, context)
            new_checksums[layer] = np.asarray(checksums[layer])[perms[layer]]
        np.save(tmp / bundles.FFN_DIR / bundles.CHECKSUM_FILE, new_checksums)
        scales_crc = manifest.scales_checksum
        if scales is not None:
            from flashjax.store.quant import SCALES_FILE

            new_scales = np.ascontiguousarray(
                np.stack([scales[layer][perm] for layer, perm in enumerate(perms)]))
            np.save(tmp / bundles.FFN_DIR / SCALES_FILE, new_scales)
            scales_crc = tensor_checksum(new_scales)
        np.save(tmp / bundles.FFN_DIR / ORDER_FILE, order)
        if (model_dir / PREDICTORS_DIR).is_dir():
            _write_predictors(model_dir, tmp, perms)
        placed = {"file": f"{bundles.FFN_DIR}/{ORDER_FILE}", "crc32": order_checksum(order),
                  "methods": [p.method for p in placements],
                  "data": str(Path(data or trace).absolute()), "window": window,
                  "gap_bytes": gap, "request_limit_bytes": limit}
        out = dataclasses.replace(manifest, dram_checksums=(
            dram_checksums if manifest.dram_checksums is not None else None),
            scales_checksum=scales_crc, order=placed)
        out.write(tmp)
        if not in_place:
            _publish(tmp, out_dir)
        elif _exchange(tmp, model_dir):
            shutil.rmtree(tmp)  # (now the old store)
        else:  # two renames: a crash between them leaves the old store as the hidden sibling
            old = model_dir.parent / f".{model_dir.name}.replaced-{os.getpid()}"
            os.rename(model_dir, old)
            os.rename(tmp, model_dir)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, placements


def report(placements: list[LayerPlacement]) -> str:
    """A table of each layer's held-out reads per token under each candidate."""
    methods = list(placements[0].scores)
    lines = ["held-out reads per token of a window's new rows: requests / kB / device us",
             f"{'layer':>5} {'kept':>13} " + " ".join(f"{m:>20}" for m in methods)]
    for p in placements:
        cells = [f"{p.scores[m]['requests']:.1f} / {p.scores[m]['request_bytes'] / 1e3:.0f} / "
                 f"{p.scores[m]['device_us']:.0f}" for m in methods]
        lines.append(f"{p.layer:>5} {p.method:>13} " + " ".join(f"{c:>20}" for c in cells))
    return "\n".join(lines)


def scores_json(placements: list[LayerPlacement]) -> str:
    return json.dumps([{"layer": p.layer, "kept": p.method, "scores": p.scores}
                       for p in placements], indent=1)
