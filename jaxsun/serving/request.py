"""Requests, per-request sampling, token events, per-request timing records and errors.

These are the plain-Python types every serving component shares (engine, workers,
router, runtimes, HTTP API, benchmark client). Nothing here imports jax.

Errors carry an HTTP status so the API maps them without a table of its own:

    RequestError (400, names the field) > ModelNotFound (404), ContextTooLong (400)
    Overloaded (429 queue full / 503 shutting down or no worker, with a reason)
    RequestFailed (500: e.g. a KV transfer failed its digest check and could not be
    recomputed; the request is never answered with wrong tokens)
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Sequence

_ids = itertools.count()


class ServingError(Exception):
  """Base of the serving errors; `status` is the HTTP status the API answers with."""

  status = 500


class RequestError(ServingError, ValueError):
  """A bad request; `field` names the offending field (e.g. "max_tokens")."""

  status = 400

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
    self.message = message


class ModelNotFound(RequestError):
  status = 404

  def __init__(self, model: str, known: Sequence[str]):
    super().__init__("model", f"unknown model {model!r}; served models: {sorted(known)}")
    self.model = model


class ContextTooLong(RequestError):
  status = 400


class Overloaded(ServingError):
  """Admission refused: `status` 429 (queues full) or 503 (draining / no live worker)."""

  def __init__(self, reason: str, status: int = 429):
    super().__init__(reason)
    self.reason = reason
    self.status = status


class RequestFailed(ServingError):
  """The system could not complete the request correctly (never a wrong answer)."""

  status = 500


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request sampling and stopping, OpenAI-style names.

  Attributes:
    max_tokens: tokens to generate at most (>= 1).
    temperature: 0 is greedy; > 0 samples.
    top_p: nucleus mass in (0, 1].
    top_k: keep the k most likely tokens (0: off).
    stop_token_ids: stop after emitting any of these (the token is returned).
    ignore_eos: keep going past the model's EOS (benchmarks with fixed output lengths).
    seed: per-request PRNG seed (sampling only); None draws one from the request id.
  """

  max_tokens: int = 16
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  seed: int | None = None

  def __post_init__(self):
    def is_int(x):
      return isinstance(x, int) and not isinstance(x, bool)

    if not is_int(self.max_tokens) or self.max_tokens < 1:
      raise RequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
    if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
        or not self.temperature >= 0:
      raise RequestError("temperature", f"must be a number >= 0, got {self.temperature!r}")
    if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
        or not 0 < self.top_p <= 1:
      raise RequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
    if not is_int(self.top_k) or self.top_k < 0:
      raise RequestError("top_k", f"must be an integer >= 0, got {self.top_k!r}")
    if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
      raise RequestError("stop_token_ids", f"must be token ids, got {self.stop_token_ids!r}")
    if self.seed is not None and not is_int(self.seed):
      raise RequestError("seed", f"must be an integer, got {self.seed!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass
class Request:
  """One generation request for one task model.

  Attributes:
    model: the task model id (as listed by `/v1/models`).
    prompt: token ids (non-empty).
    sampling: SamplingParams.
    request_id: unique id (assigned if empty).
    session_id: multi-agent sessions share a growing context; routers may use it.
    arrival_time: `time.monotonic()` at construction unless given (a simulator gives
      its logical time).
  """

  model: str
  prompt: tuple[int, ...]
  sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
  request_id: str = ""
  session_id: str | None = None
  arrival_time: float | None = None

  def __post_init__(self):
    if not isinstance(self.model, str) or not self.model:
      raise RequestError("model", f"must be a non-empty string, got {self.model!r}")
    if isinstance(self.prompt, (str, bytes)) or not hasattr(self.prompt, "__len__"):
      raise RequestError("prompt", "must be a list of token ids")
    self.prompt = tuple(self.prompt)
    if not self.prompt:
      raise RequestError("prompt", "must not be empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.prompt):
      raise RequestError("prompt", "must hold non-negative integer token ids")
    if not isinstance(self.sampling, SamplingParams):
      raise RequestError("sampling", "must be a SamplingParams")
    if not self.request_id:
      self.request_id = f"req-{next(_ids)}"
    if self.arrival_time is None:
      self.arrival_time = time.monotonic()


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  """One output token of a request, or its end (`finished`, with `finish_reason`).

  finish_reason: "stop" (EOS or a stop token), "length" (max_tokens), "abort".
  """

  request_id: str
  token: int | None
  index: int
  time: float
  finished: bool = False
  finish_reason: str | None = None


@dataclasses.dataclass
class RequestRecord:
  """Everything measured about one request (times are `time.monotonic()` seconds).

  The benchmark client turns these into vLLM `bench serve` metrics (TTFT, TPOT, ITL,
  E2EL, time to second token, KV transfer time, prefix hits, ...).
  """

  request_id: str
  model: str
  prompt_len: int
  arrival: float
  output_tokens: list[int] = dataclasses.field(default_factory=list)
  token_times: list[float] = dataclasses.field(default_factory=list)
  prefill_start: float | None = None
  prefill_end: float | None = None
  cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
  transfer_s: float = 0.0  # KV transfer latency, prefill -> decode worker
  transfer_bytes: int = 0
  prefill_worker: str | None = None
  decode_worker: str | None = None
  retries: int = 0  # re-routed after a worker died or a corrupt transfer
  finish_reason: str | None = None
  error: str | None = None  # set when the request was rejected or failed
  status: int = 200
  end: float | None = None

  @property
  def ttft(self) -> float | None:
    return self.token_times[0] - self.arrival if self.token_times else None

  @property
  def ttst(self) -> float | None:
    """Time to second token: includes the KV transfer in a disaggregated deployment."""
    return self.token_times[1] - self.arrival if len(self.token_times) > 1 else None

  @property
  def tpot(self) -> float | None:
    n = len(self.token_times)
    return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

  @property
  def itl(self) -> list[float]:
    t = self.token_times
    return [b - a for a, b in zip(t, t[1:])]

  @property
  def e2el(self) -> float | None:
    return None if self.end is None else self.end - self.arrival

  @property
  def ok(self) -> bool:
    return self.error is None and self.finish_reason is not None
