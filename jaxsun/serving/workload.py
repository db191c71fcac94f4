"""Seeded benchmark workloads: arrivals, model popularity, lengths, sessions, shared prefixes.

    spec = WorkloadSpec(models=("math", "code", "chat"), num_requests=200, rate=8.0,
                        burstiness=0.5, zipf_s=1.1, prompt_len=LengthDist.uniform(16, 48),
                        output_len=LengthDist.lognormal(24, 0.5, lo=4, hi=64), seed=0)
    for item in make_workload(spec):
      ...  # send item.request() at item.send_time (after item.depends_on finished)

Three kinds (`WorkloadSpec.kind`):

    independent    `num_requests` single requests
    sessions       multi-agent (ReAct-like) sessions: the task models take turns on one
                   growing context; turn i+1 depends on turn i
    shared_prefix  like SGLang's generated shared-prefix dataset: `num_groups` system
                   prompts of `shared_prefix_len` tokens, each followed by
                   `prompts_per_group` questions (prefix reuse across task models)

Arrivals are Poisson at `rate` req/s (sessions: session starts) or, with `burstiness`
!= 1, gamma distributed with the same mean and a coefficient of variation of
1 / sqrt(burstiness), as vLLM's `--burstiness`; `rate=inf` sends everything at t=0. The
seed feeds separate streams for arrivals, models, lengths, tokens and order, so the same
seed at another rate gives the same prompts at other times.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from jaxsun.serving.request import Request, SamplingParams

KINDS = ("independent", "sessions", "shared_prefix")
TURN_ORDERS = ("cycle", "random")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class LengthDist:
  """A token-length distribution; build it with `fixed`, `uniform` or `lognormal`.

  Attributes:
    kind: "fixed", "uniform" (integers in [lo, hi], both included) or "lognormal"
      (rounded, clipped to [lo, hi]).
    lo: smallest length.
    hi: largest length.
    mean: lognormal only: the mean of the unclipped distribution, in tokens.
    sigma: lognormal only: the standard deviation of log(length).
  """

  kind: str
  lo: int
  hi: int
  mean: float = 0.0
  sigma: float = 0.0

  def __post_init__(self):
    if self.kind not in ("fixed", "uniform", "lognormal"):
      raise ValueError(f"LengthDist.kind={self.kind!r} must be 'fixed', 'uniform' or "
                       "'lognormal'")
    if not _is_int(self.lo) or self.lo < 0:
      raise ValueError(f"LengthDist.lo={self.lo!r} must be an integer >= 0")
    if not _is_int(self.hi) or self.hi < self.lo:
      raise ValueError(f"LengthDist.hi={self.hi!r} must be an integer >= lo={self.lo}")
    if self.kind == "fixed" and self.lo != self.hi:
      raise ValueError(f"LengthDist: a fixed length needs lo == hi, got {self.lo}, {self.hi}")
    if self.kind == "lognormal":
      if not _is_number(self.mean) or not self.mean > 0:
        raise ValueError(f"LengthDist.mean={self.mean!r} must be > 0")
      if not _is_number(self.sigma) or not self.sigma >= 0:
        raise ValueError(f"LengthDist.sigma={self.sigma!r} must be >= 0")

  @classmethod
  def fixed(cls, n: int) -> LengthDist:
    return cls("fixed", n, n)

  @classmethod
  def uniform(cls, lo: int, hi: int) -> LengthDist:
    return cls("uniform", lo, hi)

  @classmethod
  def lognormal(cls, mean: float, sigma: float, lo: int = 1, hi: int = 1 << 20) -> LengthDist:
    return cls("lognormal", lo, hi, mean=mean, sigma=sigma)

  def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draws `n` lengths.

    Args:
      n: how many.
      rng: the numpy generator to draw from.

    Returns:
      int64[n] lengths in [lo, hi].
    """
    if self.kind == "fixed":
      return np.full(n, self.lo, np.int64)
    if self.kind == "uniform":
      return rng.integers(self.lo, self.hi + 1, size=n, dtype=np.int64)
    mu = math.log(self.mean) - self.sigma ** 2 / 2  # E[exp(N(mu, sigma^2))] = mean
    x = np.rint(rng.lognormal(mu, self.sigma, size=n))
    return np.clip(x, self.lo, self.hi).astype(np.int64)


