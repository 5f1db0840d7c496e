"""Realistic neuron activity for stores whose weights are random: traces from a trained model.

A random ReLU layer fires about half its neurons with no pattern from token to token, so a
synthetic store at a large model's shape says nothing about sparsity or windowing by itself.
An activity trace supplies the pattern: the set of neurons each token needs in each layer,
recorded from a trained model (its predictors' selections, which is what the engine loads, or
its true activity) and then mapped onto the larger shape:

* the target's first layer takes the source's first layer, and the other target layers
  stretch the source's remaining layers over their depth (target layer ``l >= 1`` takes
  source layer ``1 + (l - 1) * (L_src - 1) // (L_dst - 1)``). The first layer of a ReLU model
  reads the embeddings directly and fires far more neurons than the rest (41% vs 3-9% in the
  shipped model); stretching it over a sixth of a 32-layer model would invent five more such
  layers. ``layer_map="proportional"`` (``l * L_src // L_dst``) does that instead;
* the target's ``N_dst`` neurons are ``R = ceil(N_dst / N_src)`` replicas of the source
  layer's neurons under a fixed random permutation; replica ``r`` follows the source trace
  from ``r * T / R`` tokens on (cyclically), so replicas are real, mutually independent stretches
  of text rather than copies of one.

Per layer, the fraction of neurons active per token and the token-to-token overlap of the
active sets are therefore those of the source model (``statistics`` reports both for the
source and the mapped trace). With ``predictor="trace"`` the engine takes its needed sets from
the trace while still running (and budgeting) a low-rank predictor of the target's shape, so
that the predictor's cost is the real one.

Shape legend: T tokens, L layers, N neurons.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

FORMAT = "flashjax-activity-trace-1"
WINDOWS = (1, 2, 4, 8, 16)


class TraceError(ValueError):
    """An activity trace file that is missing, malformed or of the wrong shape."""


class ActivityTrace:
    """Needed neurons per token and layer, held bit-packed ([T, L, N/8], little bit order),
    with provenance in ``meta``."""

    def __init__(self, active: np.ndarray | None = None, meta: dict | None = None, *,
                 bits: np.ndarray | None = None, n_neurons: int | None = None):
        if bits is None:
            if active is None or active.ndim != 3 or active.dtype != bool:
                raise TraceError(f"activity must be bool [tokens, layers, neurons], got "
                                 f"{getattr(active, 'dtype', None)} "
                                 f"{getattr(active, 'shape', None)}")
            bits, n_neurons = np.packbits(active, axis=-1, bitorder="little"), active.shape[2]
        if bits.ndim != 3 or n_neurons is None or not 0 < n_neurons <= 8 * bits.shape[2]:
            raise TraceError(f"packed activity {bits.shape} does not hold {n_neurons} neurons")
        self.bits = bits
        self.n_neurons = int(n_neurons)
        self.meta = dict(meta or {})

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.bits.shape[0], self.bits.shape[1], self.n_neurons

    @property
    def active(self) -> np.ndarray:
        """bool [T, L, N] (unpacked on each call)."""
        return np.unpackbits(self.bits, axis=-1, count=self.n_neurons,
                             bitorder="little").astype(bool)

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def needed(self, step: int, layer: int) -> np.ndarray:
        """Sorted int32 neuron ids token ``step`` (cyclic) needs in ``layer``."""
        row = self.bits[step % self.bits.shape[0], layer]
        return np.flatnonzero(np.unpackbits(row, count=self.n_neurons,
                                            bitorder="little")).astype(np.int32)

    def in_rows(self, order: np.ndarray | None) -> ActivityTrace:
        """The trace (which names a checkpoint's neurons) in the rows of a store placed in
        ``order`` ([L, N]: row i of layer l holds neuron order[l, i], see ``flashjax place``);
        itself for None."""
        if order is None:
            return self
        active = self.active
        rows = np.stack([active[:, layer, order[layer]] for layer in range(active.shape[1])],
                        axis=1)
        return ActivityTrace(rows, {**self.meta, "placed": True})

    def layer_fractions(self) -> list[float]:
        return [float(f) for f in self.active.mean(axis=(0, 2))]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, bits=self.bits, n_neurons=np.int64(self.n_neurons),
                            meta=np.array(json.dumps({"format": FORMAT, **self.meta})))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActivityTrace:
        path = Path(path)
        if not path.exists():
            raise TraceError(f"{path}: no such activity trace (make one with "
                             f"scripts/make_activity_trace.py)")
        try:
            with np.load(path) as f:
                bits, n, meta = f["bits"], int(f["n_neurons"]), json.loads(str(f["meta"]))
        except (OSError, KeyError, ValueError) as e:
            raise TraceError(f"{path}: not an activity trace ({e})") from None
        if meta.get("format") != FORMAT:
            raise TraceError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        return cls(meta=meta, bits=bits, n_neurons=n)

    def check_shape(self, n_layers: int, n_neurons: int, where: str) -> None:
        _, layers, neurons = self.shape
        if (layers, neurons) != (n_layers, n_neurons):
            raise TraceError(f"activity trace {self.meta.get('path', '')} is for {layers} layers"
                             f" x {neurons} neurons; {where} has {n_layers} x {n_neurons} "
                             f"(map it with scripts/make_activity_trace.py --for)")


def statistics(active: np.ndarray, windows=WINDOWS) -> dict:
    """Per layer: mean fraction active per token, overlap with the previous token
    (|A_t & A_t-1| / |A_t|), and the fraction of neurons new to the last k tokens' union per
    token (the rows a window-k cache with room to spare loads), for each k in ``windows``."""
    t, layers, n = active.shape
    out = {"tokens": t, "layers": layers, "neurons": n, "active_fraction": [],
           "overlap_prev": [], "new_fraction": {str(k): [] for k in windows}}
    for layer in range(layers):
        a = active[:, layer]
        counts = a.sum(axis=1)
        out["active_fraction"].append(float(counts.mean() / n))
        both = (a[1:] & a[:-1]).sum(axis=1)
        out["overlap_prev"].append(float(both.sum() / max(counts[1:].sum(), 1)))
        # last_seen[j]: the last token (< t) that needed neuron j
        for k in windows:
            last_seen = np.full(n, -10 ** 9)
            new = 0
            for step in range(t):
                ids = np.flatnonzero(a[step])
                new += int((last_seen[ids] < step - k).sum())
                last_seen[ids] = step
            out["new_fraction"][str(k)].append(new / (t * n))
    return out


def record(model_dir, text, *, tokens: int = 4096, seq_len: int = 256,
           source: str = "predictor", progress: bool = True) -> ActivityTrace:
    """Run the dense model of ``model_dir`` over ``text`` and record, for ``tokens`` tokens of
    consecutive text, which neurons each layer needs: the trained predictors' selections
    (``source="predictor"``) or the true ReLU activity (``"true"``)."""
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import flashjax
    from flashjax.predictor.collect import ffn_activations
    from flashjax.predictor.model import Predictors, predictor_logits
    from flashjax.predictor.text import sequences
    from flashjax.store.manifest import Manifest
    from flashjax.store.place import load_order

    if source not in ("predictor", "true"):
        raise ValueError(f"source must be 'predictor' or 'true', got {source!r}")
    model = flashjax.load(model_dir, progress=progress)
    cfg = model.cfg
    if model.tokenizer is None:
        raise ValueError(f"{model_dir}: the model has no tokenizer to read text with")
    predictors = Predictors.load(model_dir, cfg.num_hidden_layers) if source == "predictor" \
        else None
    seq_len = min(seq_len, cfg.max_sequence)
    chunks = []
    bar = tqdm(total=tokens, unit="tok", desc="trace", disable=not progress)
    for seq in sequences(text, model.tokenizer, seq_len=seq_len, bos_id=cfg.bos_token_id,
                         eos_id=cfg.eos_token_id, max_tokens=tokens):
        ins, bits, _ = ffn_activations(cfg, model.params, jnp.asarray(seq[None]))
        if predictors is None:
            act = np.unpackbits(np.asarray(bits)[:, 0], axis=-1, count=cfg.ffn_dim,
                                bitorder="little").astype(bool)
        else:
            act = np.stack([np.asarray(predictor_logits(predictors.params[i], ins[i, 0]))
                            >= predictors.thresholds[i] for i in range(cfg.num_hidden_layers)])
        chunks.append(act.transpose(1, 0, 2))  # [S, L, N]
        bar.update(seq.size)
    bar.close()
    if not chunks:
        raise ValueError(f"{text}: no text to record a trace from")
    active = np.concatenate(chunks)[:tokens]
    order = load_order(model_dir, Manifest.read(model_dir))
    if order is not None:  # a placed store's rows back to the checkpoint's neurons
        neurons = np.empty_like(active)
        for layer in range(cfg.num_hidden_layers):
            neurons[:, layer, order[layer]] = active[:, layer]
        active = neurons
    return ActivityTrace(active, {"source_model": str(model_dir), "text": str(text),
                                  "source": source, "seq_len": seq_len})


def layer_map(l_src: int, l_dst: int, how: str = "first-apart") -> list[int]:
    """Source layer of each target layer (see the module docstring)."""
    if how == "proportional" or l_src == 1 or l_dst == 1:
        return [layer * l_src // l_dst for layer in range(l_dst)]
    if how != "first-apart":
        raise ValueError(f"layer_map must be 'first-apart' or 'proportional', got {how!r}")
    return [0] + [1 + (layer - 1) * (l_src - 1) // (l_dst - 1) for layer in range(1, l_dst)]


def map_onto(trace: ActivityTrace, n_layers: int, n_neurons: int, *, tokens: int | None = None,
             seed: int = 0, how: str = "first-apart") -> ActivityTrace:
    """The trace stretched onto ``n_layers`` x ``n_neurons`` (see the module docstring)."""
    src = trace.active  # [T, L, N] bool
    t_src, l_src, n_src = src.shape
    sources = layer_map(l_src, n_layers, how)
    replicas = math.ceil(n_neurons / n_src)
    tokens = tokens or t_src
    rng = np.random.default_rng(seed)
    out = np.zeros((tokens, n_layers, n_neurons), bool)
    steps = np.arange(tokens)
    offsets = [r * t_src // replicas for r in range(replicas)]
    for layer, s in enumerate(sources):
        # [T, R * N_src]: replica r of neuron j at column r * N_src + j
        wide = np.concatenate([src[(steps + off) % t_src, s] for off in offsets], axis=1)
        perm = rng.permutation(replicas * n_src)[:n_neurons]
        out[:, layer] = wide[:, perm]
    meta = {**trace.meta, "mapped_from": [t_src, l_src, n_src], "replicas": replicas,
            "layer_map": sources, "layer_map_kind": how,
            "replica_offsets": offsets, "seed": seed}
    return ActivityTrace(out, meta)


class TraceSelector:
    """A selector for benchmarks on synthetic stores: the needed sets come from an activity
    trace, while an untrained low-rank predictor of the store's shape runs (and is budgeted)
    for its cost. Pass it as ``flashjax.load(..., predictor=TraceSelector.open(...))``."""

    name, keeps_rows = "trace", True

    def __init__(self, trace: ActivityTrace, predictor):
        self.trace, self.predictor = trace, predictor  # predictor: engine.selectors.LowRank

    @classmethod
    def open(cls, path: str | Path, model_dir: str | Path, dtype="float32") -> TraceSelector:
        from flashjax.engine.selectors import LowRank
        from flashjax.predictor.model import Predictors
        from flashjax.store.manifest import Manifest

        from flashjax.store.place import load_order

        manifest = Manifest.read(model_dir)
        cfg = manifest.config
        trace = ActivityTrace.load(path)
        trace.meta["path"] = str(path)
        trace.check_shape(cfg.num_hidden_layers, cfg.ffn_dim, str(model_dir))
        trace = trace.in_rows(load_order(model_dir, manifest))
        predictors = Predictors.random(cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers,
                                       dtype=dtype)
        return cls(trace, LowRank(predictors))

    def shares(self):
        return self.trace.layer_fractions()

    def dram_bytes(self, dtype) -> int:
        return self.predictor.dram_bytes(dtype)

    def prepare(self, params, resident_dtype) -> None:
        self.predictor.prepare(params, resident_dtype)

    def select(self, layer, ffn_in, token_valid, step, fetch=np.asarray):
        from flashjax.engine.selectors import Selection

        scores = self.predictor.scores(layer, ffn_in, token_valid, fetch)  # its cost is real
        return Selection(self.trace.needed(step, layer), scores)
