"""Chat: how messages become a prompt (``ChatFormat``), a reply's text as its tokens arrive
(``TextStream``), and the interactive loop of ``flashjax chat`` (``chat_loop``).

``flashjax serve``'s chat endpoint and ``flashjax chat`` share the first two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Sequence

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"


class ChatFormat:
    """The prompt text of a list of messages ``{"role": ..., "content": str}``.

    With a chat template (``tokenizer_config.json``'s ``chat_template``, or a
    ``chat_template.jinja`` beside it) it is rendered with jinja2 as transformers'
    ``apply_chat_template`` does (``messages``, ``add_generation_prompt``, ``bos_token``,
    ``eos_token``) and tokenized without added special tokens. Without one the plain format::

        System: <content>        (each system message)
        User: <content>
        Assistant: <content>
        User: <content>
        Assistant:

    tokenized after the model's BOS token; replies then stop at a new line starting "User:"
    (``stop``) and their leading spaces are dropped (``strip_reply``).
    """

    def __init__(self, template: str | None = None, *, bos_token: str = "",
                 eos_token: str = ""):
        self.template_source = template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = None if template is None else _compile(template)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ChatFormat:
        """The model directory's chat template, if it has one; else the plain format."""
        model_dir = Path(model_dir)
        config = {}
        if (model_dir / "tokenizer_config.json").exists():
            config = json.loads((model_dir / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        if (model_dir / "chat_template.jinja").exists():
            template = (model_dir / "chat_template.jinja").read_text()
        return cls(template, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")))

    @property
    def plain(self) -> bool:
        return self._template is None

    @property
    def name(self) -> str:
        return "plain (User: / Assistant:)" if self.plain else "the model's chat template"

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings every reply in this format ends at."""
        return (PLAIN_STOP,) if self.plain else ()

    @property
    def strip_reply(self) -> bool:
        return self.plain

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The text of ``messages``, followed (``add_generation_prompt``) by what opens the
        assistant's reply. A template's ``raise_exception`` raises ``ValueError``."""
        for i, m in enumerate(messages):
            if not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
                raise ValueError(f"messages[{i}] needs a string 'role' and 'content'")
        if self.plain:
            text = "".join(f"{PLAIN_ROLES.get(m['role'], m['role'].title())}: "
                           f"{m['content']}\n" for m in messages)
            return text + ("Assistant:" if add_generation_prompt else "")
        import jinja2

        try:
            return self._template.render(messages=list(messages), bos_token=self.bos_token,
                                         eos_token=self.eos_token,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None

    def encode(self, model, text: str, *, start: bool = True) -> list[int]:
        """``text``'s token ids: at the ``start`` of a conversation the plain format adds BOS
        (a template writes its own special tokens); continuations add nothing."""
        if self.plain and start:
            return model.encode(text)
        return model._need_tokenizer().encode(text, add_special_tokens=False).ids

    def continuation(self, messages: Sequence[dict], user: dict) -> str | None:
        """The text that follows the content of the last message (the assistant's reply) to
        add ``user`` and open the next reply, as ``render`` writes the whole conversation;
        None where the template does not write it as a continuation of what it wrote
        before."""
        prefix = self.render(messages[:-1], add_generation_prompt=True)
        before = self.render(messages, add_generation_prompt=False)
        after = self.render([*messages, user], add_generation_prompt=True)
        if not (before.startswith(prefix) and after.startswith(before)):
            return None
        content = messages[-1]["content"]
        at = before.find(content, len(prefix))
        return None if at < 0 else before[at + len(content):] + after[len(before):]


def _token_text(token) -> str:
    """A special token as tokenizer_config.json writes it (a string or an AddedToken dict)."""
    if isinstance(token, dict):
        return token.get("content", "")
    return token or ""


def _compile(source: str):
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("the model's chat template needs jinja2: pip install "
                          "'flashjax[serve]' (or jinja2)") from None

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: \
        json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


class TextStream:
    """A reply's text as its tokens arrive.

    ``push(token_id)`` returns the text that became final with it: none while a character's
    bytes are incomplete, or while the text ends in what may begin a stop string. Once a stop
    string appears, ``stopped`` is set and the text ends before it. ``finish()`` returns
    what is still held back when the reply ends otherwise. ``text`` is everything returned
    (with ``strip``, leading whitespace is dropped).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), *,
                 strip: bool = False):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._decode, self.stop, self.strip = decode, tuple(stop), strip
        self.ids: list[int] = []
        self.raw = ""  # the decoded text released so far, before stripping
        self.stopped = False

    @property
    def text(self) -> str:
        return self.raw.lstrip() if self.strip else self.raw

    def push(self, token: int) -> str:
        if self.stopped:
            raise ValueError("the reply already stopped at a stop string")
        self.ids.append(int(token))
        full = self._decode(self.ids)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(full[:min(hits)])
        if full.endswith("\ufffd"):  # a character whose bytes are still to come
            return ""
        held = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])),
                   default=0)
        return self._release(full[:len(full) - held])

    def finish(self) -> str:
        """The rest of the text, when the reply ended without a stop string."""
        return "" if self.stopped else self._release(self._decode(self.ids))

    def kept(self) -> tuple[int, str]:
        """(how many of the tokens lie wholly before the stop string, the released text that
        they do not cover): all tokens and "" unless ``stopped``."""
        if not self.stopped:
            return len(self.ids), ""
        for n in range(len(self.ids), -1, -1):
            covered = self._decode(self.ids[:n]) if n else ""
            if self.raw.startswith(covered) and not covered.endswith("\ufffd"):
                return n, self.raw[len(covered):]
        return 0, self.raw

    def _release(self, upto: str) -> str:
        if not upto.startswith(self.raw):  # (a decoding that rewrote earlier text: wait)
            return ""
        before, self.raw = self.text, upto
        return self.text[len(before):]


def _read_line(stdin, prompt: str) -> str | None:
    """One line of input, None at end of input; ``input`` (line editing) on a terminal."""
    if stdin.isatty():
        try:
            return input(prompt)
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def _turn_ids(model, conversation, fmt: ChatFormat, messages, user: dict, gap: str):
    """The ids to send for ``user``'s message: what follows the tokens already in the
    conversation (``gap``: reply text its kept tokens do not cover); everything again for a
    first turn or a template that rewrites the past (the conversation then starts over)."""
    text = fmt.continuation(messages, user) if conversation.tokens else None
    if text is None:
        conversation.reset()
        return fmt.encode(model, fmt.render([*messages, user]))
    eos = model.cfg.eos_token_id
    eos_text = model._need_tokenizer().id_to_token(eos)
    if conversation.tokens[-1] == eos and eos_text and text.startswith(eos_text):
        text = text[len(eos_text):]  # the reply's own end token closed it already
    return fmt.encode(model, gap + text, start=False)


def _print_reply(model, conversation, fmt: ChatFormat, ids, max_new_tokens: int, out,
                 **options) -> TextStream:
    """Send ``ids`` and print the reply as its tokens come; a stop string ends it, and its
    tokens leave the conversation. Returns the reply's ``TextStream``."""
    begin = len(conversation.tokens) + len(ids)
    stream = TextStream(model.decode, fmt.stop, strip=fmt.strip_reply)
    for token in conversation.send(ids, max_new_tokens, **options):
        out.write(stream.push(token))
        out.flush()
        if stream.stopped:
            break
    out.write(stream.finish() + "\n")
    out.flush()
    conversation.truncate(begin + stream.kept()[0])
    return stream


def chat_loop(model, conversation, fmt: ChatFormat, *, max_new_tokens: int,
              system: str | None = None, stdin=None, out=None, err=None,
              **sampling) -> int:
    """``flashjax chat``: read a message per line, print the reply as it is produced,
    keeping ``conversation``'s state between turns. ``/reset`` starts over, ``/exit``, end of
    input or Ctrl-C ends. ``sampling``: ``Conversation.send``'s options; turn t samples with
    ``seed + t``. Returns the exit status."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    start = [{"role": "system", "content": system}] if system else []
    messages, gap, turn = list(start), "", 0
    seed = sampling.pop("seed", 0)
    print(f"[context limit {conversation.limit} tokens, prompt format {fmt.name}; /reset "
          f"starts over, /exit or Ctrl-D ends]", file=err)
    try:
        while True:
            line = _read_line(stdin, "> ")
            if line is None or line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip() == "/reset":
                conversation.reset()
                messages, gap = list(start), ""
                print("[conversation cleared]", file=err)
                continue
            if not line.strip():
                continue
            user = {"role": "user", "content": line}
            try:
                ids = _turn_ids(model, conversation, fmt, messages, user, gap)
            except ValueError as e:  # what a chat template raises, say
                print(f"[{e}]", file=err)
                continue
            room = conversation.room - len(ids)
            if room < 1:
                print(f"[that message needs {len(ids)} tokens, but only {conversation.room} "
                      f"of the context limit of {conversation.limit} are left; /reset starts "
                      f"over]", file=err)
                continue
            n = min(max_new_tokens, room)
            stream = _print_reply(model, conversation, fmt, ids, n, out, seed=seed + turn,
                                  **sampling)
            gap = stream.kept()[1]
            messages += [user, {"role": "assistant", "content": stream.text}]
            turn += 1
            cut = len(stream.ids) == n and stream.ids[-1] != model.cfg.eos_token_id
            if cut and not stream.stopped and n < max_new_tokens:
                print(f"[the context limit of {conversation.limit} tokens is reached; /reset "
                      f"starts over]", file=err)
    except KeyboardInterrupt:
        out.write("\n")
        return 0
