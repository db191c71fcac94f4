"""The benchmark client: sends a workload to a serving `Backend` or an HTTP server.

    from jaxsun.serving import bench, workload
    items = workload.make_workload(workload.WorkloadSpec(models=("math", "code"),
                                                         num_requests=200, rate=8.0))
    result = bench.run_workload(system, items)                    # in-process Backend
    result = bench.run_workload("http://127.0.0.1:8000", items)   # OpenAI HTTP API
    print(result.summary(slo={"ttft_ms": 200})["p99_ttft_ms"], result.accounting())

or from a shell, against a running server (vLLM `bench serve`-like flags):

    python -m jaxsun.serving.bench --url http://127.0.0.1:8000 --num-requests 200 \\
        --rate 8 --models math,code --prompt-len 16:48 --output-len 32 --seed 0 \\
        --out results.json --plot cdf.png

Each item is sent at its `send_time` (times `time_scale`) after the start; a session turn
(`depends_on`) is sent at the later of its send time and the end of the turn it depends
on, whatever that turn's outcome (the workload's prompts already stand in for earlier
outputs, and a fixed request count keeps deployments comparable). With
`max_concurrency`, at most that many requests are open at once and a request's clock
starts when it is actually sent (as vLLM's `--max-concurrency`).

Every item ends as exactly one `RequestRecord`, in item order, with client-side times
(`time.monotonic()`): `arrival` when it was sent, `token_times` when each token reached
the client, `end` when its response ended. Outcomes (`metrics.summarize` counts them):

    completed   `finish_reason` set, no error
    rejected    status 429 / 503: the backend refused it at admission (`Overloaded`)
    failed      any other status: 400 / 404 (`RequestError`), 500 (failed mid-stream),
                TIMEOUT_STATUS (the client gave up after `timeout_s`), NO_RESPONSE_STATUS
                (the connection failed or the stream broke without an answer)

In-process, the backend's own record adds what only the server knows (workers, KV
transfer, cached prompt tokens, retries). Over HTTP (`POST /v1/completions` with
`stream: true` and token-id prompts) an SSE chunk carries text, not token ids, and one
chunk may merge several tokens (a multi-byte character, text held back for a stop
string, tokens that decode to nothing). So: the token count is the server's
`usage.completion_tokens` (`stream_options.include_usage`); TTFT and ITL come from the
chunk arrival times; with a `tokenizer`, each chunk's tokens are counted by re-encoding
its text, and all its tokens get the chunk's time (ITL 0 inside a chunk, as the client
saw them). Tokens the text does not account for get the time of the chunk that ended the
request. `output_tokens` are the re-encoded ids when they account for exactly the usage
count (lossless for the byte tokenizer), else -1 placeholders.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import sys
import threading
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

from jaxsun.serving import metrics
from jaxsun.serving.backend import Backend
from jaxsun.serving.request import RequestRecord, ServingError
from jaxsun.serving.workload import LengthDist, WorkloadItem, WorkloadSpec, make_workload

logger = logging.getLogger(__name__)

TIMEOUT_STATUS = 504  # the client gave up waiting (`timeout_s`)
NO_RESPONSE_STATUS = 0  # no HTTP answer: connection refused / reset, a broken stream
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_CONNECTIONS = 512  # HTTP: more open requests than this wait for a connection
KEEPALIVE_EXPIRY_S = 2.0


@dataclasses.dataclass
class BenchResult:
  """What `run_workload` measured.

  Attributes:
    records: one RequestRecord per item, in item order (client-side times).
    duration_s: from the benchmark's start to the end of its last request.
    items: the workload that was sent.
    start: `time.monotonic()` at the benchmark's t=0 (record times are absolute).
    texts: HTTP only: each item's streamed text (None if it produced none).
  """

  records: list[RequestRecord]
  duration_s: float
  items: list[WorkloadItem]
  start: float
  texts: list[str | None] = dataclasses.field(default_factory=list)

  def summary(self, slo: Mapping[str, float] | None = None,
              n_devices: int | Mapping[str, int] | None = None,
              occupancy: Sequence[float] | None = None) -> dict[str, Any]:
    """`metrics.summarize` of the records (vLLM names), plus `"accounting"`.

    Args:
      slo: goodput targets in ms, e.g. `{"ttft_ms": 200, "tpot_ms": 50}`.
      n_devices: devices the deployment used (a count or pool -> count).
      occupancy: decode-batch occupancy samples (e.g. `ServingSystem.occupancy()`).

    Returns:
      The summary dict; `accounting` is `self.accounting()`.
    """
    duration = self.duration_s if self.duration_s > 0 else 1e-9
    s = metrics.summarize(self.records, duration, slo=slo, n_devices=n_devices,
                          occupancy=occupancy)
    s["accounting"] = self.accounting()
    return s

  def accounting(self) -> dict[str, Any]:
    """Whether every item is counted exactly once, and completed outputs' lengths.

    Returns:
      items, records, completed / rejected / failed (summing to items when nothing is
      lost), lost (items without a record), duplicate_ids (records sharing a request id
      with another), wrong_lengths (completed outputs longer than max_tokens, or, with
      `ignore_eos` and no stop tokens, not exactly max_tokens long) and `balanced`.
    """
    recs = [r for r in self.records if r is not None]
    ids = collections.Counter(r.request_id for r in recs)
    completed = sum(r.ok for r in recs)
    rejected = sum(not r.ok and r.status in metrics.REJECTED_STATUSES for r in recs)
    wrong = 0
    for item, r in zip(self.items, self.records):
      if r is None or not r.ok:
        continue
      n, want = len(r.output_tokens), item.sampling.max_tokens
      exact = item.sampling.ignore_eos and not item.sampling.stop_token_ids
      wrong += n > want or (exact and n != want)
    out = {"items": len(self.items), "records": len(recs), "completed": completed,
           "rejected": rejected, "failed": len(recs) - completed - rejected,
           "lost": len(self.items) - len(recs),
           "duplicate_ids": sum(c - 1 for c in ids.values() if c > 1),
           "wrong_lengths": wrong}
    out["balanced"] = (out["lost"] == 0 and out["duplicate_ids"] == 0
                       and completed + rejected + out["failed"] == len(self.items))
    return out


# ---------------------------------------------------------------------------------------
# Senders: one request, filling its record in place (so a timeout keeps what arrived).


class _InProcess:
  """Submits to a `Backend` and reads its events on this event loop."""

  def __init__(self, backend: Backend):
    self.backend = backend

  async def send(self, i: int, item: WorkloadItem, rec: RequestRecord, state: dict) -> None:
    # The backend's submit is admission only (the protocol's contract), so it is called
    # on the loop: a thread hop per request would cost more than it does.
    try:
      request = item.request(request_id=rec.request_id)
      request.arrival_time = rec.arrival
      handle = self.backend.submit(request)
    except ServingError as e:
      rec.status, rec.error = int(getattr(e, "status", 500)), str(e)
      return
    state["handle"] = handle
    try:
      async with contextlib.aclosing(handle.aevents()) as events:
        async for event in events:
          now = time.monotonic()
          if event.token is not None:
            rec.output_tokens.append(int(event.token))
            rec.token_times.append(now)
          if event.finished:
            rec.finish_reason = event.finish_reason or "stop"
    except ServingError as e:  # failed after admission (e.g. RequestFailed)
      rec.status, rec.error = int(getattr(e, "status", 500)), str(e)
    finally:
      _copy_server_fields(rec, handle.record)
    if rec.error is None and rec.finish_reason is None:
      rec.status, rec.error = NO_RESPONSE_STATUS, "the event stream ended without a finish"

  def cancel(self, state: dict) -> None:
    handle = state.get("handle")
    if handle is not None:
      handle.cancel()


def _copy_server_fields(rec: RequestRecord, server: RequestRecord) -> None:
  """What only the server measured; client-side times stay the client's."""
  for f in ("prefill_start", "prefill_end", "cached_prompt_tokens", "transfer_s",
            "transfer_bytes", "prefill_worker", "decode_worker", "retries"):
    setattr(rec, f, getattr(server, f))


