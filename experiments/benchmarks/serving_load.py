"""Loopback load test: a SUN deployment behind the real HTTP API, pushed past saturation.

    python -m experiments.benchmarks.serving_load                 # 10,000 requests
    python -m experiments.benchmarks.serving_load --tiny          # 200 requests (tests)
    python -m experiments.benchmarks.serving_load --requests 2000 --load-factor 3

An in-process `ServingSystem` ("sun": two tiny task models with their own prefill trees
and one shared decode tree, random weights) is served by `jaxsun.serving.api.serve` on
127.0.0.1 (a free port), and the benchmark client (`jaxsun.serving.bench`) streams
`/v1/completions` with token-id prompts:

  1. warm-up: a few requests compile the engine's shapes;
  2. saturation: `--saturation-requests` requests all at once, at most `max_inflight`
     open (so none is refused): completed requests / duration is the saturation rate;
  3. load: `--requests` Poisson arrivals at `--load-factor` x the saturation rate. The
     queues are bounded (`max_inflight`, `max_queue`), so the overflow is refused with
     explicit 429s rather than queued without bound.

Checked (and asserted after the results are written): every request ends exactly once as
completed, rejected (429/503) or failed with a status; no request id repeats; completed
outputs have exactly `output_len` tokens (usage count and the ids recovered from the
text); the server's `/metrics` counters moved by exactly the client's counts. Reports
p50/p95/p99 TTFT, TPOT and E2EL, throughputs and the rejected count, as JSON + markdown
(`experiments/benchmarks/results/serving_load_[tiny_]cpu.*`).

The client runs phases 2 and 3 in a spawned process of its own: in the server's process
its Python work would share the server's interpreter lock, and past saturation a client
that cannot keep up measures itself. `--client-in-process` runs it on a thread instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import time

import httpx
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

import jaxsun
from experiments.benchmarks import common
from jaxsun.serving import api, bench, metrics
from jaxsun.serving.system import DeploymentConfig, ServingSystem
from jaxsun.serving.workload import LengthDist, WorkloadSpec, make_workload

# The tiny architecture and engine shape of the serving tests, so a test process that
# runs both compiles once.
MODEL = dict(name="serve-test", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
             n_kv_heads=1, d_ff=64, max_len=128, init_std=0.2)
ENGINE = dict(slots=4, capacity=96, chunk=4)
# Bounded queues: past `max_inflight` requests in the system, new ones get a 429. The
# prefix cache is off: random 8-token prompts never share a cached prefix.
LIMITS = dict(max_inflight=32, max_queue=16, prefix_cache_mb=0.0)
PROMPT_LEN = LengthDist.uniform(6, 10)
OUTPUT_LEN = 4
TIMEOUT_S = 600.0  # longer than any run here: a client timeout would be a lost answer


def sun_models() -> dict[str, jaxsun.SplitModel]:
  """Two SUN task models: own prefill trees (seeds 1, 2), the base's (seed 0) decode tree."""
  cfg = jaxsun.ModelConfig(**MODEL)

  def tree(seed):
    return jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(seed)))

  base = tree(0)
  return {name: jaxsun.SplitModel(graphdef=base.graphdef, prefill=tree(seed).prefill,
                                  decode=base.prefill)
          for name, seed in (("math", 1), ("code", 2))}


def workload(n: int, rate: float, seed: int):
  spec = WorkloadSpec(models=("math", "code"), num_requests=n, rate=rate,
                      prompt_len=PROMPT_LEN, output_len=OUTPUT_LEN,
                      vocab=(1, MODEL["vocab_size"]), ignore_eos=True, temperature=0.0,
                      seed=seed)
  return spec, make_workload(spec)


def scrape(url: str) -> dict:
  """The server's request counters: outcomes (system) and HTTP statuses (API)."""
  text = httpx.get(url + "/metrics", timeout=30.0, trust_env=False).text
  out = {"outcomes": {}, "http_status": {}, "inflight": None}
  for family in text_string_to_metric_families(text):
    for s in family.samples:
      if s.name == "jaxsun_requests_total":
        out["outcomes"][s.labels["outcome"]] = int(s.value)
      elif s.name == "jaxsun_api_requests_total" and s.labels["endpoint"] == "/v1/completions":
        out["http_status"][s.labels["status"]] = int(s.value)
      elif s.name == "jaxsun_inflight_requests":
        out["inflight"] = int(s.value)
  return out


def _delta(after: dict, before: dict) -> dict:
  keys = sorted(set(after) | set(before))
  return {k: after.get(k, 0) - before.get(k, 0) for k in keys}