def arrival_times(n: int, rate: float, rng: np.random.Generator,
                  burstiness: float = 1.0) -> np.ndarray:
  """Send-time offsets (seconds) of `n` requests; the first is sent at 0.

  Args:
    n: number of requests.
    rate: mean requests per second; `math.inf` sends all at t=0.
    rng: the numpy generator to draw from.
    burstiness: gamma shape k of the gaps (mean 1/rate, CV 1/sqrt(k)); 1 is Poisson,
      below 1 burstier, above 1 more regular.

  Returns:
    float64[n], nondecreasing.
  """
  if not rate > 0:
    raise ValueError(f"rate={rate!r} must be > 0 (math.inf: all at once)")
  if not burstiness > 0:
    raise ValueError(f"burstiness={burstiness!r} must be > 0")
  if math.isinf(rate) or n == 0:
    return np.zeros(n)
  gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n - 1)
  return np.concatenate([[0.0], np.cumsum(gaps)])


def zipf_probs(n: int, s: float) -> np.ndarray:
  """Zipf pmf over ranks 1..n: p_k proportional to k^-s (s=0: uniform)."""
  if not _is_int(n) or n < 1:
    raise ValueError(f"n={n!r} must be an integer >= 1")
  if not s >= 0:
    raise ValueError(f"s={s!r} must be >= 0")
  w = np.arange(1, n + 1, dtype=np.float64) ** -float(s)
  return w / w.sum()


def sample_models(models: Sequence[str], n: int, s: float,
                  rng: np.random.Generator) -> list[str]:
  """Draws `n` model ids, the k-th listed with Zipf probability proportional to k^-s."""
  idx = rng.choice(len(models), size=n, p=zipf_probs(len(models), s))
  return [models[i] for i in idx]


def sample_tokens(n: int, vocab: tuple[int, int], rng: np.random.Generator) -> tuple[int, ...]:
  """`n` token ids drawn uniformly from [vocab[0], vocab[1])."""
  return tuple(int(t) for t in rng.integers(vocab[0], vocab[1], size=n))


