"""``FlashModel``: generation with the FFN on flash, one decode step at a time.

Per token: embed, then per layer attend (jit) -> select the needed neurons (host) -> plan the
buffer's change (host) -> the schedule's reads, updates and FFN pieces -> finish (jit); then
the head. Each phase is timed in one place (``Stats.phase``) and marked for the profiler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.budget import MemoryPlan
from flashjax.cache import buckets
from flashjax.config import ModelConfig
from flashjax.engine import kernels
from flashjax.engine.options import EngineOptions
from flashjax.engine.schedule import LayerWork, Overlapped, Sequential
from flashjax.engine.selectors import Selector
from flashjax.engine.state import FlashState, NeuronBuffer
from flashjax.engine.transfer import Transfers
from flashjax.model.bundle import neuron_bias
from flashjax.model.layers import KVCache, run_layers
from flashjax.runtime import Model, increment
from flashjax.store.reader import FlashReader


class FlashModel(Model):
    """A model whose FFN weights stay on flash; see ``flashjax.load(..., dram_budget=...)``.

    ``init_state(batch, slots)`` makes a ``FlashState`` with nothing resident (reusing the
    buffers' memory); ``prefill`` and ``decode_step`` take one and return the next.
    ``generate``/``logits`` do that for a whole call (``return_state=True`` hands back the
    state they ended with).
    """

    prompt_bucket = 1  # the prompt runs a token at a time: no width to compile for

    def __init__(self, cfg: ModelConfig, params, *, reader: FlashReader, plan: MemoryPlan,
                 options: EngineOptions, selector: Selector, row_scales=None, **kw):
        super().__init__(cfg, params, **kw)
        self.reader, self.memory, self.options, self.selector = reader, plan, options, selector
        # host arrays go to the device the resident weights are on
        device = next(iter(jax.tree.leaves(params)[0].devices()))
        self.transfers = Transfers(device, explicit=options.explicit_transfers)
        self.schedule = (Overlapped if options.overlap else Sequential)(reader, self.transfers)
        # layer indices as device scalars: a Python int argument would cross every call
        self.layer_ids = [jnp.int32(i) for i in range(cfg.num_hidden_layers)]
        self.layer_params = [params[f"layers_{i}"] for i in range(cfg.num_hidden_layers)]
        self.neuron_biases = [neuron_bias(cfg, p) for p in self.layer_params]
        # per layer the calibrated activation threshold as a device scalar (SwiGLU), or None
        self.thresholds = [None if cfg.threshold(i) is None else jnp.float32(cfg.threshold(i))
                           for i in range(cfg.num_hidden_layers)]
        # rows kept resident per layer: none for a selector that streams everything
        self.capacities = plan.capacities if selector.keeps_rows else (0,) * len(plan.capacities)
        # a layer's largest update is bounded by its capacity; streamed rows by the staging
        self.chunks = [min(plan.update_rows, c) for c in self.capacities]
        self.sizes = [buckets(c) if c else [] for c in self.chunks]
        self.stream_sizes = buckets(plan.update_rows)
        # a quantized store's rows are decoded as they enter the buffers; the per-layer
        # scales [N, G] are resident when the rows do not carry them
        self.quant = reader.quant
        self.row_scales = (None if row_scales is None
                           else [jnp.asarray(s) for s in row_scales])
        self._buffers = None
        self._warm_up()

    @property
    def max_slots(self) -> int:
        return self.options.max_context

    # -- state ---------------------------------------------------------------------------------
    def _new_buffers(self) -> list[NeuronBuffer]:
        cfg = self.cfg
        return [NeuronBuffer.init(c + self.memory.slack_rows, cfg.hidden_size, self.dtype,
                                  n_parts=len(cfg.ffn_parts), bias=cfg.ffn_bias)
                for c in self.memory.capacities]

    def init_state(self, batch: int, slots: int) -> FlashState:
        if batch > self.options.max_batch or slots > self.options.max_context:
            raise ValueError(
                f"batch {batch} x {slots} KV slots exceeds what the DRAM budget reserved "
                f"(max_batch {self.options.max_batch} x max_context {self.options.max_context}); "
                f"load with larger max_batch/max_context (--max-context), up to the model's "
                f"{self.cfg.sequence_limit}")
        buffers = self._buffers
        if buffers is None or any(b.up.is_deleted() for b in buffers):  # (an interrupted call)
            buffers = self._new_buffers()
        self._buffers = None  # donated to the state's updates from here on
        self.schedule.reset()
        return FlashState.init(KVCache.init(self.cfg, batch, slots, self.dtype), buffers,
                               self.capacities, self.cfg.ffn_dim)

    def _done(self, state: FlashState) -> None:
        self._buffers = list(state.buffers)  # the next call reuses their memory

    _finish = _done

    def _warm_up(self) -> None:
        """Compile the row kernels for every padded size now, not while generating."""
        state = self.init_state(1, 1)
        buffers = kernels.compile_row_kernels(
            list(state.buffers), self.neuron_biases, self.reader.staging, self.capacities,
            self.sizes, self.stream_sizes, self.dtype, self.cfg.activation, self.thresholds[0],
            self.row_scales, self.quant, put=self.transfers.put_uncounted)
        self._done(state.next_token(state.kv, buffers))

    # -- one token through all layers ----------------------------------------------------------
    def _work(self, state: FlashState, layer: int, ffn_in, token_valid) -> LayerWork:
        stats = state.stats
        with stats.phase("predictor"):
            needed = self.selector.select(layer, ffn_in, token_valid, state.step,
                                          fetch=lambda x: self.transfers.get(stats, x))
        with stats.phase("memory"):
            index = state.index[layer]
            plan = index.plan(needed.ids, state.step, self.options.window, needed.scores)
        stats.rows_needed += int(needed.ids.size)
        stats.rows_evicted += int(plan.evicted.size)
        return LayerWork(layer=layer, plan=plan, index=index, step=state.step,
                         neuron_bias=self.neuron_biases[layer], activation=self.cfg.activation,
                         chunk=self.chunks[layer], sizes=self.sizes[layer],
                         stream_chunk=self.memory.update_rows, stream_sizes=self.stream_sizes,
                         rows=state.buffers[layer].rows, threshold=self.thresholds[layer],
                         quant=self.quant,
                         scales=None if self.row_scales is None else self.row_scales[layer])

    def decode_step(self, state: FlashState, tokens, positions, token_valid=None):
        """One token per sequence: tokens, positions [B] -> (logits [B, V], next state)."""
        cfg, stats = self.cfg, state.stats
        if token_valid is None:
            token_valid = kernels.all_valid(tokens)
        buffers = list(state.buffers)

        def attend(layer, h, kv):
            with stats.phase("compute"):
                h, ffn_in, kv = kernels.attend(cfg, self.layer_params[layer], h, kv,
                                               self.layer_ids[layer], positions)
                ffn_in.block_until_ready()
            return h, ffn_in, kv

        def ffn(layer, ffn_in):
            work = self._work(state, layer, ffn_in, token_valid)
            return self.schedule.layer(buffers, work, ffn_in, stats)

        def finish(layer, h, ffn_out):
            with stats.phase("compute"):
                return kernels.finish(cfg, self.layer_params[layer], h, ffn_out)

        with jax.profiler.StepTraceAnnotation("decode", step_num=state.step):
            with stats.phase("compute"):
                h, kv = kernels.embed(cfg, self.params, tokens, positions, token_valid, state.kv)
            h, kv = run_layers(cfg.num_hidden_layers, h, kv, attend=attend, ffn=ffn,
                               finish=finish)
            with stats.phase("compute"):
                logits, kv = kernels.head(cfg, self.params, h, kv)
            self.schedule.flush(buffers, stats)  # runs after the head, while the host samples
            with stats.phase("compute"):
                logits.block_until_ready()
        stats.end_token()
        return logits, state.next_token(kv, buffers)

    def prefill(self, state: FlashState, tokens, positions, valid):
        """The prompt one token at a time, so the window forms as in decoding:
        tokens, positions, valid [B, S] -> (logits [B, S, V] numpy, state)."""
        tokens, positions, valid = (np.asarray(a) for a in (tokens, positions, valid))
        logits = np.zeros((*tokens.shape, self.cfg.vocab_size), np.float32)
        for j in range(tokens.shape[1]):
            if not valid[:, j].any():  # a column of padding only: nothing to compute
                state = state.replace(kv=state.kv.replace(index=increment(state.kv.index)))
                continue
            inputs = self.transfers.put(state.stats, "inputs", tokens[:, j], positions[:, j],
                                        valid[:, j])
            step_logits, state = self.decode_step(state, *inputs)
            logits[:, j] = np.asarray(step_logits)
        return logits, state

    # -- the runtime's entry points --------------------------------------------------------------
    def _prefill(self, tokens, positions, valid, state: FlashState):
        return self.prefill(state, tokens, positions, valid)

    def _decode(self, tokens, positions, state: FlashState):
        return self.decode_step(state, tokens, positions)

    def _rewind(self, state: FlashState, length: int) -> FlashState:
        # the resident rows stay: which neurons are resident never changes what is computed
        return state.replace(kv=super()._rewind(state.kv, length))

    def generate(self, prompt_ids, max_new_tokens: int = 32, *, return_stats: bool = False,
                 return_state: bool = False, **kw):
        """As ``Model.generate``; with ``return_stats`` also the stats (see README), with
        ``return_state`` the final ``FlashState``: ``ids[, stats][, state]``."""
        ids, state = super().generate(prompt_ids, max_new_tokens, return_state=True, **kw)
        self._done(state)
        out = (ids,) + ((self.report(state),) if return_stats else ()) + \
            ((state,) if return_state else ())
        return out if len(out) > 1 else ids

    def logits(self, token_ids, attention_mask=None, *, return_state: bool = False):
        logits, state = super().logits(token_ids, attention_mask, return_state=True)
        self._done(state)
        return (logits, state) if return_state else logits

    def report(self, state: FlashState) -> dict:
        """The stats of the generation that ``state`` ended (see README)."""
        plan = self.memory
        return {
            "dram_budget_bytes": plan.budget, "peak_dram_bytes": plan.total,
            "memory": plan.as_dict(), **state.stats.report(self.reader.row_bytes),
            "predictor": self.selector.name, "window": self.options.window,
            "direct_io": self.options.direct_io, "capacity": plan.capacity,
            "capacities": list(plan.capacities), "update_rows": plan.update_rows,
            "oracle_bytes": getattr(self.selector, "outside_budget_bytes", 0),
            "compute_device": self.transfers.describe()}