def server_counts(url: str, before: dict, expect: dict, wait_s: float = 15.0) -> dict:
  """Counter deltas since `before`; scrapes again while they lag the client's counts (the
  API counts a stream after its last byte, which the client may read first)."""
  deadline = time.monotonic() + wait_s
  while True:
    after = scrape(url)
    delta = {"outcomes": _delta(after["outcomes"], before["outcomes"]),
             "http_status": _delta(after["http_status"], before["http_status"]),
             "inflight": after["inflight"]}
    if _matches(delta, expect) or time.monotonic() > deadline:
      return delta
    time.sleep(0.2)


def _client_expectation(result: bench.BenchResult) -> dict:
  """What the server's counters should have moved by, from the client's records."""
  acc = result.accounting()
  answered = [r for r in result.records
              if r.status not in (bench.NO_RESPONSE_STATUS, bench.TIMEOUT_STATUS)]
  return {"completed": acc["completed"], "rejected": acc["rejected"],
          "failed_500": sum(r.status == 500 for r in result.records),
          "http_answers": len(answered)}


def _matches(delta: dict, expect: dict) -> bool:
  """Outcome counters equal the client's counts, every HTTP answer was counted once, and
  nothing is left in flight. (A stream that fails after its 200 is a 500 to the client and
  a 200 to the API's counter, so HTTP statuses are compared in total and for 429/503.)"""
  o, h = delta["outcomes"], delta["http_status"]
  return (o.get("completed", 0) == expect["completed"]
          and o.get("rejected", 0) == expect["rejected"]
          and o.get("failed", 0) == expect["failed_500"]
          and h.get("429", 0) + h.get("503", 0) == expect["rejected"]
          and sum(h.values()) == expect["http_answers"]
          and delta["inflight"] == 0)


def _diagnostics(res: bench.BenchResult, system: ServingSystem) -> dict:
  """Where the time went: before admission (HTTP, parsing, the API's loop), after it
  (the system's own TTFT), and how long a refusal took. Client and server share the
  machine's monotonic clock, so their times compare."""
  server = {r.request_id: r for r in list(system.records)}
  pairs = [(r, server[r.request_id]) for r in res.records if r.ok and r.request_id in server]
  rejected = [r for r in res.records if r.status in (429, 503)]

  def pct(values):
    s = metrics.stats("x", [1000.0 * v for v in values], percentiles=(50, 99))
    return {"p50": s["p50_x"], "p99": s["p99_x"], "mean": s["mean_x"]}

  return {"before_admission_ms": pct([s.arrival - c.arrival for c, s in pairs]),
          "server_ttft_ms": pct([s.ttft for _, s in pairs if s.ttft is not None]),
          "rejection_latency_ms": pct([r.e2el for r in rejected if r.e2el is not None]),
          "matched_server_records": len(pairs)}


def _pick(summary: dict) -> dict:
  keys = ["num_requests", "completed", "rejected", "failed", "status_counts", "duration",
          "request_throughput", "output_throughput", "total_token_throughput",
          "total_output_tokens"]
  for m in ("ttft", "tpot", "itl", "e2el"):
    keys += [f"mean_{m}_ms"] + [f"p{q}_{m}_ms" for q in (50, 95, 99)]
  return {k: summary[k] for k in keys}


