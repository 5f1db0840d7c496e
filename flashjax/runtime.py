"""A loaded model: teacher-forced logits and generation on top of the jitted decoder.

``Model`` keeps every weight in DRAM (the dense path). Subclasses replace ``init_state``,
``_prefill`` and ``_decode`` (same signatures; the state is a ``KVCache`` here) to compute the
FFN differently; batching, padding, positions, sampling and stopping live here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.config import ModelConfig
from flashjax.model import decoder, sampling
from flashjax.model.layers import KVCache

# x + 1 on the device (positions, the KV cache's next slot): nothing crosses from the host
increment = jax.jit(lambda x: x + 1)

PROMPT_BUCKET = 16  # prompt lengths are padded to a multiple of this to bound recompiles
SLOT_BUCKET = 64  # KV-cache lengths likewise


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def default_compute_dtype(storage_dtype) -> jnp.dtype:
    # XLA:CPU runs half-precision matmuls several times slower than float32.
    if jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return jnp.dtype(storage_dtype)


def encode(tokenizer, cfg: ModelConfig, text: str) -> list[int]:
    """``text``'s token ids, starting with the model's BOS token (added if the tokenizer did
    not)."""
    ids = tokenizer.encode(text).ids
    if not ids or ids[0] != cfg.bos_token_id:
        ids = [cfg.bos_token_id, *ids]
    return ids


def _as_batch(token_ids) -> tuple[list[list[int]], bool]:
    """Accept one sequence or a batch; return (batch, was_single)."""
    if isinstance(token_ids, np.ndarray):
        token_ids = token_ids.tolist()
    token_ids = list(token_ids)
    if not token_ids:
        raise ValueError("token_ids is empty")
    single = not isinstance(token_ids[0], (list, tuple, np.ndarray))
    batch = [list(map(int, s)) for s in ([token_ids] if single else token_ids)]
    if any(len(s) == 0 for s in batch):
        raise ValueError("every sequence needs at least one token")
    return batch, single


class Model:
    """A flashjax model with all weights in DRAM.

    ``logits(token_ids)`` gives teacher-forced float32 logits [batch, seq, vocab];
    ``generate(prompt_ids, max_new_tokens=...)`` returns the new token ids.
    """

    # prompts are padded to a multiple of this (the dense prefill compiles once per width)
    prompt_bucket = PROMPT_BUCKET

    def __init__(self, cfg: ModelConfig, params, *, tokenizer=None, path: Path | None = None,
                 dtype=jnp.float32):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.params = params
        self.tokenizer = tokenizer
        self.path = path

    @property
    def max_slots(self) -> int | None:
        """The most KV-cache slots a state may have (None: as many as a sequence needs)."""
        return None

    def _slots(self, need: int) -> int:
        """KV-cache slots for ``need`` tokens: rounded up to bound recompiles, but never past
        ``max_slots`` when ``need`` itself fits."""
        slots = _round_up(need, SLOT_BUCKET)
        return slots if self.max_slots is None else min(slots, max(need, self.max_slots))

    # -- the entry points a subclass may replace ---------------------------------------------
    def init_state(self, batch: int, slots: int):
        """What generation carries from token to token, empty: here the KV cache."""
        return KVCache.init(self.cfg, batch, slots, self.dtype)

    def _prefill(self, tokens, positions, valid, cache: KVCache):
        return decoder.forward(self.cfg, self.params, tokens, positions, valid, cache)

    def _decode(self, tokens, positions, cache: KVCache):
        return decoder.decode_step(self.cfg, self.params, tokens, positions, cache)

    # -- public API --------------------------------------------------------------------------
    def _check_ids(self, batch: list[list[int]]) -> None:
        flat = np.fromiter((t for s in batch for t in s), np.int64)
        if flat.min() < 0 or flat.max() >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); found "
                             f"{int(flat.min())}..{int(flat.max())}")

    def logits(self, token_ids, attention_mask=None, *, return_state: bool = False):
        """Teacher-forced logits, float32 [batch, seq, vocab].

        ``token_ids``: one sequence, a batch of equal-length sequences, or ragged sequences
        (right-padded; logits at padded positions are meaningless). ``attention_mask`` [batch,
        seq] marks real tokens (1) in an already padded batch. With ``return_state``, returns
        (logits, the state after the sequence).
        """
        batch, single = _as_batch(token_ids)
        self._check_ids(batch)
        seq = max(map(len, batch))
        b = len(batch)
        if seq > self.cfg.max_sequence:
            raise ValueError(f"sequence length {seq} exceeds {self.cfg.sequence_limit}")
        width = _round_up(seq, self.prompt_bucket)
        width = min(width, max(seq, self.max_slots or width))
        tokens = np.full((b, width), self.cfg.pad_token_id, np.int32)
        valid = np.zeros((b, width), bool)
        for i, s in enumerate(batch):
            tokens[i, :len(s)] = s
            valid[i, :len(s)] = True
        if attention_mask is not None:
            mask = np.asarray(attention_mask, bool)
            if mask.shape != (b, seq):
                raise ValueError(f"attention_mask has shape {mask.shape}, expected {(b, seq)}")
            valid[:, :seq] &= mask
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
        logits, state = self._prefill(jnp.asarray(tokens), jnp.asarray(positions),
                                      jnp.asarray(valid), self.init_state(b, width))
        out = np.asarray(logits[:, :seq], np.float32)
        out = out[0:1] if single else out
        return (out, state) if return_state else out

    def generate(self, prompt_ids, max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_at_eos: bool = True, return_state: bool = False, on_token=None):
        """Continue one prompt (a list of ids) or a batch of prompts of any lengths.

        Greedy when ``temperature`` is 0, else sampling with ``top_k`` (0: off) and ``top_p``
        (1: off) from ``seed``. Returns the new ids (a list, or a list per prompt), including
        the end-of-sequence token when one stops a sequence; with ``return_state``, (ids, the
        state generation ended with). ``on_token(ids)``, when given, is called with the new
        ids so far (the list, or the list per prompt) each time a token is chosen, before the
        next is computed.
        """
        batch, single = _as_batch(prompt_ids)
        out: list[list[int]] = [[] for _ in batch]
        steps = self._steps(batch, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)
        while True:
            try:
                host_ids, live, _ = next(steps)
            except StopIteration as stop:
                cache = stop.value
                break
            for i in np.flatnonzero(live):
                out[i].append(int(host_ids[i]))
            if on_token is not None:
                on_token(out[0] if single else out)
        ids = out[0] if single else out
        return (ids, cache) if return_state else ids

    def stream(self, prompt_ids, max_new_tokens: int = 32, **sampling_options):
        """``generate`` for one prompt, as a generator: yields each new token id as soon as
        it is chosen (the next one is computed only when asked for). Keyword arguments as
        ``generate``'s sampling options and ``stop_at_eos``."""
        batch, single = _as_batch(prompt_ids)
        if not single:
            raise ValueError("stream takes one prompt (a list of ids); use generate(..., "
                             "on_token=...) for a batch")
        options = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0, "stop_at_eos": True}
        unknown = set(sampling_options) - set(options)
        if unknown:
            raise TypeError(f"stream: unknown option(s) {sorted(unknown)}")
        options.update(sampling_options)
        steps = self._steps(batch, max_new_tokens, options["temperature"], options["top_k"],
                            options["top_p"], options["seed"], options["stop_at_eos"])
        state = None
        try:
            for host_ids, _, state in steps:
                yield int(host_ids[0])
        finally:  # also when the caller stops early: the last state yielded is intact
            if state is not None:
                self._finish(state)

    def _finish(self, state) -> None:
        """A generation ended with ``state`` (a subclass may reuse its memory)."""

    def _rewind(self, state, length: int):
        """``state`` holding only its first ``length`` tokens: the KV cache's next slot moves
        back (slots past it are masked until written again)."""
        return state.replace(index=jnp.asarray(length, jnp.int32))

    def conversation(self, max_context: int | None = None):
        """A ``flashjax.conversation.Conversation``: a token sequence continued turn by turn
        over one kept state (KV cache, and for a flash-backed model its neuron buffers), each
        turn prefilling only the tokens it adds. ``max_context``: the most tokens it may hold
        (default: the model's limit, or a flash model's ``max_context``)."""
        from flashjax.conversation import Conversation

        return Conversation(self, max_context)

    @staticmethod
    def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                             f"{temperature}, {top_k}, {top_p}")

    def _steps(self, batch, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos):
        """The generation loop as a generator over prompts: prefills them, then as
        ``_sample``."""
        self._check_ids(batch)
        self._check_sampling(max_new_tokens, temperature, top_k, top_p)
        lengths = np.array([len(s) for s in batch], np.int32)
        limit = self.cfg.max_sequence
        if lengths.max() + max_new_tokens > limit:
            raise ValueError(f"prompt length {lengths.max()} + max_new_tokens {max_new_tokens} "
                             f"exceeds {self.cfg.sequence_limit}")
        b, width = len(batch), _round_up(int(lengths.max()), self.prompt_bucket)
        tokens = np.full((b, width), self.cfg.pad_token_id, np.int32)
        valid = np.zeros((b, width), bool)
        for i, s in enumerate(batch):  # left padding: every prompt ends at slot width - 1
            tokens[i, width - len(s):] = s
            valid[i, width - len(s):] = True
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
        # the prompt's slots, then one per new token fed back (the last is only sampled)
        cache = self.init_state(b, self._slots(width + max_new_tokens - 1))
        logits, cache = self._prefill(jnp.asarray(tokens), jnp.asarray(positions),
                                      jnp.asarray(valid), cache)
        return (yield from self._sample(logits[:, -1], cache, lengths, max_new_tokens,
                                        temperature, top_k, top_p, seed, stop_at_eos))

    def _sample(self, last, state, positions, max_new_tokens, temperature, top_k, top_p, seed,
                stop_at_eos):
        """Choose tokens from ``last`` [B, V], the logits after ``state``, feeding each back
        at ``positions`` [B] (then + 1, ...). Yields each step's chosen ids [B] (numpy), the
        mask of the sequences that take them (not stopped before) and the state holding every
        token before them (valid until the generator is advanced: the next step donates it);
        returns the state it ended with (the last one yielded)."""
        # the knobs, the key and the positions go to the device once: a token's step hands
        # it nothing but what the model's own decode step moves
        key = jax.random.key(seed)
        knobs = jax.device_put((np.float32(temperature), np.int32(top_k), np.float32(top_p)))
        position = jax.device_put(np.asarray(positions, np.int32))
        done = np.zeros(len(positions), bool)
        for step in range(max_new_tokens):
            if temperature > 0:
                key, sub = jax.random.split(key)
                next_ids = sampling.sample(last, sub, *knobs)
            else:
                next_ids = sampling.greedy(last)
            host_ids = jax.device_get(next_ids)  # (the one thing the host needs back)
            yield host_ids, ~done, state
            done |= stop_at_eos & (host_ids == self.cfg.eos_token_id)
            if done.all() or step == max_new_tokens - 1:
                break
            last, state = self._decode(next_ids, position, state)
            position = increment(position)
        return state

    # -- text ----------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"model {self.path} has no tokenizer; pass token ids instead")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, starting with the BOS token as OPT and Llama expect."""
        return encode(self._need_tokenizer(), self.cfg, text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(list(ids), skip_special_tokens=True)