@dataclasses.dataclass(frozen=True)
class WorkloadItem:
  """One request of a workload.

  Attributes:
    send_time: offset in seconds from the start of the benchmark. A dependent item is
      sent at the later of this and the end of the item it depends on.
    model: task model id.
    prompt: token ids (for a session turn: the whole context so far, with placeholder
      tokens standing in for earlier outputs).
    sampling: SamplingParams; max_tokens is the drawn output length.
    session_id: the session (sessions workloads), else None.
    turn: the turn within the session (0 otherwise).
    depends_on: index in the workload list of the item that must finish first, or None.
    group: the shared-prefix group (shared_prefix workloads), else None.
  """

  send_time: float
  model: str
  prompt: tuple[int, ...]
  sampling: SamplingParams
  session_id: str | None = None
  turn: int = 0
  depends_on: int | None = None
  group: int | None = None

  def request(self, request_id: str = "") -> Request:
    """The `Request` to send (arrival time is stamped at construction)."""
    return Request(model=self.model, prompt=self.prompt, sampling=self.sampling,
                   request_id=request_id, session_id=self.session_id)


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
  """What `make_workload` generates. Ints given for lengths mean fixed lengths.

  Attributes:
    models: task model ids, most popular first (Zipf rank order).
    kind: "independent", "sessions" or "shared_prefix".
    num_requests: independent: number of requests.
    rate: mean arrivals per second (sessions: session starts); math.inf: all at t=0.
    burstiness: gamma shape of the inter-arrival gaps; 1 is Poisson.
    zipf_s: Zipf exponent of model popularity (0: uniform).
    prompt_len: prompt length (sessions: the initial context; shared_prefix: the
      question after the shared prefix).
    output_len: output length, i.e. max_tokens.
    vocab: prompt tokens are drawn from [vocab[0], vocab[1]).
    ignore_eos: SamplingParams.ignore_eos (True: outputs have exactly max_tokens).
    temperature: SamplingParams.temperature.
    seed: same seed, same workload.
    num_sessions: sessions: number of sessions.
    turns: sessions: turns per session.
    observation_len: sessions: tokens appended after each turn's output (a tool result).
    turn_order: sessions: "cycle" (turn i goes to models[i % len(models)]) or "random"
      (Zipf-weighted seeded choice).
    num_groups: shared_prefix: number of shared system prompts.
    prompts_per_group: shared_prefix: questions per system prompt.
    shared_prefix_len: shared_prefix: system prompt length.
    shuffle: shared_prefix: interleave the groups in a seeded random order.
    max_context_len: if set, prompt + output never exceeds it: independent and
      shared_prefix specs that could exceed it are rejected; a session ends before the
      first turn that would exceed it.
  """

  models: tuple[str, ...]
  kind: str = "independent"
  num_requests: int = 64
  rate: float = math.inf
  burstiness: float = 1.0
  zipf_s: float = 0.0
  prompt_len: LengthDist | int = 16
  output_len: LengthDist | int = 16
  vocab: tuple[int, int] = (1, 128)
  ignore_eos: bool = True
  temperature: float = 0.0
  seed: int = 0
  num_sessions: int = 8
  turns: int = 4
  observation_len: LengthDist | int = 4
  turn_order: str = "cycle"
  num_groups: int = 4
  prompts_per_group: int = 8
  shared_prefix_len: int = 32
  shuffle: bool = True
  max_context_len: int | None = None

  def __post_init__(self):
    def fail(field, must):
      raise ValueError(f"WorkloadSpec.{field}={getattr(self, field)!r} {must}")

    if isinstance(self.models, str) or not isinstance(self.models, Sequence):
      fail("models", "must be a sequence of model ids")
    object.__setattr__(self, "models", tuple(self.models))
    if not self.models or not all(isinstance(m, str) and m for m in self.models):
      fail("models", "must be non-empty model id strings")
    if len(set(self.models)) != len(self.models):
      fail("models", "must not repeat a model id")
    if self.kind not in KINDS:
      fail("kind", f"must be one of {KINDS}")
    for field in ("num_requests", "num_sessions", "turns", "num_groups", "prompts_per_group"):
      if not _is_int(getattr(self, field)) or getattr(self, field) < 1:
        fail(field, "must be an integer >= 1")
    if not _is_int(self.shared_prefix_len) or self.shared_prefix_len < 0:
      fail("shared_prefix_len", "must be an integer >= 0")
    if not _is_number(self.rate) or not self.rate > 0:
      fail("rate", "must be > 0 (math.inf: all at once)")
    if not _is_number(self.burstiness) or not 0 < self.burstiness < math.inf:
      fail("burstiness", "must be a finite number > 0")
    if not _is_number(self.zipf_s) or not 0 <= self.zipf_s < math.inf:
      fail("zipf_s", "must be a finite number >= 0")
    for field, lo in (("prompt_len", 1), ("output_len", 1), ("observation_len", 0)):
      value = getattr(self, field)
      if _is_int(value):
        if value < lo:
          fail(field, f"must be >= {lo}")
        object.__setattr__(self, field, LengthDist.fixed(int(value)))
      elif not isinstance(value, LengthDist):
        fail(field, "must be an int or a LengthDist")
      elif value.lo < lo:
        fail(field, f"must not draw lengths below {lo}")
    if isinstance(self.vocab, list):
      object.__setattr__(self, "vocab", tuple(self.vocab))
    if (not isinstance(self.vocab, tuple) or len(self.vocab) != 2
        or not all(_is_int(v) for v in self.vocab) or not 0 <= self.vocab[0] < self.vocab[1]):
      fail("vocab", "must be a tuple (lo, hi) of integers with 0 <= lo < hi")
    if not _is_number(self.temperature) or not self.temperature >= 0:
      fail("temperature", "must be >= 0")
    if not _is_int(self.seed):
      fail("seed", "must be an integer")
    if self.turn_order not in TURN_ORDERS:
      fail("turn_order", f"must be one of {TURN_ORDERS}")
    if self.max_context_len is not None:
      if not _is_int(self.max_context_len) or self.max_context_len < 2:
        fail("max_context_len", "must be None or an integer >= 2")
      longest = self.prompt_len.hi + self.output_len.hi
      if self.kind == "shared_prefix":
        longest += self.shared_prefix_len
      if longest > self.max_context_len:
        fail("max_context_len", f"is below the longest possible first request "
             f"(prompt + output = {longest} tokens)")