class _Http:
  """`POST /v1/completions` with `stream: true`, over one httpx.AsyncClient."""

  def __init__(self, url: str, client, tokenizer, max_connections: int):
    self.url = url
    self.client = client
    self.tokenizer = tokenizer
    # httpcore's pool scans every connection for every queued request: thousands queued
    # there make the client quadratic and starve everything else on its cores. So no
    # request waits inside httpx; they wait here, for a connection of their own.
    self.gate = asyncio.Semaphore(max_connections)

  @staticmethod
  def body(item: WorkloadItem) -> dict[str, Any]:
    s = item.sampling
    body = {"model": item.model, "prompt": list(item.prompt), "max_tokens": s.max_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
            "ignore_eos": s.ignore_eos, "stream": True,
            "stream_options": {"include_usage": True}}
    if s.stop_token_ids:
      body["stop_token_ids"] = list(s.stop_token_ids)
    if s.seed is not None:
      body["seed"] = s.seed
    if item.session_id is not None:
      body["session_id"] = item.session_id
    return body

  async def send(self, i: int, item: WorkloadItem, rec: RequestRecord, state: dict) -> None:
    import httpx  # pylint: disable=import-outside-toplevel

    chunks: list[tuple[float, str]] = []  # (arrival time, text) of chunks with text
    state["chunks"] = chunks
    usage, finish_time, done = None, None, False
    try:
      async with self.gate, self.client.stream("POST", self.url + "/v1/completions",
                                               json=self.body(item)) as resp:
        if resp.status_code != 200:
          rec.status, rec.error = resp.status_code, _error_message(await resp.aread())
          return
        async for line in resp.aiter_lines():
          if not line.startswith("data:"):
            continue
          data = line[5:].strip()
          if data == "[DONE]":
            done = True
            break
          now = time.monotonic()
          obj = json.loads(data)
          if "error" in obj:  # failed after the 200: one error event, no [DONE]
            err = obj["error"] or {}
            rec.status = 500
            rec.error = str(err.get("message") or err)
            return
          if obj.get("id"):
            rec.request_id = obj["id"]  # the server's id: unique per request it admitted
          for choice in obj.get("choices") or ():
            if choice.get("text"):
              chunks.append((now, choice["text"]))
            if choice.get("finish_reason"):
              rec.finish_reason, finish_time = choice["finish_reason"], now
          if obj.get("usage"):
            usage = obj["usage"]
    except httpx.HTTPError as e:
      rec.status, rec.error = NO_RESPONSE_STATUS, f"{type(e).__name__}: {e}"
      return
    if not done or rec.finish_reason is None:
      rec.finish_reason = None
      rec.status, rec.error = NO_RESPONSE_STATUS, "the stream ended before [DONE]"
      return
    n = int(usage["completion_tokens"]) if usage else len(chunks)
    self._fill_tokens(rec, chunks, n, finish_time)

  def _fill_tokens(self, rec: RequestRecord, chunks, n: int, finish_time: float) -> None:
    """Token ids and times from text chunks and the usage count (module docstring)."""
    counts = [1] * len(chunks)
    ids = None
    if self.tokenizer is not None:
      counts = [len(self.tokenizer.encode(text)) for _, text in chunks]
      ids = self.tokenizer.encode("".join(text for _, text in chunks))
    if sum(counts) > n:  # the text does not re-encode to the server's tokens
      counts = [1] * len(chunks)
    times = [t for (t, _), c in zip(chunks, counts) for _ in range(c)][:n]
    times += [finish_time] * (n - len(times))
    rec.token_times = times
    rec.output_tokens = list(ids) if ids is not None and len(ids) == n else [-1] * n

  def cancel(self, state: dict) -> None:
    pass  # leaving the `async with` closes the connection; the server then cancels


