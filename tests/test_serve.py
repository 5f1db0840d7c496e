"""flashjax serve: the OpenAI-compatible endpoints, driven by the real openai client against a
server started here on 127.0.0.1, on a flash-backed tiny model; malformed requests and a
client that disconnects mid-stream over plain HTTP."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

import flashjax
from flashjax.chat import PLAIN_STOP
from flashjax.testing import synthetic_hf_checkpoint, tiny_opt_config
from tests.test_predictor import save_word_tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

PROMPT = "the river runs under the old stone"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A sparse random OPT with a word tokenizer, flash-backed (oracle) at 60%."""
    root = tmp_path_factory.mktemp("serve")
    cfg = tiny_opt_config(vocab_size=300, hidden_size=64, ffn_dim=512)
    synthetic_hf_checkpoint(root / "hf", cfg, ffn_active=0.1)
    save_word_tokenizer(root / "hf")
    flashjax.convert(root / "hf", root / "fj", progress=False)
    return flashjax.load(root / "fj", dram_budget=0.6, predictor="oracle", max_context=128)


@pytest.fixture(scope="module")
def port(model):
    from flashjax.serve import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(model, name="tiny"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                         max_retries=0, timeout=60)


def greedy_text(model, ids, n):
    return model.decode(model.generate(ids, n))


def post(port, path, body, timeout=60):
    """(status, parsed JSON) of a POST with ``body`` (bytes as they are, else JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def test_completions_equal_generate(model, client):
    ids = model.encode(PROMPT)
    want = model.generate(ids, 12)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    (choice,) = r.choices
    assert choice.text == model.decode(want) and r.model == "tiny"
    assert choice.finish_reason == ("stop" if want[-1] == model.cfg.eos_token_id else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    assert r.usage.total_tokens == len(ids) + len(want)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want)
    # token ids as the prompt; any model name is answered by the one model served
    r = client.completions.create(model="other", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == choice.text and r.model == "tiny"


def test_chat_completions(model, client):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "where does the river run"}]
    ids = model.encode("System: be brief\nUser: where does the river run\nAssistant:")
    text = greedy_text(model, ids, 10)
    want = text[:text.find(PLAIN_STOP)] if PLAIN_STOP in text else text
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.lstrip()
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.lstrip()
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings(model, client):
    text = greedy_text(model, model.encode(PROMPT), 16)
    stop = next(t for t in (model.decode([i]) for i in model.generate(model.encode(PROMPT), 16))
                if t.isascii() and t.strip() and text.find(t) > 0)
    want = text[:text.find(stop)]
    for given in (stop, ["never appears", stop]):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                      temperature=0, stop=given)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
        chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                                temperature=0, stop=given, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling(model, client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    first = sample(5)
    assert sample(5) == first
    assert first == model.decode(model.generate(model.encode(PROMPT), 12, temperature=1.0,
                                                top_p=0.9, seed=5))
    assert sample(6) != first


BAD = [
    (b"{not json", "/v1/completions", None, "not valid JSON"),
    (b"[1, 2]", "/v1/completions", None, "must be a JSON object"),
    ({"model": "tiny"}, "/v1/completions", "prompt", "'prompt' is required"),
    ({"prompt": 7}, "/v1/completions", "prompt", "'prompt' must be a string"),
    ({"prompt": ["a", "b"]}, "/v1/completions", "prompt", "one per request"),
    ({"prompt": [1, 100000]}, "/v1/completions", "prompt", "token ids must be in [0, 300)"),
    ({"prompt": "a", "max_tokens": "ten"}, "/v1/completions", "max_tokens",
     "'max_tokens' must be an int"),
    ({"prompt": "a", "max_tokens": 0}, "/v1/completions", "max_tokens", ">= 1"),
    ({"prompt": "a", "max_tokens": 1000}, "/v1/completions", "max_tokens",
     "exceed the context limit of 128 tokens"),
    ({"prompt": "a", "temperature": "hot"}, "/v1/completions", "temperature",
     "'temperature' must be a number"),
    ({"prompt": "a", "top_p": 0}, "/v1/completions", "top_p", "in (0, 1]"),
    ({"prompt": "a", "stop": 5}, "/v1/completions", "stop", "'stop' must be"),
    ({"prompt": "a", "stream": "yes"}, "/v1/completions", "stream", "'stream' must be a bool"),
    ({"prompt": "a", "n": 2}, "/v1/completions", "n", "'n' must be 1"),
    ({"prompt": "a", "logprobs": 3}, "/v1/completions", "logprobs", "not supported"),
    ({"model": "tiny"}, "/v1/chat/completions", "messages", "'messages' is required"),
    ({"messages": "hi"}, "/v1/chat/completions", "messages", "non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "/v1/chat/completions",
     "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "/v1/chat/completions",
     "messages[0].content", "must be a string"),
]


def test_malformed_requests_get_4xx_json_naming_the_field(port):
    for body, path, param, message in BAD:
        status, out = post(port, path, body)
        assert status == 400, (body, out)
        error = out["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert message in error["message"] and error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/v1/nothing")
    resp = conn.getresponse()
    assert resp.status == 404 and "Not Found" in json.loads(resp.read())["error"]["message"]


def test_models_and_health(port, client):
    (card,) = client.models.list().data
    assert card.id == "tiny" and client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.models.retrieve("gpt-4")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read()) == {"status": "ok", "model": "tiny"}


def test_disconnect_mid_stream_stops_generation(model, port, client, monkeypatch):
    """The client leaves after two events: no further token is computed; meanwhile the event
    loop answers; the next request is served."""
    assert len(model.generate(model.encode(PROMPT), 100)) == 100  # no end token early
    decodes = []
    real = model._decode

    def slow_decode(*args):
        decodes.append(time.perf_counter())
        time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(model, "_decode", slow_decode)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True}).encode(),
        {"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = 0
    while events < 2:
        events += resp.readline().startswith(b"data: ")
    t0 = time.perf_counter()
    health = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    health.request("GET", "/health")
    assert health.getresponse().status == 200
    assert time.perf_counter() - t0 < 2.0  # answered while the model computes (5 s)
    resp.close()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    time.sleep(0.5)
    seen = len(decodes)
    time.sleep(0.5)
    assert len(decodes) == seen < 50  # stopped, long before max_tokens
    monkeypatch.undo()
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert r.choices[0].text == greedy_text(model, model.encode(PROMPT), 8)


def test_requests_are_served_one_at_a_time(model, client, monkeypatch):
    calls = []
    real_prefill, real_decode = model._prefill, model._decode
    monkeypatch.setattr(model, "_prefill", lambda *a: (calls.append("p"), real_prefill(*a))[1])
    monkeypatch.setattr(model, "_decode", lambda *a: (calls.append("d"), real_decode(*a))[1])
    results = [None, None]

    def run(i):
        chunks = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6,
                                           temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.undo()
    want = model.generate(model.encode(PROMPT), 6)
    assert results == [model.decode(want)] * 2
    steps = "p" + "d" * (len(want) - 1)
    assert "".join(calls) == steps * 2  # one generation after the other, never interleaved