def make_workload(spec: WorkloadSpec) -> list[WorkloadItem]:
  """Generates the workload `spec` describes (deterministic in `spec.seed`).

  Args:
    spec: the workload.

  Returns:
    Items in nondecreasing send_time; `depends_on` indexes into this list.
  """
  streams = np.random.SeedSequence(spec.seed).spawn(5)
  rngs = dict(zip(("arrivals", "models", "lengths", "tokens", "order"),
                  (np.random.default_rng(s) for s in streams)))
  if spec.kind == "independent":
    return _independent(spec, rngs)
  if spec.kind == "sessions":
    return _sessions(spec, rngs)
  return _shared_prefix(spec, rngs)


def _sampling(spec: WorkloadSpec, max_tokens: int) -> SamplingParams:
  return SamplingParams(max_tokens=int(max_tokens), temperature=float(spec.temperature),
                        ignore_eos=spec.ignore_eos)


def _independent(spec: WorkloadSpec, rngs) -> list[WorkloadItem]:
  n = spec.num_requests
  times = arrival_times(n, spec.rate, rngs["arrivals"], spec.burstiness)
  models = sample_models(spec.models, n, spec.zipf_s, rngs["models"])
  prompt_lens = spec.prompt_len.sample(n, rngs["lengths"])
  output_lens = spec.output_len.sample(n, rngs["lengths"])
  return [WorkloadItem(float(times[i]), models[i],
                       sample_tokens(int(prompt_lens[i]), spec.vocab, rngs["tokens"]),
                       _sampling(spec, output_lens[i]))
          for i in range(n)]


def _sessions(spec: WorkloadSpec, rngs) -> list[WorkloadItem]:
  n, turns = spec.num_sessions, spec.turns
  starts = arrival_times(n, spec.rate, rngs["arrivals"], spec.burstiness)
  random_models = sample_models(spec.models, n * turns, spec.zipf_s, rngs["models"])
  context_lens = spec.prompt_len.sample(n, rngs["lengths"])
  output_lens = spec.output_len.sample(n * turns, rngs["lengths"]).reshape(n, turns)
  obs_lens = spec.observation_len.sample(n * turns, rngs["lengths"]).reshape(n, turns)
  items: list[WorkloadItem] = []
  for s in range(n):
    context = sample_tokens(int(context_lens[s]), spec.vocab, rngs["tokens"])
    for t in range(turns):
      out = int(output_lens[s, t])
      if spec.max_context_len is not None and len(context) + out > spec.max_context_len:
        break
      model = (spec.models[t % len(spec.models)] if spec.turn_order == "cycle"
               else random_models[s * turns + t])
      items.append(WorkloadItem(float(starts[s]), model, context, _sampling(spec, out),
                                session_id=f"session-{s}", turn=t,
                                depends_on=len(items) - 1 if t else None))
      # The real output is unknown here: placeholder tokens stand in for it, then the
      # observation (e.g. a tool result) the next agent reads.
      context += sample_tokens(out + int(obs_lens[s, t]), spec.vocab, rngs["tokens"])
  return items


def _shared_prefix(spec: WorkloadSpec, rngs) -> list[WorkloadItem]:
  g, per = spec.num_groups, spec.prompts_per_group
  n = g * per
  question_lens = spec.prompt_len.sample(n, rngs["lengths"])
  output_lens = spec.output_len.sample(n, rngs["lengths"])
  prompts, groups = [], []
  for i in range(g):
    prefix = sample_tokens(spec.shared_prefix_len, spec.vocab, rngs["tokens"])
    for j in range(per):
      prompts.append(prefix + sample_tokens(int(question_lens[i * per + j]), spec.vocab,
                                            rngs["tokens"]))
      groups.append(i)
  order = rngs["order"].permutation(n) if spec.shuffle else np.arange(n)
  times = arrival_times(n, spec.rate, rngs["arrivals"], spec.burstiness)
  models = sample_models(spec.models, n, spec.zipf_s, rngs["models"])
  return [WorkloadItem(float(times[k]), models[k], prompts[i], _sampling(spec, output_lens[i]),
                       group=groups[i])
          for k, i in enumerate(int(i) for i in order)]