def _error_message(raw: bytes) -> str:
  try:
    err = json.loads(raw)["error"]
    return str(err.get("message") or err)
  except (ValueError, KeyError, TypeError, AttributeError):
    return raw.decode("utf-8", errors="replace")[:500] or "(empty body)"


# ---------------------------------------------------------------------------------------
# Running a workload


def _check_dependencies(items: Sequence[WorkloadItem]) -> None:
  n = len(items)
  for i, item in enumerate(items):
    d = item.depends_on
    if d is not None and not (isinstance(d, int) and 0 <= d < n and d != i):
      raise ValueError(f"items[{i}].depends_on={d!r} must index another item in [0, {n})")
  state = [0] * n  # 0 unseen, 1 on the current chain, 2 known to end
  for i in range(n):
    chain, j = [], i
    while j is not None and state[j] == 0:
      state[j] = 1
      chain.append(j)
      j = items[j].depends_on
    if j is not None and state[j] == 1:
      raise ValueError(f"items[{j}] depends on itself through a cycle of depends_on")
    for k in chain:
      state[k] = 2


def _target_name(target) -> str:
  return target if isinstance(target, str) else type(target).__name__


def _base_url(url: str) -> str:
  url = url.rstrip("/")
  return url[:-3] if url.endswith("/v1") else url


