"""``Conversation``: one token sequence continued turn by turn over a kept state.

Each turn feeds only what the state does not hold yet (the previous reply's last token, which
was sampled but never fed, and the turn's new tokens) at the positions that follow, then
samples the reply exactly as ``Model.generate`` does: greedy tokens equal those of one
``generate`` over the whole history. The state (the KV cache, and for a flash-backed model
the neuron buffers and their index) is allocated once, for ``limit`` tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flashjax.runtime import _round_up


class ContextLimitError(ValueError):
    """A turn that would take the conversation past its ``limit`` tokens."""


class Conversation:
    """A conversation with ``model``; see ``Model.conversation``.

    ``send(ids, max_new_tokens)`` adds tokens and returns a generator of the reply's tokens;
    ``tokens`` is the whole history (prompts and replies), ``cached`` how many of them the
    state holds, ``limit`` the most tokens the conversation may hold; ``truncate(n)`` drops
    everything after the first n tokens (a stop string's tokens, say), ``reset()`` all;
    ``close()`` hands the state's memory back to the model. Until then the state is the
    conversation's: other calls on a flash-backed model allocate neuron buffers of their own.
    """

    def __init__(self, model, max_context: int | None = None):
        cfg = model.cfg
        limit = cfg.max_sequence
        if model.max_slots is not None and model.max_slots < limit:
            limit = model.max_slots
            where = f"the max_context of {limit} it was loaded with"
        else:
            where = f"the model's {cfg.sequence_limit}"
        if max_context is not None:
            if not 1 <= max_context <= limit:
                raise ValueError(f"max_context {max_context} must be in [1, {limit}] "
                                 f"({where})")
            limit = max_context
        self.model, self.limit = model, limit
        self.tokens: list[int] = []
        self.cached = 0
        # right padding of a prefill may write up to prompt_bucket - 1 slots past the limit
        self._slots = model._slots(limit + model.prompt_bucket - 1)
        self._state = model.init_state(1, self._slots)
        self._reply = None  # the generator of the reply in progress

    @property
    def room(self) -> int:
        """Tokens the conversation can still take."""
        return self.limit - len(self.tokens)

    def send(self, ids, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True):
        """Add ``ids`` (may be empty after the first turn: the reply continues) and return a
        generator that yields each reply token as it is chosen, options as
        ``Model.generate``'s. Checked now, run as the generator is advanced; a reply still in
        progress ends here. Raises ``ContextLimitError`` when the history, ``ids`` and
        ``max_new_tokens`` together exceed ``limit``, changing nothing."""
        ids = [int(t) for t in ids]
        if ids:
            self.model._check_ids([ids])
        elif not self.tokens:
            raise ValueError("the first turn needs at least one token")
        self.model._check_sampling(max_new_tokens, temperature, top_k, top_p)
        need = len(self.tokens) + len(ids) + max_new_tokens
        if need > self.limit:
            raise ContextLimitError(
                f"this turn needs {need} tokens ({len(self.tokens)} in the conversation, "
                f"{len(ids)} new, max_new_tokens {max_new_tokens}), more than the context "
                f"limit of {self.limit}; truncate or reset the conversation")
        self._end_reply()
        self.tokens.extend(ids)
        self._reply = self._run(max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos)
        return self._reply

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens (the state forgets the rest)."""
        if not 0 <= length <= len(self.tokens):
            raise ValueError(f"length {length} is outside [0, {len(self.tokens)}]")
        self._end_reply()
        del self.tokens[length:]
        if length < self.cached and self._state is not None:
            self._state = self.model._rewind(self._state, length)
        self.cached = min(self.cached, length)

    def reset(self) -> None:
        """Forget the whole conversation (the state's memory is kept for the next one)."""
        self.truncate(0)

    def close(self) -> None:
        self._end_reply()
        if self._state is not None:
            self.model._finish(self._state)
            self._state = None

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _end_reply(self) -> None:
        if self._reply is not None:
            self._reply.close()  # stops at its last yield: the state it left is whole
            self._reply = None

    def _run(self, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos):
        model = self.model
        if self._state is None:  # closed, or a step failed midway (its state was donated)
            self._state, self.cached = model.init_state(1, self._slots), 0
        state, self._state = self._state, None  # each step donates it
        last, state = self._prefill(state, self.tokens[self.cached:])
        self.cached = len(self.tokens)
        steps = model._sample(last, state, np.array([self.cached], np.int32), max_new_tokens,
                              temperature, top_k, top_p, seed, stop_at_eos)
        for host_ids, _, state in steps:
            self.tokens.append(int(host_ids[0]))
            # the state holds every token but the one just chosen (fed by the next step)
            self._state, self.cached = state, len(self.tokens) - 1
            yield self.tokens[-1]
            self._state = None
        self._state = state

    def _prefill(self, state, feed: list[int]):
        """``feed`` after the ``cached`` tokens, right-padded to the model's prompt bucket:
        (the logits after its last token [1, V], the state holding it)."""
        n = len(feed)
        width = _round_up(n, self.model.prompt_bucket)
        tokens = np.full((1, width), self.model.cfg.pad_token_id, np.int32)
        tokens[0, :n] = feed
        valid = np.arange(width)[None] < n
        # padding repeats the last position: never past the model's limit
        positions = (self.cached + np.minimum(np.arange(width), n - 1))[None].astype(np.int32)
        logits, state = self.model._prefill(jnp.asarray(tokens), jnp.asarray(positions),
                                            jnp.asarray(valid), state)
        # the padding's slots are free again: the next write starts after the real tokens
        return logits[:, n - 1], self.model._rewind(state, self.cached + n)