def _progress(n: int):
  """Prints a line every tenth of the run: a stalled client or server shows at once."""
  t0, counts = time.monotonic(), {"done": 0, "ok": 0}

  def on_record(_, record) -> None:
    counts["done"] += 1
    counts["ok"] += record.ok
    if counts["done"] % max(1, n // 10) == 0 or counts["done"] == n:
      print(f"  {counts['done']:,}/{n:,} ended ({counts['ok']:,} completed) after "
            f"{time.monotonic() - t0:.1f} s", flush=True)

  return on_record


def client_phases(url: str, *, requests: int, saturation_requests: int, load_factor: float,
                  seed: int, concurrency: int) -> dict:
  """Phases 2 and 3 (saturation, then load past it) from the client's side.

  Returns:
    {"saturation": BenchResult, "rate": the load's arrival rate, "before": the server's
    counters just before the load phase, "load": BenchResult}.
  """
  # 2. Saturation: the system kept full, never over its admission bounds (so at most
  # max_queue open: all of them may be waiting at one prefill worker).
  _, items = workload(saturation_requests, math.inf, seed + 1)
  sat = bench.run_workload(url, items, max_concurrency=concurrency, timeout_s=TIMEOUT_S,
                           tokenizer="byte")
  sat_rate = sat.summary()["request_throughput"]
  if not sat_rate > 0:
    raise RuntimeError(f"no request completed in the saturation run: {sat.accounting()}")
  # 3. Load: Poisson arrivals past saturation; the overflow must be refused, not lost.
  rate = load_factor * sat_rate
  print(f"saturation {sat_rate:.1f} req/s; sending {requests:,} at {rate:.1f} req/s",
        flush=True)
  _, items = workload(requests, rate, seed)
  before = scrape(url)
  res = bench.run_workload(url, items, timeout_s=TIMEOUT_S, tokenizer="byte",
                           on_record=_progress(requests))
  return {"saturation": sat, "rate": rate, "before": before, "load": res}


def _child(conn, url: str, kwargs: dict) -> None:
  try:
    conn.send(("ok", client_phases(url, **kwargs)))
  except BaseException as e:  # pylint: disable=broad-except
    conn.send(("error", f"{type(e).__name__}: {e}"))
  finally:
    conn.close()


def client_process_phases(url: str, **kwargs) -> dict:
  """`client_phases` in a separate (spawned) process: the client's Python work then has
  its own interpreter lock instead of sharing the server's."""
  ctx = multiprocessing.get_context("spawn")  # no fork of a process running jax threads
  parent, child = ctx.Pipe(duplex=False)
  proc = ctx.Process(target=_child, args=(child, url, kwargs), name="serving-load-client",
                     daemon=True)
  proc.start()
  child.close()
  try:
    status, value = parent.recv()
  except EOFError:
    raise RuntimeError(f"the client process died (exit code {proc.exitcode})") from None
  finally:
    proc.join(timeout=60)
  if status != "ok":
    raise RuntimeError(f"the client process failed: {value}")
  return value


def run(*, requests: int, saturation_requests: int, load_factor: float, seed: int,
        tiny: bool, client_process: bool = True) -> dict:
  config = DeploymentConfig(kind="sun", **ENGINE, **LIMITS)
  system = ServingSystem(config, sun_models(), eos_id=None, tokenizer="byte")
  server = api.serve(system, host="127.0.0.1", port=0)
  try:
    url = server.url
    # 1. Warm-up: compile prefill / insert / decode for these shapes.
    _, items = workload(8, math.inf, seed + 1000)
    warm = bench.run_workload(url, items, max_concurrency=4, timeout_s=600.0,
                              tokenizer="byte")
    if warm.accounting()["completed"] != len(items):
      raise RuntimeError(f"warm-up failed: {warm.accounting()} "
                         f"{[r.error for r in warm.records if not r.ok][:3]}")
    phases = (client_process_phases if client_process else client_phases)(
        url, requests=requests, saturation_requests=saturation_requests,
        load_factor=load_factor, seed=seed,
        concurrency=min(config.max_inflight, config.max_queue))
    res, rate = phases["load"], phases["rate"]
    sat_summary = phases["saturation"].summary()
    sat_rate = sat_summary["request_throughput"]
    expect = _client_expectation(res)
    delta = server_counts(url, phases["before"], expect)
  finally:
    server.stop(timeout=60.0)
  diagnostics = _diagnostics(res, system)

  summary = res.summary()
  acc = summary["accounting"]
  ok = [r for r in res.records if r.ok]
  bad = [r for r in res.records if not r.ok]
  checks = {
      "none_lost": acc["lost"] == 0,
      "none_duplicated": acc["duplicate_ids"] == 0,
      "counts_add_up": acc["completed"] + acc["rejected"] + acc["failed"] == requests,
      "unsuccessful_have_status_and_reason": all(r.status != 200 and r.error for r in bad),
      "completed_have_output_len_tokens": acc["wrong_lengths"] == 0 and all(
          len(r.output_tokens) == OUTPUT_LEN and len(r.token_times) == OUTPUT_LEN
          for r in ok),
      "completed_token_ids_recovered": all(min(r.output_tokens) >= 0 for r in ok),
      "server_metrics_match_client": _matches(delta, expect),
      "overload_rejected_with_429": acc["rejected"] > 0
                                    and summary["status_counts"].get("429", 0) > 0,
  }
  # At tiny scale a short run may not fill the queues; the rest must hold at any scale.
  required = [k for k in checks if not (tiny and k == "overload_rejected_with_429")]
  return common.environment(
      benchmark="serving_load",
      deployment={**dataclasses.asdict(config), "models": sorted(system.task_models),
                  "model": MODEL, "transfer_options": dict(config.transfer_options)},
      workload={"requests": requests, "arrivals": "poisson", "rate": rate,
                "load_factor": load_factor, "prompt_len": dataclasses.asdict(PROMPT_LEN),
                "output_len": OUTPUT_LEN, "seed": seed, "timeout_s": TIMEOUT_S,
                "client": "separate process" if client_process else "thread of the server's"},
      saturation={"requests": saturation_requests,
                  "max_concurrency": min(config.max_inflight, config.max_queue),
                  "request_throughput": sat_rate, "duration": sat_summary["duration"],
                  **{k: sat_summary[k] for k in ("completed", "rejected", "failed",
                                                 "p50_e2el_ms", "p99_e2el_ms")}},
      load=_pick(summary), accounting=acc, diagnostics=diagnostics,
      server_metrics={"delta": delta, "client": expect},
      system=system.summary(),
      checks=checks, required_checks=required,
      passed=all(checks[k] for k in required),
      failed_examples=[{"status": r.status, "error": r.error} for r in bad
                       if r.status not in (429, 503)][:5])


def _ms(v) -> str:
  return "-" if v is None else f"{v:,.1f}"


def markdown(result: dict) -> str:
  load, sat, acc = result["load"], result["saturation"], result["accounting"]
  w = result["workload"]
  lines = [
      f"# serving load test ({result['machine']['device_kind']}, SUN, 2 task models, "
      f"{w['requests']:,} requests)", "",
      f"Saturation (all {sat['requests']} at once, <= {sat['max_concurrency']} open): "
      f"{sat['request_throughput']:.1f} req/s. Load: Poisson at {w['load_factor']:g}x = "
      f"{w['rate']:.1f} req/s, prompts {w['prompt_len']['lo']}-{w['prompt_len']['hi']} "
      f"tokens, {w['output_len']} output tokens, `max_inflight` "
      f"{result['deployment']['max_inflight']}.", "",
      "| completed | rejected (429/503) | failed | duration (s) | req/s | output tok/s |",
      "| --- | --- | --- | --- | --- | --- |",
      f"| {acc['completed']:,} | {acc['rejected']:,} | {acc['failed']:,} | "
      f"{load['duration']:.1f} | {load['request_throughput']:.1f} | "
      f"{load['output_throughput']:.1f} |", "",
      "| ms | mean | p50 | p95 | p99 |", "| --- | --- | --- | --- | --- |"]
  for m in ("ttft", "tpot", "itl", "e2el"):
    lines.append(f"| {m.upper()} | " + " | ".join(
        _ms(load[f"{k}_{m}_ms"]) for k in ("mean", "p50", "p95", "p99")) + " |")
  lines += ["", "| check | result |", "| --- | --- |"]
  for k, v in result["checks"].items():
    note = "" if k in result["required_checks"] else " (not required at this scale)"
    lines.append(f"| {k} | {'pass' if v else 'FAIL'}{note} |")
  g = result["diagnostics"]
  lines += ["", f"Completed requests waited {_ms(g['before_admission_ms']['p50'])} ms (p50) / "
            f"{_ms(g['before_admission_ms']['p99'])} ms (p99) before the system admitted "
            f"them (HTTP, parsing, the API's event loop); the system's own TTFT was "
            f"{_ms(g['server_ttft_ms']['p50'])} / {_ms(g['server_ttft_ms']['p99'])} ms; a "
            f"429 took {_ms(g['rejection_latency_ms']['p50'])} / "
            f"{_ms(g['rejection_latency_ms']['p99'])} ms to arrive."]
  d = result["server_metrics"]["delta"]
  lines += ["", f"Server `/metrics` deltas: outcomes {d['outcomes']}, HTTP statuses "
            f"{d['http_status']}.", ""]
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="200 requests (tests)")
  ap.add_argument("--requests", type=int, default=None, help="default 10,000 (tiny: 200)")
  ap.add_argument("--saturation-requests", type=int, default=None,
                  help="default 300 (tiny: 40)")
  ap.add_argument("--load-factor", type=float, default=2.0,
                  help="arrival rate as a multiple of the saturation rate")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--client-in-process", action="store_true",
                  help="run the client on this process's loop (starts faster; its Python "
                  "work then shares the server's interpreter lock)")
  ap.add_argument("--out", default=str(common.RESULTS), help="folder for JSON and markdown")
  args = ap.parse_args(argv)
  requests = args.requests or (200 if args.tiny else 10_000)
  sat_requests = args.saturation_requests or (40 if args.tiny else 300)
  result = run(requests=requests, saturation_requests=sat_requests,
               load_factor=args.load_factor, seed=args.seed, tiny=args.tiny,
               client_process=not args.client_in_process)
  text = markdown(result)
  print(text)
  common.write_results(result, text, name="serving_load", tiny=args.tiny, out=args.out)
  failed = [k for k in result["required_checks"] if not result["checks"][k]]
  if failed:
    raise AssertionError(f"serving load test failed checks {failed}; see the JSON")
  return result


if __name__ == "__main__":
  main()
