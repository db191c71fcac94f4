"""OpenAI-compatible HTTP front end of a serving `Backend`.

    from jaxsun.serving.api import serve
    server = serve(backend, port=8000)     # uvicorn in a background thread; port=0: any free
    import openai
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    out = client.completions.create(model="math", prompt="Q: 2+2\\nA:", max_tokens=8,
                                    temperature=0)
    print(out.choices[0].text)
    server.stop()                          # drains in-flight requests, then stops uvicorn

or, blocking (the CLI): `run(backend, host="0.0.0.0", port=8000)`; or from a shell:

    curl -N localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "math", "messages": [{"role": "user", "content": "2+2"}], "stream": true}'

Endpoints:
  POST /v1/completions        OpenAI `text_completion` (and SSE chunks with `stream`).
  POST /v1/chat/completions   OpenAI `chat.completion` / `chat.completion.chunk`.
  GET  /v1/models             every task model, with its `max_model_len`.
  GET  /health                backend.health(): 200, or 503 while draining.
  GET  /metrics               Prometheus text: the backend's metrics, then the API's own.

Sampling fields follow OpenAI's names and defaults (`max_tokens` 16 for completions and
the rest of the context for chat, `temperature` 1.0, `top_p` 1.0); `temperature: 0` is
greedy. Extensions (as in vLLM): `top_k`, `stop_token_ids`, `ignore_eos`,
`add_special_tokens` (default true: a text prompt starts with the tokenizer's BOS, as
jaxsun's pipelines train on; a prompt of token ids is sent as is) and `session_id`
(`Request.session_id`). `stop` strings are matched on the decoded text and the text is
cut before the match. Unsupported options (`n` > 1, `logprobs`, `echo`, `best_of`,
`suffix`, penalties, `logit_bias`, tools) are refused with a 400 naming them, never
silently ignored.

Chat messages are rendered with `default_chat_template` unless `create_app` is given
another (`qa_chat_template` renders jaxsun's task format, "Q: ...\\nA:"):

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}\\n ... <|assistant|>\\n

Every error is OpenAI's JSON body `{"error": {"message", "type", "param", "code"}}`:
400 for a malformed or invalid body (`param` names the field, e.g. "max_tokens" or
"messages[1].role"), 404 for an unknown model, 429 / 503 when the backend is overloaded
or draining (with `Retry-After`), 500 when a request failed. A stream that fails after
its 200 was sent ends with one `data: {"error": {...}}` event and no `[DONE]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

import fastapi
import prometheus_client
import pydantic
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxsun.data.tokenizers import get_tokenizer
from jaxsun.serving.backend import Backend, ModelInfo, RequestHandle
from jaxsun.serving.request import (ContextTooLong, ModelNotFound, Overloaded, Request,
                                    RequestError, RequestFailed, SamplingParams, ServingError)

logger = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
CHAT_ROLES = ("system", "user", "assistant")
# Seconds a client should wait before retrying: a full queue drains quickly; a draining
# server is going away, so try again later (or elsewhere).
RETRY_AFTER_S = {429: 1, 503: 5}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable_error"}


# ---------------------------------------------------------------------------------------
# Chat templates


def default_chat_template(messages: Sequence[dict[str, str]]) -> str:
  """Renders chat messages as `<|role|>\\n{content}\\n` each, then `<|assistant|>\\n`.

  Args:
    messages: validated `{"role", "content"}` dicts, roles in `CHAT_ROLES`.

  Returns:
    The prompt text the model continues (its reply follows `<|assistant|>\\n`).
  """
  turns = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
  return turns + "<|assistant|>\n"


def qa_chat_template(messages: Sequence[dict[str, str]]) -> str:
  """jaxsun's task format (`jaxsun.data.tasks.format_prompt`): system text, then
  `Q: {user}\\nA: {assistant}\\n` turns, ending with `Q: {last user}\\nA:`."""
  parts = []
  for m in messages:
    if m["role"] == "system":
      parts.append(m["content"] + "\n")
    elif m["role"] == "user":
      parts.append(f"Q: {m['content']}\nA:")
    else:
      parts.append(f" {m['content']}\n")
  return "".join(parts)


# ---------------------------------------------------------------------------------------
# Request bodies: pydantic checks the types (strictly: "10" is not an int); the values are
# checked by SamplingParams / Request, whose RequestError names the field.


class _StreamOptions(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(strict=True, extra="ignore")
  include_usage: bool | None = None


class _SamplingBody(pydantic.BaseModel):
  """Fields common to completions and chat completions."""

  model_config = pydantic.ConfigDict(strict=True, extra="ignore")

  model: str
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  stop: Any = None
  stop_token_ids: list[int] | None = None
  seed: int | None = None
  stream: bool | None = None
  stream_options: _StreamOptions | None = None
  n: int | None = None
  ignore_eos: bool | None = None
  add_special_tokens: bool | None = None
  session_id: str | None = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None
  user: str | None = None


class CompletionBody(_SamplingBody):
  """`POST /v1/completions`."""

  prompt: Any
  logprobs: int | None = None
  echo: bool | None = None
  best_of: int | None = None
  suffix: str | None = None


class ChatBody(_SamplingBody):
  """`POST /v1/chat/completions`."""

  messages: Any
  max_completion_tokens: int | None = None
  logprobs: bool | None = None
  top_logprobs: int | None = None
  tools: list[Any] | None = None
  response_format: dict[str, Any] | None = None


class _Unsupported(RequestError):
  """A known OpenAI option this server does not implement."""


def _reject_unsupported(body: _SamplingBody) -> None:
  def refuse(field, what):
    raise _Unsupported(field, f"{what} is not supported by this server")

  if body.n not in (None, 1):
    refuse("n", "n > 1 (several choices per request)")
  if body.presence_penalty or body.frequency_penalty:
    refuse("presence_penalty" if body.presence_penalty else "frequency_penalty",
           "a presence or frequency penalty")
  if body.logit_bias:
    refuse("logit_bias", "logit_bias")
  if isinstance(body, CompletionBody):
    if body.logprobs is not None:
      refuse("logprobs", "logprobs")
    if body.echo:
      refuse("echo", "echo")
    if body.best_of not in (None, 1):
      refuse("best_of", "best_of > 1")
    if body.suffix:
      refuse("suffix", "suffix")
  else:
    if body.logprobs or body.top_logprobs:
      refuse("logprobs" if body.logprobs else "top_logprobs", "logprobs")
    if body.tools:
      refuse("tools", "tool calling")
    if body.response_format and body.response_format.get("type") != "text":
      refuse("response_format", "a response_format other than text")


def _stop_strings(stop: Any) -> tuple[str, ...]:
  if stop is None:
    return ()
  if isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise RequestError("stop", "must be a non-empty string or a list of non-empty strings")
  return tuple(stop)


def _prompt_ids(prompt: Any, tokenizer, add_special_tokens: bool) -> list[int]:
  """A completion prompt (text or token ids) as token ids."""
  if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # the batched form with a single prompt
  if isinstance(prompt, str):
    if not prompt:
      raise RequestError("prompt", "must not be empty")
    ids = tokenizer.encode(prompt)
    return [tokenizer.bos_id] + ids if add_special_tokens else ids
  if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                      for t in prompt):
    if not prompt:
      raise RequestError("prompt", "must not be empty")
    if not all(0 <= t < tokenizer.vocab_size for t in prompt):
      raise RequestError("prompt", f"token ids must be in [0, {tokenizer.vocab_size})")
    return list(prompt)
  if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
    raise RequestError("prompt", "several prompts in one request are not supported; send "
                       "one request per prompt")
  raise RequestError("prompt", "must be a string or a list of token ids")


def _chat_messages(messages: Any) -> list[dict[str, str]]:
  """Validated `{"role", "content"}` dicts; content may also be a list of text parts."""
  if not isinstance(messages, list) or not messages:
    raise RequestError("messages", "must be a non-empty list of {role, content} objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise RequestError(f"messages[{i}]", "must be an object with role and content")
    role, content = m.get("role"), m.get("content")
    if role not in CHAT_ROLES:
      raise RequestError(f"messages[{i}].role", f"must be one of {list(CHAT_ROLES)}, got "
                         f"{role!r}")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
      content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
      raise RequestError(f"messages[{i}].content", "must be a string (or a list of text "
                         "parts)")
    out.append({"role": role, "content": content})
  return out


def _check_context(info: ModelInfo, prompt_len: int, max_tokens: int) -> None:
  if prompt_len >= info.max_context:
    raise ContextTooLong("prompt", f"the prompt has {prompt_len} tokens; model {info.id!r} "
                         f"has a context of {info.max_context} tokens")
  if prompt_len + max_tokens > info.max_context:
    raise ContextTooLong(
        "max_tokens", f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) "
        f"exceeds model {info.id!r}'s context of {info.max_context} tokens; use max_tokens "
        f"<= {info.max_context - prompt_len}")


# ---------------------------------------------------------------------------------------
# Token ids -> text


class _Detokenizer:
  """Turns output tokens into text deltas, one token at a time.

  A delta never ends inside a multi-byte character: each step decodes a short window of
  tokens and holds the new text back while it ends with U+FFFD (an incomplete character
  so far). Text that may begin a stop string is held back too, and the text is cut
  before the first stop string (`stopped`).
  """

  def __init__(self, tokenizer, stop: Sequence[str] = ()):
    self._tok = tokenizer
    self._stop = tuple(stop)
    self.ids: list[int] = []
    self._start = 0  # the decode window is ids[_start:] ...
    self._read = 0  # ... of which ids[_start:_read] were already turned into text
    self._held = ""  # final text that may be the start of a stop string
    self.stopped = False

  def _new_text(self) -> str:
    before = self._tok.decode(self.ids[self._start:self._read])
    after = self._tok.decode(self.ids[self._start:])
    return after[len(before):] if len(after) > len(before) else ""

  def add(self, token: int) -> str:
    """Adds one token; returns the text that is now final (often "")."""
    self.ids.append(token)
    new = self._new_text()
    if not new or new.endswith("\ufffd"):
      return ""
    # Windows start at the previous step's end, so tokenizers that decode a token
    # differently at the start of a sequence (leading spaces) still see context.
    self._start, self._read = self._read, len(self.ids)
    return self._cut(new, final=False)

  def flush(self) -> str:
    """The text still held back, at the end of the output."""
    new = self._new_text()
    self._start = self._read = len(self.ids)
    return self._cut(new, final=True)

  def _cut(self, new: str, final: bool) -> str:
    if self.stopped:
      return ""
    buf = self._held + new
    hits = [i for i in (buf.find(s) for s in self._stop) if i >= 0]
    if hits:
      self.stopped, self._held = True, ""
      return buf[:min(hits)]
    keep = 0 if final else max(
        (k for s in self._stop for k in range(1, min(len(s), len(buf) + 1))
         if buf.endswith(s[:k])), default=0)
    self._held = buf[len(buf) - keep:]
    return buf[:len(buf) - keep]


async def _text_deltas(handle: RequestHandle,
                       detok: _Detokenizer) -> AsyncIterator[tuple[str, str | None]]:
  """Yields `(text, None)` as text becomes final, then `(text, finish_reason)` once.

  Raises the request's failure (`RequestFailed`) if it fails.
  """
  async with contextlib.aclosing(handle.aevents()) as events:
    async for event in events:
      text = detok.add(event.token) if event.token is not None else ""
      if event.finished and not detok.stopped:
        text += detok.flush()
      if detok.stopped:
        yield text, "stop"
        return
      if event.finished:
        yield text, event.finish_reason or "stop"
        return
      if text:
        yield text, None
  # The events ended without a finished event: end with what arrived.
  yield detok.flush(), ("stop" if detok.stopped else handle.record.finish_reason or "stop")


def _cancel(handle: RequestHandle) -> None:
  """Tells the backend to stop generating for a request nobody reads any more, if the
  handle supports it (the protocol does not require `cancel`)."""
  cancel = getattr(handle, "cancel", None)
  if cancel is not None and not handle.done.is_set():
    try:
      cancel()
    except Exception:  # pylint: disable=broad-except
      logger.exception("cancelling request %s failed", handle.request.request_id)


# ---------------------------------------------------------------------------------------
# Errors and metrics


def _error_json(status: int, message: str, param: str | None = None,
                code: str | None = None, etype: str | None = None) -> dict:
  etype = etype or _ERROR_TYPES.get(status, "server_error" if status >= 500
                                    else "invalid_request_error")
  return {"error": {"message": message, "type": etype, "param": param, "code": code}}


def _serving_error_json(exc: ServingError) -> tuple[int, dict, dict]:
  """(status, body, headers) for a serving error."""
  status = int(getattr(exc, "status", 500))
  headers = {}
  if isinstance(exc, Overloaded):
    code = "rate_limit_exceeded" if status == 429 else "service_unavailable"
    headers["Retry-After"] = str(RETRY_AFTER_S.get(status, 1))
    return status, _error_json(status, exc.reason, code=code), headers
  if isinstance(exc, RequestError):
    code = ("model_not_found" if isinstance(exc, ModelNotFound) else
            "context_length_exceeded" if isinstance(exc, ContextTooLong) else
            "unsupported_parameter" if isinstance(exc, _Unsupported) else None)
    return status, _error_json(status, str(exc), param=exc.field, code=code), headers
  code = "request_failed" if isinstance(exc, RequestFailed) else None
  return status, _error_json(status, str(exc) or type(exc).__name__, code=code), headers


def _sse(obj: dict) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Metrics:
  """The API's own Prometheus metrics, in a registry of this app's (not the global one)."""

  def __init__(self):
    self.registry = prometheus_client.CollectorRegistry()
    self.requests = prometheus_client.Counter(
        "jaxsun_api_requests", "HTTP requests by endpoint and status code.",
        ["endpoint", "status"], registry=self.registry)
    self.latency = prometheus_client.Histogram(
        "jaxsun_api_request_latency_seconds",
        "Time from a request's arrival to the end of its response (streams included).",
        ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
    self.in_flight = prometheus_client.Gauge(
        "jaxsun_api_requests_in_flight", "HTTP requests being answered.",
        registry=self.registry)
    self.stream_errors = prometheus_client.Counter(
        "jaxsun_api_stream_errors", "Streams that failed after their 200 was sent.",
        ["endpoint"], registry=self.registry)
    self.disconnects = prometheus_client.Counter(
        "jaxsun_api_client_disconnects", "Streams the client left before their end.",
        ["endpoint"], registry=self.registry)


_GENERATION = ("/v1/completions", "/v1/chat/completions")
KEEP_ALIVE_S = 65


class _MetricsMiddleware:
  """Counts every HTTP request by endpoint and status, and times it to its last byte
  (a plain ASGI middleware, so streams are timed to their end and are not buffered).

  It also refuses generation requests early when the backend says it is full
  (`backend.admission()`, if it has one): under overload a 429 must cost less than the
  request it refuses, so it is sent before the body is read or validated.
  """

  def __init__(self, app, metrics: _Metrics, backend=None):
    self.app = app
    self.metrics = metrics
    self.admission = getattr(backend, "admission", None)

  async def _refuse(self, exc: Overloaded, send) -> None:
    status, body, headers = _serving_error_json(exc)
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": raw})

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
    if (self.admission is not None and scope["method"] == "POST"
        and scope["path"] in _GENERATION):
      refused = self.admission()
      if refused is not None:
        await self._refuse(refused, send)
        self.metrics.requests.labels(endpoint, str(refused.status)).inc()
        return
    status = 500  # unless a response starts
    start = time.perf_counter()

    async def send_and_note(message):
      nonlocal status
      if message["type"] == "http.response.start":
        status = message["status"]
      await send(message)

    self.metrics.in_flight.inc()
    try:
      await self.app(scope, receive, send_and_note)
    finally:
      self.metrics.in_flight.dec()
      self.metrics.requests.labels(endpoint, str(status)).inc()
      self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------
# The app


@dataclasses.dataclass
class _Prepared:
  """A validated, admitted request and what its response needs."""

  handle: RequestHandle
  info: ModelInfo
  detok: _Detokenizer
  stream: bool
  include_usage: bool

  @property
  def usage(self) -> dict:
    p, c = len(self.handle.request.prompt), len(self.detok.ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def create_app(backend: Backend, *,
               chat_template: Callable[[Sequence[dict[str, str]]], str] = default_chat_template
               ) -> fastapi.FastAPI:
  """The OpenAI-compatible FastAPI app of a backend (see the module docstring).

  Args:
    backend: the serving system (`jaxsun.serving.backend.Backend`).
    chat_template: renders validated chat messages to the prompt text.

  Returns:
    The app; `app.state.draining = True` makes it refuse new generation requests (503)
    and report 503 on /health.
  """
  app = fastapi.FastAPI(title="jaxsun serving", version="1")
  app.state.draining = False
  metrics = _Metrics()
  app.state.metrics = metrics
  app.add_middleware(_MetricsMiddleware, metrics=metrics, backend=backend)
  created = int(time.time())
  known: dict[str, dict[str, ModelInfo]] = {"by_id": {}}  # replaced whole, never mutated
  tokenizers: dict[str, Any] = {}

  async def model_info(model: str) -> ModelInfo:
    if not model:
      raise RequestError("model", "must be a non-empty string")
    info = known["by_id"].get(model)
    if info is None:  # models may have been added: ask the backend before a 404
      by_id = {m.id: m for m in await run_in_threadpool(backend.models)}
      known["by_id"] = by_id
      if model not in by_id:
        raise ModelNotFound(model, list(by_id))
      info = by_id[model]
    return info

  async def prepare(body: _SamplingBody, request_id: str,
                    prompt_fn: Callable[[Any], list[int]], chat: bool) -> _Prepared:
    """Validates a body, builds the Request and submits it (raising ServingErrors)."""
    _reject_unsupported(body)
    if app.state.draining:
      raise Overloaded("the server is shutting down", status=503)
    stop = _stop_strings(body.stop)
    info = await model_info(body.model)
    tokenizer = tokenizers.get(info.tokenizer)
    if tokenizer is None:  # the first use may read a vocabulary file: not on the loop
      tokenizer = tokenizers[info.tokenizer] = await run_in_threadpool(get_tokenizer,
                                                                       info.tokenizer)
    # Long prompts take a while to encode; the loop meanwhile streams others' tokens.
    prompt = await run_in_threadpool(prompt_fn, tokenizer)
    max_tokens = body.max_tokens
    if chat and body.max_completion_tokens is not None:
      max_tokens = body.max_completion_tokens
    if max_tokens is None:  # OpenAI: 16 for completions, the rest of the context for chat
      max_tokens = max(info.max_context - len(prompt), 1) if chat else 16
    top_k = body.top_k if body.top_k not in (None, -1) else 0  # -1: off, as in vLLM
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k,
        stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=bool(body.ignore_eos),
        seed=body.seed)
    _check_context(info, len(prompt), sampling.max_tokens)
    request = Request(model=info.id, prompt=tuple(prompt), sampling=sampling,
                      request_id=request_id, session_id=body.session_id)
    handle = await run_in_threadpool(backend.submit, request)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _Prepared(handle, info, _Detokenizer(tokenizer, stop), bool(body.stream),
                     include_usage)

  async def stream_events(prep: _Prepared, endpoint: str, chunk: Callable[..., dict],
                          first: dict | None = None) -> AsyncIterator[str]:
    """SSE events of a stream: chunks, an optional usage chunk, then `[DONE]`; or, if the
    request fails, one error event."""
    ended = False
    try:
      if first is not None:
        yield _sse(first)
      async with contextlib.aclosing(_text_deltas(prep.handle, prep.detok)) as deltas:
        async for text, finish in deltas:
          yield _sse(chunk(text, finish))
      if prep.include_usage:
        yield _sse(chunk(None, None, usage=prep.usage))
      ended = True
      yield "data: [DONE]\n\n"
    except ServingError as exc:
      ended = True
      metrics.stream_errors.labels(endpoint).inc()
      logger.warning("request %s failed mid-stream: %s", prep.handle.request.request_id, exc)
      yield _sse(_serving_error_json(exc)[1])
    except Exception as exc:  # pylint: disable=broad-except
      ended = True
      metrics.stream_errors.labels(endpoint).inc()
      logger.exception("request %s failed mid-stream", prep.handle.request.request_id)
      yield _sse(_error_json(500, f"internal error: {type(exc).__name__}: {exc}"))
    finally:
      if not ended:  # the client went away (the stream was cancelled or closed)
        metrics.disconnects.labels(endpoint).inc()
      _cancel(prep.handle)

  async def collect(prep: _Prepared) -> tuple[str, str | None]:
    """The whole text and finish reason of a non-streaming request."""
    parts, finish = [], None
    try:
      async with contextlib.aclosing(_text_deltas(prep.handle, prep.detok)) as deltas:
        async for text, finish in deltas:
          parts.append(text)
    finally:
      _cancel(prep.handle)  # after a stop string, or if this handler is cancelled
    return "".join(parts), finish

  def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

  @app.post("/v1/completions")
  async def completions(body: CompletionBody):
    rid = f"cmpl-{uuid.uuid4().hex}"
    add_special = body.add_special_tokens is not False
    prep = await prepare(body, rid, lambda tok: _prompt_ids(body.prompt, tok, add_special),
                         chat=False)
    base = {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": prep.info.id}
    if prep.stream:
      def chunk(text, finish, usage=None):
        choices = [] if usage else [{"index": 0, "text": text, "finish_reason": finish,
                                     "logprobs": None}]
        return {**base, "choices": choices, "usage": usage}

      return sse_response(stream_events(prep, "/v1/completions", chunk))
    text, finish = await collect(prep)
    return {**base, "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                 "logprobs": None}], "usage": prep.usage}

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatBody):
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    messages = _chat_messages(body.messages)  # before the model lookup: a 400 beats a 404

    def prompt_fn(tok):
      ids = tok.encode(chat_template(messages))
      return [tok.bos_id] + ids if body.add_special_tokens is not False else ids

    prep = await prepare(body, rid, prompt_fn, chat=True)
    base = {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": prep.info.id}
    if prep.stream:
      base["object"] = "chat.completion.chunk"

      def chunk(text, finish, usage=None, delta=None):
        if usage:
          return {**base, "choices": [], "usage": usage}
        delta = delta if delta is not None else ({"content": text} if text else {})
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": finish}], "usage": None}

      first = chunk(None, None, delta={"role": "assistant", "content": ""})
      return sse_response(stream_events(prep, "/v1/chat/completions", chunk, first))
    text, finish = await collect(prep)
    return {**base, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": finish}],
            "usage": prep.usage}

  @app.get("/v1/models")
  async def list_models():
    infos = await run_in_threadpool(backend.models)
    return {"object": "list", "data": [
        {"id": m.id, "object": "model", "created": created, "owned_by": "jaxsun",
         "max_model_len": m.max_context} for m in infos]}

  @app.get("/health")
  async def health():
    try:
      report = dict(await run_in_threadpool(backend.health))
    except Exception as exc:  # pylint: disable=broad-except
      logger.exception("backend.health() failed")
      return JSONResponse({"status": "error", "error": str(exc)}, status_code=503)
    if app.state.draining:
      report["status"] = "draining"
    return JSONResponse(report, status_code=503 if report.get("status") == "draining" else 200)

  @app.get("/metrics")
  async def metrics_endpoint():
    try:
      text = await run_in_threadpool(backend.metrics_text)
    except Exception as exc:  # pylint: disable=broad-except
      logger.exception("backend.metrics_text() failed")
      text = f"# backend metrics unavailable: {type(exc).__name__}\n"
    if text and not text.endswith("\n"):
      text += "\n"
    ours = prometheus_client.generate_latest(metrics.registry).decode()
    return Response(text + ours, media_type=METRICS_CONTENT_TYPE)

  @app.exception_handler(ServingError)
  async def on_serving_error(request, exc: ServingError):
    status, body, headers = _serving_error_json(exc)
    if status >= 500 and not isinstance(exc, Overloaded):
      logger.warning("%s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse(body, status_code=status, headers=headers)

  @app.exception_handler(RequestValidationError)
  async def on_invalid_body(request, exc: RequestValidationError):
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
      return JSONResponse(_error_json(400, f"the request body is not valid JSON: "
                                      f"{err.get('msg')}"), status_code=400)
    if not loc or not isinstance(loc[0], str):
      return JSONResponse(_error_json(400, "the request body must be a JSON object"),
                          status_code=400)
    param = loc[0] + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    return JSONResponse(_error_json(400, f"{param}: {err.get('msg')}", param=param),
                        status_code=400)

  @app.exception_handler(StarletteHTTPException)
  async def on_http_error(request, exc: StarletteHTTPException):
    return JSONResponse(_error_json(exc.status_code, str(exc.detail),
                                    etype="not_found_error" if exc.status_code == 404
                                    else None),
                        status_code=exc.status_code, headers=exc.headers)

  @app.exception_handler(Exception)
  async def on_unexpected(request, exc: Exception):
    logger.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(_error_json(500, f"internal error: {type(exc).__name__}: {exc}"),
                        status_code=500)

  return app


# ---------------------------------------------------------------------------------------
# Running it


class ServerHandle:
  """A server running in a background thread (from `serve`).

  Attributes:
    app: the FastAPI app. host, port: where it listens (the real port when 0 was asked).
  """

  def __init__(self, server: uvicorn.Server, thread: threading.Thread, backend: Backend,
               app: fastapi.FastAPI, host: str, port: int):
    self._server = server
    self._thread = thread
    self._backend = backend
    self.app = app
    self.host = host
    self.port = port
    self._lock = threading.Lock()
    self._stopped = False

  @property
  def url(self) -> str:
    """`http://host:port`, without a trailing slash."""
    host = f"[{self.host}]" if ":" in self.host else self.host
    return f"http://{host}:{self.port}"

  def stop(self, timeout: float | None = 60.0) -> None:
    """Stops gracefully: new generation requests get 503, in-flight ones finish (within
    `timeout` seconds), then uvicorn stops. Calling it again does nothing."""
    with self._lock:
      if self._stopped:
        return
      self._stopped = True
    self.app.state.draining = True
    try:
      self._backend.shutdown(drain=True, timeout=timeout)
    finally:
      # The backend is done; give the last responses time to reach their clients.
      self._server.config.timeout_graceful_shutdown = (
          None if timeout is None else max(int(timeout), 1))
      self._server.should_exit = True
      self._thread.join(timeout)

  def __enter__(self) -> ServerHandle:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


def _bind(host: str, port: int) -> socket.socket:
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError:
    sock.close()
    raise
  return sock


def serve(backend: Backend, host: str = "127.0.0.1", port: int = 0,
          log_level: str = "warning", *, startup_timeout: float = 30.0,
          **app_kwargs) -> ServerHandle:
  """Serves `create_app(backend, **app_kwargs)` with uvicorn in a background thread.

  Args:
    backend: the serving system.
    host, port: where to listen; port 0 picks a free port (see `ServerHandle.port`).
    log_level: uvicorn's log level.
    startup_timeout: seconds to wait for the server to listen.
    **app_kwargs: passed to `create_app` (e.g. `chat_template`).

  Returns:
    A ServerHandle, listening when this returns.
  """
  app = create_app(backend, **app_kwargs)
  # A long keep-alive: a loop lagging under load must not expire a connection that
  # already holds an unread request (the client would see it reset).
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                          access_log=False, timeout_keep_alive=KEEP_ALIVE_S)
  server = uvicorn.Server(config)
  sock = _bind(host, port)  # bound here, so the real port is known and errors raise here
  port = sock.getsockname()[1]
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                            name=f"jaxsun-api-{port}", daemon=True)
  thread.start()
  deadline = time.monotonic() + startup_timeout
  while not server.started:
    if not thread.is_alive() or time.monotonic() > deadline:
      server.should_exit = True
      sock.close()
      raise RuntimeError(f"the API server on {host}:{port} did not start")
    time.sleep(0.01)
  return ServerHandle(server, thread, backend, app, host, port)


def run(backend: Backend, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info", drain_timeout: float | None = 60.0, **app_kwargs) -> None:
  """Serves in the foreground until SIGINT / SIGTERM, then drains the backend.

  uvicorn stops accepting connections and lets in-flight responses finish first.
  """
  app = create_app(backend, **app_kwargs)
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                          timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=(None if drain_timeout is None
                                                     else max(int(drain_timeout), 1)))
  try:
    uvicorn.Server(config).run()
  finally:
    app.state.draining = True
    backend.shutdown(drain=True, timeout=drain_timeout)


__all__ = ["CHAT_ROLES", "ChatBody", "CompletionBody", "ServerHandle", "create_app",
           "default_chat_template", "qa_chat_template", "run", "serve"]
