"""``flashjax serve``: an OpenAI-compatible HTTP server for one loaded model (starlette and
uvicorn, the ``serve`` extra).

``POST /v1/completions`` and ``POST /v1/chat/completions`` (with ``stream``: server-sent
events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /health``. Requests are served one at a time, in arrival
order (an asyncio lock); the model runs in one worker thread, so the event loop keeps
answering while it computes. A streaming client that disconnects stops its generation: the
token generator is not advanced again. Errors are OpenAI's shape, ``{"error": {"message",
"type", "param", "code"}}``, with a message that names the field.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from flashjax.chat import ChatFormat, TextStream

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Fields that would change what is returned and are not implemented: (name, its neutral
# values). Any other unknown field is ignored.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"})}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A request that cannot be served: answered with ``status`` and OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = \
            message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """One request's generation options, checked."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Job:
    """A checked request: its prompt ids, sampling, stop strings (the request's and the chat
    format's), whether the reply's leading spaces go, and the response's common fields."""

    chat: bool
    ids: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    strip: bool
    head: dict


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _get(body: dict, name: str, kind: str, default=None, *, check=None, why: str = ""):
    """``body[name]`` (``default`` when absent or null), of ``kind`` ("int", "number",
    "bool", "str") and passing ``check``; else a ``RequestError`` naming the field."""
    value = body.get(name)
    if value is None:
        return default
    ok = {"int": _is_int(value), "number": _is_int(value) or isinstance(value, float),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}[kind]
    article = "an" if kind == "int" else "a"
    if not ok:
        raise RequestError(f"'{name}' must be {article} {kind}{why}, got "
                           f"{json.dumps(value)[:80]}", name)
    if check is not None and not check(value):
        raise RequestError(f"'{name}' must be {why.strip(' ,')}, got {value!r}", name)
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("'stop' must be a non-empty string or a list of them", "stop")
    return tuple(stop)


