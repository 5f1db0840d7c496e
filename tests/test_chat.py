"""Conversations: turns continue from the kept state (the same greedy tokens as one generate
over the whole history, prefilling only the new tokens), the context limit, chat formats,
reply text with stop strings, and ``flashjax chat`` driven through stdin."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

import flashjax
from flashjax.chat import ChatFormat, TextStream
from flashjax.cli import main
from flashjax.conversation import ContextLimitError
from flashjax.testing import synthetic_hf_checkpoint, tiny_opt_config
from tests.test_predictor import save_word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A sparse random OPT with a word tokenizer."""
    root = tmp_path_factory.mktemp("chat")
    cfg = tiny_opt_config(vocab_size=300, hidden_size=64, ffn_dim=512)
    synthetic_hf_checkpoint(root / "hf", cfg, seed=4, ffn_active=0.1)
    save_word_tokenizer(root / "hf")
    flashjax.convert(root / "hf", root / "fj", progress=False)
    return root / "fj"


@pytest.fixture(scope="module")
def models(model_dir):
    return {"dense": flashjax.load(model_dir, progress=False),
            "flash": flashjax.load(model_dir, dram_budget=0.6, predictor="oracle",
                                   max_context=96)}


def record_prefills(model, monkeypatch) -> list:
    """Each prefill's (positions of its real tokens) from now on."""
    seen = []
    real = model._prefill

    def prefill(tokens, positions, valid, state):
        seen.append(np.asarray(positions)[np.asarray(valid)].tolist())
        return real(tokens, positions, valid, state)

    monkeypatch.setattr(model, "_prefill", prefill)
    return seen


@pytest.mark.parametrize("kind", ["dense", "flash"])
def test_turns_equal_one_generate_over_the_history(models, kind, monkeypatch):
    model = models[kind]
    turns = [([2, 11, 22, 33, 44], 6), ([55, 66, 77], 5), ([88], 7)]
    prefills = record_prefills(model, monkeypatch)
    with model.conversation() as conv:
        history, replies = [], []
        for ids, n in turns:
            replies.append(list(conv.send(ids, n, stop_at_eos=False)))
            history += ids + replies[-1]
            assert conv.tokens == history and conv.cached == len(history) - 1
        # each turn prefilled only what the state lacked: the last reply token, then its own
        starts = [0, 5 + 6 - 1, 5 + 6 + 3 + 5 - 1]
        assert prefills == [list(range(s, s + w)) for s, w in zip(starts, (5, 1 + 3, 1 + 1))]
        # a conversation cut back continues from the cut
        conv.truncate(8)
        again = list(conv.send([99, 98], 4, stop_at_eos=False))
        # a reply stopped early keeps what it produced; the next turn continues after it
        partial = conv.send([12], 6, stop_at_eos=False)
        early = [next(partial), next(partial)]
        last = list(conv.send([13], 3, stop_at_eos=False))
    monkeypatch.undo()
    for i, (ids, n) in enumerate(turns):
        before = sum((t[0] + r for t, r in zip(turns[:i], replies)), [])
        assert replies[i] == model.generate(before + ids, n, stop_at_eos=False)
    cut = history[:8] + [99, 98]
    assert again == model.generate(cut, 4, stop_at_eos=False)
    assert early == model.generate(cut + again + [12], 2, stop_at_eos=False)
    assert last == model.generate(cut + again + [12] + early + [13], 3, stop_at_eos=False)


def test_context_limit_is_stated_and_enforced(models):
    dense, flash = models["dense"], models["flash"]
    assert dense.conversation().limit == dense.cfg.max_sequence == 128
    with flash.conversation() as conv:
        assert conv.limit == 96  # what its budget reserved KV slots for
    with pytest.raises(ValueError, match=r"max_context 100 must be in \[1, 96\] \(the "
                                         r"max_context of 96 it was loaded with\)"):
        flash.conversation(max_context=100)
    conv = dense.conversation(max_context=20)
    reply = list(conv.send([2, 5, 6, 7], 10, stop_at_eos=False))
    with pytest.raises(ContextLimitError, match=r"this turn needs 22 tokens \(14 in the "
                                                r"conversation, 3 new, max_new_tokens 5\), "
                                                r"more than the context limit of 20"):
        conv.send([8, 9, 10], 5)
    assert conv.tokens == [2, 5, 6, 7] + reply and conv.room == 6  # unchanged
    conv.reset()
    assert conv.tokens == [] and list(conv.send([2, 5, 6, 7], 10, stop_at_eos=False)) == reply
    with pytest.raises(ValueError, match="first turn needs at least one token"):
        dense.conversation().send([], 3)


