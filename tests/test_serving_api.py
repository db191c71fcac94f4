"""The OpenAI-compatible HTTP API (`jaxsun.serving.api`) against a fake backend.

The fake "generates" the prompt's text reversed, one byte token at a time, then EOS. The
real server runs on 127.0.0.1 (port 0) and is called with the official `openai` client,
as a user would, and with httpx for raw status codes, headers and bodies.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from jaxsun.data.tokenizers import get_tokenizer
from jaxsun.serving import api
from jaxsun.serving.backend import ModelInfo, RequestHandle
from jaxsun.serving.request import (ModelNotFound, Overloaded, RequestFailed, RequestRecord,
                                    TokenEvent)

TOK = get_tokenizer("byte")
BOS, EOS = TOK.bos_id, TOK.eos_id
WAIT_S = 10.0  # upper bound on any wait; tests never assert on durations


def wait_for(cond, what: str) -> None:
  deadline = time.monotonic() + WAIT_S
  while not cond():
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.005)


class FakeHandle(RequestHandle):
  """A handle with the optional `cancel` the API calls when nobody reads any more."""

  def __init__(self, request, record):
    super().__init__(request, record)
    self.cancelled = threading.Event()

  def cancel(self) -> None:
    self.cancelled.set()


class FakeBackend:
  """Replies with the prompt's text reversed, then EOS, from one thread per request.

  Knobs: `capacity` (more requests in flight raise Overloaded 429), `fail_after` (fail
  with RequestFailed after that many tokens), `hold_from` (tokens from this index wait
  for `gate`), `separate_finish` (end with a token-less finished event).
  """

  def __init__(self):
    self.infos = [ModelInfo("echo", max_context=256, tokenizer="byte", eos_id=EOS),
                  ModelInfo("echo-small", max_context=16, tokenizer="byte", eos_id=EOS)]
    self.capacity = 4
    self.fail_after: int | None = None
    self.hold_from: int | None = None
    self.gate = threading.Event()
    self.separate_finish = False
    self.draining = False
    self.in_flight = 0
    self.submitted = 0
    self.handles: list[FakeHandle] = []
    self._cv = threading.Condition()

  def models(self):
    return list(self.infos)

  def submit(self, request):
    if request.model not in {m.id for m in self.infos}:
      raise ModelNotFound(request.model, [m.id for m in self.infos])
    with self._cv:
      if self.draining:
        raise Overloaded("draining: not admitting new requests", status=503)
      if self.in_flight >= self.capacity:
        raise Overloaded(f"queue full ({self.in_flight} requests in flight)", status=429)
      self.in_flight += 1
      self.submitted += 1
    record = RequestRecord(request.request_id, request.model, len(request.prompt),
                           request.arrival_time)
    handle = FakeHandle(request, record)
    self.handles.append(handle)
    threading.Thread(target=self._generate, args=(handle,), daemon=True).start()
    return handle

  def _generate(self, handle):
    s = handle.request.sampling
    reply = TOK.encode(TOK.decode(handle.request.prompt)[::-1])
    tokens = (reply * s.max_tokens)[:s.max_tokens] if s.ignore_eos else reply + [EOS]
    try:
      for i, tok in enumerate(tokens[:s.max_tokens]):
        if self.fail_after is not None and i == self.fail_after:
          handle._fail(RequestFailed("KV transfer failed its digest check"))
          return
        if self.hold_from is not None and i >= self.hold_from:
          wait_for(lambda: self.gate.is_set() or handle.cancelled.is_set(), "the gate")
        if handle.cancelled.is_set():
          handle._push(TokenEvent(handle.request.request_id, None, i, time.monotonic(),
                                  finished=True, finish_reason="abort"))
          return
        stop = tok == EOS or tok in s.stop_token_ids
        last = stop or i == s.max_tokens - 1
        finished = last and not self.separate_finish
        handle.record.output_tokens.append(tok)
        handle._push(TokenEvent(handle.request.request_id, tok, i, time.monotonic(),
                                finished=finished,
                                finish_reason=("stop" if stop else "length") if finished
                                else None))
        if last:
          if self.separate_finish:
            handle._push(TokenEvent(handle.request.request_id, None, i + 1, time.monotonic(),
                                    finished=True, finish_reason="stop" if stop else "length"))
          return
    finally:
      with self._cv:
        self.in_flight -= 1
        self._cv.notify_all()

  def health(self):
    return {"status": "draining" if self.draining else "ok", "workers": {"fake-0": "alive"}}

  def metrics_text(self):
    return ("# HELP fake_backend_requests_total Requests admitted.\n"
            "# TYPE fake_backend_requests_total counter\n"
            f"fake_backend_requests_total {self.submitted}\n")

  def shutdown(self, drain=True, timeout=None):
    with self._cv:
      self.draining = True
      if drain:
        self._cv.wait_for(lambda: self.in_flight == 0, timeout)


@pytest.fixture(scope="module")
def served():
  backend = FakeBackend()
  server = api.serve(backend)
  yield backend, server
  backend.gate.set()
  server.stop(timeout=WAIT_S)


@pytest.fixture
def backend(served):
  """The shared fake backend with its knobs reset for each test."""
  b = served[0]
  b.capacity, b.fail_after, b.hold_from, b.separate_finish = 4, None, None, False
  b.gate.clear()
  yield b
  b.gate.set()
  wait_for(lambda: b.in_flight == 0, "the test's requests to end")


@pytest.fixture
def url(served, backend):
  return served[1].url


@pytest.fixture
def client(url):
  return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=WAIT_S)


def post(url, path, body, **kw):
  return httpx.post(url + path, json=body, timeout=WAIT_S, **kw)


def sse_data(text: str) -> list[str]:
  return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


def test_server_listens_on_a_real_port(served):
  server = served[1]
  assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"


def test_models_list(client):
  models = client.models.list().data
  assert [(m.id, m.object, m.owned_by) for m in models] == [
      ("echo", "model", "jaxsun"), ("echo-small", "model", "jaxsun")]
  assert [m.model_extra["max_model_len"] for m in models] == [256, 16]


def test_completion(client):
  out = client.completions.create(model="echo", prompt="hello", max_tokens=16)
  assert out.object == "text_completion" and out.model == "echo" and out.id.startswith("cmpl-")
  assert [(c.index, c.text, c.finish_reason, c.logprobs) for c in out.choices] == [
      (0, "olleh", "stop", None)]
  # BOS + 5 bytes in; 5 bytes + EOS out.
  assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
      6, 6, 12)
  short = client.completions.create(model="echo", prompt="hello", max_tokens=3, temperature=0)
  assert (short.choices[0].text, short.choices[0].finish_reason) == ("oll", "length")
  assert short.usage.completion_tokens == 3


def test_completion_of_token_ids_with_stop_token_ids(url):
  r = post(url, "/v1/completions", {"model": "echo", "prompt": [104, 105, 106],
                                    "stop_token_ids": [105], "top_k": 5, "seed": 3})
  assert r.status_code == 200, r.text
  body = r.json()
  assert (body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == ("ji", "stop")
  assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


@pytest.mark.parametrize("separate_finish", [False, True])
def test_completion_stream_keeps_multibyte_characters_whole(client, backend, separate_finish):
  backend.separate_finish = separate_finish
  chunks = list(client.completions.create(model="echo", prompt="añb€", max_tokens=32,
                                          stream=True))
  assert [(c.object, c.choices[0].text, c.choices[0].finish_reason) for c in chunks] == [
      ("text_completion", "€", None), ("text_completion", "b", None),
      ("text_completion", "ñ", None), ("text_completion", "a", None),
      ("text_completion", "", "stop")]
  assert len({c.id for c in chunks}) == 1


def test_stop_strings_cut_the_text_and_cancel_the_request(client, backend):
  backend.hold_from = 4  # "olleh": the stop string ends at token 3; token 4 waits
  out = client.completions.create(model="echo", prompt="hello", stop=["le", "zz"])
  assert (out.choices[0].text, out.choices[0].finish_reason) == ("ol", "stop")
  wait_for(backend.handles[-1].cancelled.is_set, "the stopped request to be cancelled")
  backend.hold_from = None
  chunks = list(client.completions.create(model="echo", prompt="hello", stop="le",
                                          stream=True))
  assert "".join(c.choices[0].text for c in chunks) == "ol"
  assert chunks[-1].choices[0].finish_reason == "stop"


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
CHAT_PROMPT = "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


def test_chat_template():
  assert api.default_chat_template(CHAT) == CHAT_PROMPT
  assert api.qa_chat_template(CHAT + [{"role": "assistant", "content": "yo"},
                                      {"role": "user", "content": "2+2"}]) == (
                                          "be brief\nQ: hi\nA: yo\nQ: 2+2\nA:")


def test_chat_completion(client):
  out = client.chat.completions.create(model="echo", messages=CHAT)
  assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
  choice = out.choices[0]
  assert (choice.message.role, choice.message.content, choice.finish_reason) == (
      "assistant", CHAT_PROMPT[::-1], "stop")
  n = len(CHAT_PROMPT)
  assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (n + 1, n + 1)


def test_chat_completion_stream(client):
  chunks = list(client.chat.completions.create(model="echo", messages=CHAT, max_tokens=5,
                                               stream=True))
  assert {c.object for c in chunks} == {"chat.completion.chunk"}
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks) == CHAT_PROMPT[::-1][:5]
  assert [c.choices[0].finish_reason for c in chunks][-2:] == [None, "length"]


def test_stream_usage_chunk(client):
  chunks = list(client.completions.create(model="echo", prompt="ab", stream=True,
                                          stream_options={"include_usage": True}))
  assert [c.choices[0].text for c in chunks[:-1]] == ["b", "a", ""]
  assert chunks[-1].choices == []
  assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 3)


C, CH = "/v1/completions", "/v1/chat/completions"
ERRORS = [  # (path, body, status, param, code)
    (C, {"model": "nope", "prompt": "hi"}, 404, "model", "model_not_found"),
    (C, {"model": "echo", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
    (C, {"model": "echo", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    (C, {"model": "echo", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", None),
    (C, {"model": "echo", "prompt": "hi", "temperature": -1}, 400, "temperature", None),
    (C, {"model": "echo", "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    (C, {"model": "echo", "prompt": "hi", "stream": "yes"}, 400, "stream", None),
    (C, {"model": "echo", "prompt": ""}, 400, "prompt", None),
    (C, {"model": "echo", "prompt": []}, 400, "prompt", None),
    (C, {"model": "echo", "prompt": ["a", "b"]}, 400, "prompt", None),
    (C, {"model": "echo", "prompt": [300]}, 400, "prompt", None),
    (C, {"model": "echo"}, 400, "prompt", None),
    (C, {"prompt": "hi"}, 400, "model", None),
    (C, {"model": "echo-small", "prompt": "hello", "max_tokens": 11}, 400, "max_tokens",
     "context_length_exceeded"),
    (C, {"model": "echo-small", "prompt": "x" * 15}, 400, "prompt", "context_length_exceeded"),
    (C, {"model": "echo", "prompt": "hi", "n": 2}, 400, "n", "unsupported_parameter"),
    (C, {"model": "echo", "prompt": "hi", "logprobs": 1}, 400, "logprobs",
     "unsupported_parameter"),
    (C, {"model": "echo", "prompt": "hi", "stop": [""]}, 400, "stop", None),
    (CH, {"model": "echo", "messages": [{"role": "user", "content": "hi"},
                                        {"role": "robot", "content": "x"}]},
     400, "messages[1].role", None),
    (CH, {"model": "echo", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", None),
    (CH, {"model": "echo", "messages": []}, 400, "messages", None),
    (CH, {"model": "echo"}, 400, "messages", None),
    (CH, {"model": "nope", "messages": CHAT}, 404, "model", "model_not_found"),
    (CH, {"model": "echo", "messages": CHAT, "n": 3}, 400, "n", "unsupported_parameter"),
]


@pytest.mark.parametrize("path,body,status,param,code", ERRORS)
def test_error_bodies(url, path, body, status, param, code):
  r = post(url, path, body)
  assert r.status_code == status, r.text
  error = r.json()["error"]
  assert (error["param"], error["code"]) == (param, code)
  assert error["type"] == "invalid_request_error" and error["message"]


def test_malformed_requests(url):
  r = httpx.post(url + C, content=b"{not json", timeout=WAIT_S,
                 headers={"Content-Type": "application/json"})
  assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
  r = post(url, C, ["model", "echo"])
  assert r.status_code == 400 and r.json()["error"]["param"] is None
  r = httpx.get(url + "/v1/nothing", timeout=WAIT_S)
  assert r.status_code == 404 and r.json()["error"]["message"] == "Not Found"
  assert post(url, C, {"model": "echo", "prompt": "ok"}).json()["choices"][0]["text"] == "ko"


def test_overload_is_429_with_retry_after_and_the_server_keeps_serving(url, client, backend):
  backend.capacity, backend.hold_from = 1, 0
  with httpx.stream("POST", url + C, json={"model": "echo", "prompt": "slow", "stream": True},
                    timeout=WAIT_S) as slow:
    assert slow.status_code == 200  # admitted: it holds the only slot
    r = post(url, C, {"model": "echo", "prompt": "hi"})
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert "queue full" in r.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError):
      client.completions.create(model="echo", prompt="hi")
    backend.gate.set()
    events = sse_data(slow.read().decode())
  assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "wols"
  assert events[-1] == "[DONE]"
  wait_for(lambda: backend.in_flight == 0, "the slot to free")
  assert client.completions.create(model="echo", prompt="hi").choices[0].text == "ih"


def test_failure_is_reported_never_answered_with_wrong_text(url, client, backend):
  backend.fail_after = 2
  r = post(url, C, {"model": "echo", "prompt": "hello"})
  assert r.status_code == 500, r.text
  assert r.json()["error"]["code"] == "request_failed"
  assert "digest" in r.json()["error"]["message"]

  r = post(url, C, {"model": "echo", "prompt": "hello", "stream": True})
  events = sse_data(r.text)
  assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["o", "l"]
  assert json.loads(events[2])["error"]["code"] == "request_failed" and len(events) == 3

  texts = []
  with pytest.raises(openai.APIError, match="digest"):
    for chunk in client.chat.completions.create(model="echo", messages=CHAT, stream=True):
      texts.append(chunk.choices[0].delta.content or "")
  assert "".join(texts) == CHAT_PROMPT[::-1][:2]

  backend.fail_after = None
  assert client.completions.create(model="echo", prompt="ok").choices[0].text == "ko"


def test_client_disconnect_cancels_the_request(url, backend):
  backend.hold_from = 1
  with httpx.stream("POST", url + C, json={"model": "echo", "prompt": "hello", "stream": True},
                    timeout=WAIT_S) as r:
    first = next(r.iter_lines())
    assert json.loads(first[len("data: "):])["choices"][0]["text"] == "o"
  wait_for(backend.handles[-1].cancelled.is_set, "the abandoned request to be cancelled")
  backend.gate.set()
  metrics = httpx.get(url + "/metrics", timeout=WAIT_S).text
  assert 'jaxsun_api_client_disconnects_total{endpoint="/v1/completions"} 1.0' in metrics


def test_health_and_metrics(url, client):
  r = httpx.get(url + "/health", timeout=WAIT_S)
  assert r.status_code == 200 and r.json() == {"status": "ok", "workers": {"fake-0": "alive"}}
  client.completions.create(model="echo", prompt="hi")
  post(url, C, {"model": "nope", "prompt": "hi"})
  r = httpx.get(url + "/metrics", timeout=WAIT_S)
  assert r.status_code == 200
  assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
  lines = r.text.splitlines()
  assert any(line.startswith("fake_backend_requests_total ") for line in lines)
  for prefix in ('jaxsun_api_requests_total{endpoint="/v1/completions",status="200"} ',
                 'jaxsun_api_requests_total{endpoint="/v1/completions",status="404"} ',
                 'jaxsun_api_request_latency_seconds_bucket{endpoint="/v1/completions",le="+Inf"} ',
                 "jaxsun_api_requests_in_flight "):
    assert any(line.startswith(prefix) for line in lines), prefix


def test_apps_have_their_own_metrics_registries():
  a, b = api.create_app(FakeBackend()), api.create_app(FakeBackend())
  assert a.state.metrics.registry is not b.state.metrics.registry


def test_graceful_shutdown_finishes_in_flight_and_refuses_new_requests():
  backend = FakeBackend()
  backend.hold_from = 0
  server = api.serve(backend)
  result = {}

  def slow_request():
    result["r"] = post(server.url, C, {"model": "echo", "prompt": "bye"})

  slow = threading.Thread(target=slow_request)
  slow.start()
  wait_for(lambda: backend.in_flight == 1, "the slow request to be admitted")
  stopper = threading.Thread(target=server.stop)
  stopper.start()
  wait_for(lambda: backend.draining, "the server to drain")

  r = post(server.url, C, {"model": "echo", "prompt": "hi"})
  assert r.status_code == 503 and r.headers["Retry-After"] == "5"
  assert r.json()["error"]["code"] == "service_unavailable"
  assert httpx.get(server.url + "/health", timeout=WAIT_S).status_code == 503

  backend.gate.set()
  slow.join(WAIT_S)
  stopper.join(WAIT_S)
  assert not stopper.is_alive() and not slow.is_alive()
  assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"] == "eyb"
  with pytest.raises(httpx.TransportError):
    httpx.get(server.url + "/health", timeout=WAIT_S)