class Server:
    """The endpoints' logic over one model (``create_app`` routes to it). A request's prompt
    and ``max_tokens`` together may take ``limit`` tokens: the model's, at most a flash
    model's reserved KV slots + 1 (the last token is never fed back), at most
    ``max_context``."""

    def __init__(self, model, *, name: str, chat_format: ChatFormat | None = None,
                 max_context: int | None = None):
        if model.tokenizer is None:
            raise ValueError(f"model {model.path} has no tokenizer; the server needs one")
        self.model, self.name = model, name
        self.chat_format = chat_format or ChatFormat.from_model_dir(model.path)
        cfg = model.cfg
        # prompt + max_tokens: within the positions, and (flash) the KV slots reserved for the
        # prompt and every new token but the last
        self.limit = cfg.max_sequence if model.max_slots is None else \
            min(cfg.max_sequence, model.max_slots + 1)
        if max_context is not None:
            self.limit = min(self.limit, max_context)
        self.created = int(time.time())
        self.lock = asyncio.Lock()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="flashjax-model")

    # -- requests ------------------------------------------------------------------------------
    def sampling(self, body: dict, prompt_tokens: int, default_max_tokens: int) -> Sampling:
        for name, neutral in UNSUPPORTED.items():
            if name in body and body[name] not in neutral:
                raise RequestError(f"'{name}' is not supported by this server", name)
        n = _get(body, "n", "int", 1)
        if n != 1:
            raise RequestError(f"'n' must be 1 (one choice per request), got {n}", "n")
        _get(body, "model", "str")  # any name is accepted: the one loaded model answers
        max_tokens = _get(body, "max_completion_tokens", "int", None, check=lambda v: v >= 1,
                          why=" >= 1")
        max_tokens = _get(body, "max_tokens", "int", max_tokens, check=lambda v: v >= 1,
                          why=" >= 1")
        if max_tokens is None:
            max_tokens = max(1, default_max_tokens)
        if prompt_tokens + max_tokens > self.limit:
            raise RequestError(
                f"the prompt's {prompt_tokens} tokens + max_tokens {max_tokens} exceed the "
                f"context limit of {self.limit} tokens", "max_tokens",
                code="context_length_exceeded")
        temperature = _get(body, "temperature", "number", 1.0, check=lambda v: 0 <= v <= 2,
                           why=" in [0, 2]")
        top_p = _get(body, "top_p", "number", 1.0, check=lambda v: 0 < v <= 1,
                     why=" in (0, 1]")
        top_k = _get(body, "top_k", "int", 0, check=lambda v: v >= 0, why=" >= 0")
        seed = _get(body, "seed", "int", None)
        seed = secrets.randbits(32) if seed is None else seed % 2**32
        stream = _get(body, "stream", "bool", False)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        include_usage = _get(options, "include_usage", "bool", False)
        return Sampling(max_tokens=max_tokens, temperature=float(temperature),
                        top_p=float(top_p), top_k=top_k, seed=seed, stop=_stop_strings(body),
                        stream=stream, include_usage=include_usage and stream)

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self.model.encode(prompt)
        if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            vocab = self.model.cfg.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise RequestError(f"'prompt' token ids must be in [0, {vocab})", "prompt")
            return prompt
        if prompt is None:
            raise RequestError("'prompt' is required", "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
            raise RequestError("'prompt' must be one prompt: this server takes one per request",
                               "prompt")
        raise RequestError("'prompt' must be a string or a list of token ids", "prompt")

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if messages is None:
            raise RequestError("'messages' is required", "messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list of messages", "messages")
        plain = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise RequestError(f"'{where}' must be an object with 'role' and 'content'",
                                   where)
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise RequestError(f"'{where}.role' must be one of {sorted(ROLES)}, got "
                                   f"{json.dumps(role)}", f"{where}.role")
            if isinstance(content, list):  # content parts: the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and
                           isinstance(p.get("text"), str) for p in content):
                    raise RequestError(f"'{where}.content' parts must be text parts "
                                       f"({{\"type\": \"text\", \"text\": ...}})",
                                       f"{where}.content")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise RequestError(f"'{where}.content' must be a string", f"{where}.content")
            plain.append({"role": ROLES[role], "content": content})
        try:
            text = self.chat_format.render(plain)
        except ValueError as e:
            raise RequestError(str(e), "messages") from None
        return self.chat_format.encode(self.model, text)

    def job(self, body: dict, chat: bool) -> Job:
        """What a request asks for, checked (``RequestError`` otherwise)."""
        fmt = self.chat_format
        ids = self.chat_prompt(body) if chat else self.completion_prompt(body)
        default = self.limit - len(ids) if chat else COMPLETIONS_MAX_TOKENS
        s = self.sampling(body, len(ids), default)
        stop, strip = (fmt.stop, fmt.strip_reply) if chat else ((), False)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.name}
        return Job(chat=chat, ids=ids, sampling=s, stop=(*s.stop, *stop), strip=strip,
                   head=head)

    # -- generation: the model runs on the worker thread, one request at a time ----------------
    def _tokens(self, job: Job):
        s = job.sampling
        return self.model.stream(job.ids, s.max_tokens, temperature=s.temperature,
                                 top_p=s.top_p, top_k=s.top_k, seed=s.seed, stop_at_eos=True)

    def _generate(self, job: Job, text: TextStream) -> tuple[str, int]:
        """The whole reply into ``text``: (finish_reason, tokens generated)."""
        tokens, n, finish = self._tokens(job), 0, "length"
        for token in tokens:
            n += 1
            text.push(token)
            if text.stopped:
                tokens.close()
                return "stop", n
            if token == self.model.cfg.eos_token_id:
                finish = "stop"
        text.finish()
        return finish, n

    async def respond(self, job: Job) -> dict:
        """The response to a request without ``stream``."""
        text = TextStream(self.model.decode, job.stop, strip=job.strip)
        async with self.lock:
            loop = asyncio.get_running_loop()
            finish, n = await loop.run_in_executor(self.worker, self._generate, job, text)
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text.text}} if job.chat
                      else {"text": text.text})
        return {**job.head, "choices": [choice], "usage": _usage(len(job.ids), n)}

    async def events(self, job: Job):
        """The server-sent events of a request with ``stream``. Each token is computed only
        when the previous event has been sent: once this generator is closed (the client
        went away) the generation goes no further."""
        text = TextStream(self.model.decode, job.stop, strip=job.strip)
        usage = _usage(len(job.ids))
        if job.chat:
            yield self._chunk(job, {"role": "assistant", "content": ""}, None)
        async with self.lock:
            loop = asyncio.get_running_loop()
            tokens, finish = self._tokens(job), "length"
            try:
                while (token := await loop.run_in_executor(self.worker, next, tokens, None)) \
                        is not None:
                    usage["completion_tokens"] += 1
                    piece = text.push(token)
                    if piece:
                        yield self._chunk(job, piece, None)
                    if text.stopped:
                        finish = "stop"
                        break
                    if token == self.model.cfg.eos_token_id:
                        finish = "stop"
                piece = text.finish()
            except Exception as e:  # after the headers: the error goes in the stream
                yield _event({"error": {"message": f"generation failed: {e}",
                                        "type": "server_error", "param": None, "code": None}})
                return
            finally:  # behind any step still running there: one thread, in order
                self.worker.submit(tokens.close)
        if piece:
            yield self._chunk(job, piece, None)
        yield self._chunk(job, None, finish)
        if job.sampling.include_usage:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield _event({**job.head, "object": _chunk_object(job), "choices": [],
                          "usage": usage})
        yield "data: [DONE]\n\n"

    @staticmethod
    def _chunk(job: Job, piece, finish: str | None) -> str:
        if job.chat:
            delta = piece if isinstance(piece, dict) else {} if piece is None else \
                {"content": piece}
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish,
                      "logprobs": None}
        return _event({**job.head, "object": _chunk_object(job), "choices": [choice]})