async def arun_workload(target: Backend | str, items: Sequence[WorkloadItem], *,
                        time_scale: float = 1.0, max_concurrency: int | None = None,
                        timeout_s: float = DEFAULT_TIMEOUT_S, tokenizer: Any = None,
                        max_connections: int = DEFAULT_MAX_CONNECTIONS,
                        on_record: Callable[[int, RequestRecord], None] | None = None
                        ) -> BenchResult:
  """`run_workload` for code already on an event loop (the same arguments)."""
  items = list(items)
  if not all(isinstance(it, WorkloadItem) for it in items):
    raise TypeError("items must be WorkloadItems (jaxsun.serving.workload.make_workload)")
  if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) \
      or not 0 <= time_scale < math.inf:
    raise ValueError(f"time_scale={time_scale!r} must be a finite number >= 0")
  if max_concurrency is not None and (isinstance(max_concurrency, bool) or
                                      not isinstance(max_concurrency, int)
                                      or max_concurrency < 1):
    raise ValueError(f"max_concurrency={max_concurrency!r} must be None or an integer >= 1")
  if not timeout_s > 0:
    raise ValueError(f"timeout_s={timeout_s!r} must be > 0")
  _check_dependencies(items)
  if isinstance(tokenizer, str):
    from jaxsun.data.tokenizers import get_tokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = get_tokenizer(tokenizer)

  run_tag = uuid.uuid4().hex[:8]
  n = len(items)
  records: list[RequestRecord | None] = [None] * n
  texts: list[str | None] = [None] * n
  done = [asyncio.Event() for _ in range(n)]
  sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

  async with contextlib.AsyncExitStack() as stack:
    if isinstance(target, str):
      import httpx  # pylint: disable=import-outside-toplevel

      conns = max_connections if max_concurrency is None else min(max_connections,
                                                                  max_concurrency)
      client = await stack.enter_async_context(httpx.AsyncClient(
          timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
          # Idle connections expire before the server's keep-alive timeout (uvicorn: 5 s),
          # so requests are not sent on connections the server is about to close.
          limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns,
                              keepalive_expiry=KEEPALIVE_EXPIRY_S),
          trust_env=False))  # loopback benchmarks must not go through an HTTP proxy
      sender = _Http(_base_url(target), client, tokenizer, conns)
    else:
      if not callable(getattr(target, "submit", None)):
        raise TypeError(f"target must be a Backend or a base URL, got {_target_name(target)}")
      sender = _InProcess(target)

    start = time.monotonic()

    async def one(i: int) -> None:
      item = items[i]
      rec = RequestRecord(request_id=f"bench-{run_tag}-{i}", model=item.model,
                          prompt_len=len(item.prompt), arrival=0.0)
      state: dict[str, Any] = {}
      try:
        await asyncio.sleep(max(0.0, start + item.send_time * time_scale - time.monotonic()))
        if item.depends_on is not None:
          await done[item.depends_on].wait()
        async with (sem if sem is not None else contextlib.nullcontext()):
          rec.arrival = time.monotonic()
          try:
            async with asyncio.timeout(timeout_s):
              await sender.send(i, item, rec, state)
          except TimeoutError:
            sender.cancel(state)
            rec.finish_reason = None
            rec.status, rec.error = TIMEOUT_STATUS, f"no answer within {timeout_s} s"
      except Exception as e:  # pylint: disable=broad-except
        # A client-side bug must not lose the request: it ends as failed, with the reason.
        rec.finish_reason = None
        rec.status, rec.error = NO_RESPONSE_STATUS, f"client error: {type(e).__name__}: {e}"
      finally:
        rec.end = time.monotonic()
        if not rec.arrival:
          rec.arrival = rec.end
        if rec.error is not None and rec.status == 200:
          rec.status = 500
        if "chunks" in state and state["chunks"]:
          texts[i] = "".join(t for _, t in state["chunks"])
        records[i] = rec  # the only place a record is stored: once per item
        done[i].set()
        if on_record is not None:
          try:
            on_record(i, rec)
          except Exception:  # pylint: disable=broad-except
            logger.exception("on_record(%d, ...) failed", i)  # the run goes on

    await asyncio.gather(*(one(i) for i in range(n)))
    duration = time.monotonic() - start

  missing = [i for i, r in enumerate(records) if r is None]
  if missing:
    raise AssertionError(f"items {missing[:10]} ended without a record")
  return BenchResult(records=records, duration_s=duration, items=items, start=start,
                     texts=texts)