def test_text_stream_holds_back_what_may_start_a_stop_string():
    pieces = ["He", "llo", " Us", "er", ": no"]
    stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), ["\nUser:", " Use"],
                        strip=False)
    assert [stream.push(i) for i in range(2)] == ["He", "llo"]
    assert stream.push(2) == "" and stream.push(3) == "" and stream.stopped  # " Use" hit
    assert stream.text == "Hello" and stream.kept() == (2, "")
    stream = TextStream(lambda ids: "".join(["  a\n", "Us", "er:", " b"][i] for i in ids),
                        ["\nUser:"], strip=True)
    assert [stream.push(i) for i in range(3)] == ["a", "", ""] and stream.stopped
    assert stream.text == "a" and stream.kept() == (0, "  a")  # token 0 holds the "\n" too
    stream = TextStream(lambda ids: ["a", "a\ufffd", "a\u00e9"][len(ids) - 1])
    assert [stream.push(i) for i in range(3)] == ["a", "", "\u00e9"]  # a character completed
    stream = TextStream(lambda ids: "a\n"[:len(ids)], ["\nUser:"])
    assert [stream.push(i) for i in range(2)] == ["a", ""] and stream.finish() == "\n"


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_formats(tmp_path):
    plain = ChatFormat.from_model_dir(tmp_path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    assert plain.plain and plain.stop == ("\nUser:",)
    assert plain.render(messages[:2]) == "System: be brief\nUser: hi\nAssistant:"
    assert plain.continuation(messages, {"role": "user", "content": "and?"}) == \
        "\nUser: and?\nAssistant:"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ bos_token }}" + CHATML,
         "bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>"}))
    fmt = ChatFormat.from_model_dir(tmp_path)
    assert not fmt.plain and fmt.stop == ()
    assert fmt.render(messages[1:2]) == "<s><|im_start|>user\nhi<|im_end|>\n" \
                                        "<|im_start|>assistant\n"
    assert fmt.continuation(messages, {"role": "user", "content": "and?"}) == \
        "<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n"
    failing = ChatFormat("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="chat template: roles must alternate"):
        failing.render(messages)


def test_chat_command_keeps_the_conversation(model_dir, monkeypatch, capsys):
    """Two turns through stdin, greedy, flash-backed: each reply is generate's over the whole
    history in the plain format; the second turn sends only its new tokens."""
    from flashjax.conversation import Conversation

    sends = []  # (the history before, the ids sent) per turn
    real = Conversation.send

    def send(self, ids, *args, **kw):
        sends.append((list(self.tokens), list(ids)))
        return real(self, ids, *args, **kw)

    monkeypatch.setattr(Conversation, "send", send)
    monkeypatch.setattr("sys.stdin", io.StringIO("the river\n\nthe stone\n"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "6", "--dram-budget", "60%",
                 "--predictor", "oracle", "--max-context", "100"]) == 0
    out, err = capsys.readouterr()
    assert ("[context limit 100 tokens, prompt format plain (User: / Assistant:); /reset "
            "starts over, /exit or Ctrl-D ends]") in err
    model = flashjax.load(model_dir, progress=False)
    assert sends[0] == ([], model.encode("User: the river\nAssistant:"))
    assert model.decode(sends[1][1]).endswith("\nUser: the stone\nAssistant:")
    assert sends[1][0][:len(sum(sends[0], []))] == sum(sends[0], [])  # the first turn kept
    replies = [model.decode(model.generate(before + ids, 6)).split("\nUser:")[0].lstrip()
               for before, ids in sends]
    assert out == replies[0] + "\n" + replies[1] + "\n"


def test_chat_command_refuses_what_does_not_fit_and_resets(model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(
        "the river runs\nthe stone " + "and the water " * 6 + "\n/reset\nthe river runs\n"
        "/exit\nnever read\n"))
    assert main(["chat", str(model_dir), "--max-new-tokens", "4", "--max-context", "24"]) == 0
    out, err = capsys.readouterr()
    assert "of the context limit of 24 are left; /reset starts over]" in err
    assert "[conversation cleared]" in err
    half = len(out) // 2
    assert out[:half] == out[half:] and out.endswith("\n")  # the first turn again, after /reset