def _chunk_object(job: Job) -> str:
    return "chat.completion.chunk" if job.chat else "text_completion"


def _usage(prompt_tokens: int, completion_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def create_app(model, *, name: str, chat_format: ChatFormat | None = None,
               max_context: int | None = None):
    """The ASGI application serving ``model`` under ``name`` (``Server``'s arguments)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    server = Server(model, name=name, chat_format=chat_format, max_context=max_context)

    class EventStream(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:  # a client gone while an event was being sent leaves the events open
                await self.body_iterator.aclose()

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def read_body(request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": server.created,
                "owned_by": "flashjax", "context_length": server.limit}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request):
        if request.path_params["model"] != name:
            return error(RequestError(f"model {request.path_params['model']!r} is not served "
                                      f"here; this server serves {name!r}", "model",
                                      status=404, code="model_not_found"))
        return JSONResponse(model_card())

    async def health(request):
        return JSONResponse({"status": "ok", "model": name})

    def endpoint(chat: bool):
        async def handle(request):
            try:
                job = server.job(await read_body(request), chat)
            except RequestError as e:
                return error(e)
            except ValueError as e:  # what the model refuses (ids, lengths) names the value
                return error(RequestError(str(e)))
            if job.sampling.stream:
                return EventStream(server.events(job), media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache"})
            return JSONResponse(await server.respond(job))
        return handle

    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(RequestError(f"{request.method} {request.url.path}: {exc.detail}",
                                  status=exc.status_code, kind=kind))

    async def internal_error(request, exc: Exception):
        return error(RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                  kind="server_error"))

    routes = [Route("/v1/completions", endpoint(False), methods=["POST"]),
              Route("/v1/chat/completions", endpoint(True), methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model:path}", one_model, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                       Exception: internal_error})
    app.state.server = server
    return app


def serve(model, *, name: str, host: str = "127.0.0.1", port: int = 8000,
          max_context: int | None = None, log_level: str = "info") -> None:
    """Serve ``model`` until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, name=name, max_context=max_context), host=host, port=port,
                log_level=log_level)