def run_workload(target: Backend | str, items: Sequence[WorkloadItem], *,
                 time_scale: float = 1.0, max_concurrency: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, tokenizer: Any = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 on_record: Callable[[int, RequestRecord], None] | None = None
                 ) -> BenchResult:
  """Sends `items` to `target` on their schedule and records every request.

  Args:
    target: a `Backend` (in-process) or the base URL of an OpenAI-compatible server,
      e.g. "http://127.0.0.1:8000" (a trailing "/v1" is accepted).
    items: the workload (`workload.make_workload`); `depends_on` indexes into it.
    time_scale: multiplies every send time (0: send everything at once, dependencies
      still respected).
    max_concurrency: at most this many requests open at once (None: no bound).
    timeout_s: a request still open after this many seconds is abandoned (cancelled)
      and recorded as failed with TIMEOUT_STATUS.
    tokenizer: HTTP only: a tokenizer or its name (e.g. "byte") to count the tokens of
      each text chunk and recover output ids; None counts one token per chunk.
    max_connections: HTTP only: at most this many connections (requests) open at once;
      more wait for one, and that wait is part of their latency.
    on_record: called as `on_record(index, record)` when an item ends (e.g. progress).

  Returns:
    A BenchResult with one record per item, in item order.
  """
  coro = arun_workload(target, items, time_scale=time_scale, max_concurrency=max_concurrency,
                       timeout_s=timeout_s, tokenizer=tokenizer,
                       max_connections=max_connections, on_record=on_record)
  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return asyncio.run(coro)
  # Called from a running loop (a notebook cell): run on a loop of its own thread.
  out: dict[str, Any] = {}

  def runner():
    try:
      out["result"] = asyncio.run(coro)
    except BaseException as e:  # pylint: disable=broad-except
      out["error"] = e

  thread = threading.Thread(target=runner, name="jaxsun-bench", daemon=True)
  thread.start()
  thread.join()
  if "error" in out:
    raise out["error"]
  return out["result"]


# ---------------------------------------------------------------------------------------
# The CLI


def parse_length(text: str) -> LengthDist:
  """A length flag: "16" (fixed), "16:48" (uniform, both included) or
  "lognormal:MEAN:SIGMA[:LO:HI]"."""
  parts = text.split(":")
  try:
    if parts[0] == "lognormal" and len(parts) in (3, 5):
      bounds = [int(p) for p in parts[3:]] or [1, 1 << 20]
      return LengthDist.lognormal(float(parts[1]), float(parts[2]), *bounds)
    if len(parts) == 1:
      return LengthDist.fixed(int(parts[0]))
    if len(parts) == 2:
      return LengthDist.uniform(int(parts[0]), int(parts[1]))
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"bad length {text!r}: {e}") from None
  raise argparse.ArgumentTypeError(
      f"bad length {text!r}: use N, LO:HI or lognormal:MEAN:SIGMA[:LO:HI]")


def parse_slo(text: str) -> dict[str, float]:
  """"ttft:200,tpot:50" (ms) -> {"ttft": 200.0, "tpot": 50.0}."""
  out = {}
  for part in filter(None, text.replace(" ", ",").split(",")):
    name, _, value = part.partition(":")
    try:
      out[name] = float(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"bad SLO {part!r}: use METRIC:MS") from None
  return out


def _served_models(url: str) -> list[str]:
  import httpx  # pylint: disable=import-outside-toplevel

  resp = httpx.get(_base_url(url) + "/v1/models", timeout=30.0, trust_env=False)
  resp.raise_for_status()
  return [m["id"] for m in resp.json()["data"]]


def _print_summary(s: Mapping[str, Any]) -> None:
  def fmt(v):
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

  rows = [("completed", s["completed"]), ("rejected", s["rejected"]),
          ("failed", s["failed"]), ("duration (s)", s["duration"]),
          ("request throughput (req/s)", s["request_throughput"]),
          ("output throughput (tok/s)", s["output_throughput"])]
  for m in ("ttft", "tpot", "itl", "e2el"):
    rows += [(f"{q} {m.upper()} (ms)", s[f"{q}_{m}_ms"]) for q in ("median", "p99")]
  if s.get("request_goodput") is not None:
    rows.append(("request goodput (req/s)", s["request_goodput"]))
  for name, value in rows:
    print(f"{name:<32}{fmt(value):>14}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """The CLI (see the module docstring); returns the summary it wrote."""
  ap = argparse.ArgumentParser(prog="python -m jaxsun.serving.bench",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
  ap.add_argument("--models", default="", help="comma-separated ids, most popular first "
                  "(default: every model the server lists)")
  ap.add_argument("--kind", default="independent", choices=("independent", "sessions",
                                                            "shared_prefix"))
  ap.add_argument("--num-requests", type=int, default=100)
  ap.add_argument("--rate", type=float, default=math.inf, help="req/s (inf: all at once)")
  ap.add_argument("--burstiness", type=float, default=1.0)
  ap.add_argument("--zipf-s", type=float, default=0.0)
  ap.add_argument("--prompt-len", type=parse_length, default=LengthDist.fixed(16))
  ap.add_argument("--output-len", type=parse_length, default=LengthDist.fixed(16))
  ap.add_argument("--vocab", default="1:128", help="prompt token ids drawn from LO:HI")
  ap.add_argument("--num-sessions", type=int, default=8)
  ap.add_argument("--turns", type=int, default=4)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--no-ignore-eos", action="store_true",
                  help="stop at EOS (default: outputs have exactly --output-len tokens)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--max-concurrency", type=int, default=None)
  ap.add_argument("--time-scale", type=float, default=1.0)
  ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                  help="seconds before a request is abandoned")
  ap.add_argument("--tokenizer", default=None, help="e.g. byte: count tokens per chunk")
  ap.add_argument("--slo", type=parse_slo, default=None, help="goodput, e.g. ttft:200,tpot:50")
  ap.add_argument("--out", required=True, help="the JSON file to write")
  ap.add_argument("--plot", default=None, help="a PNG of latency CDFs")
  ap.add_argument("--no-records", action="store_true", help="leave per-request records out")
  args = ap.parse_args(argv)

  models = [m for m in args.models.split(",") if m] or _served_models(args.url)
  lo, _, hi = args.vocab.partition(":")
  spec = WorkloadSpec(models=tuple(models), kind=args.kind, num_requests=args.num_requests,
                      rate=args.rate, burstiness=args.burstiness, zipf_s=args.zipf_s,
                      prompt_len=args.prompt_len, output_len=args.output_len,
                      vocab=(int(lo), int(hi)), ignore_eos=not args.no_ignore_eos,
                      temperature=args.temperature, seed=args.seed,
                      num_sessions=args.num_sessions, turns=args.turns)
  items = make_workload(spec)
  result = run_workload(args.url, items, time_scale=args.time_scale,
                        max_concurrency=args.max_concurrency, timeout_s=args.timeout,
                        tokenizer=args.tokenizer)
  summary = result.summary(slo=args.slo)
  summary["benchmark"] = {"url": args.url, "models": models,
                          "argv": list(sys.argv[1:] if argv is None else argv),
                          "workload": dataclasses.asdict(spec)}
  metrics.write_json(args.out, summary, None if args.no_records else result.records)
  if args.plot:
    metrics.plot_latency_cdfs({args.url: result.records}, args.plot)
  _print_summary(summary)
  return summary


__all__ = ["BenchResult", "NO_RESPONSE_STATUS", "TIMEOUT_STATUS", "arun_workload", "main",
           "parse_length", "parse_slo", "run_workload"]


if __name__ == "__main__":
  main()

