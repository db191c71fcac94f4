"""Prometheus text exposition of a serving system's state (`/metrics`).

Counters (requests by outcome, tokens, retries, corrupt KV transfers, prefix-cache hits,
KV bytes moved), per-worker gauges (queue, running, KV tokens, alive) and latency
histograms (TTFT, TPOT, end-to-end) built from the finished requests' records. Rendered
on demand from a private registry, so several systems in one process never clash.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _histogram(name: str, doc: str, values) -> HistogramMetricFamily:
  values = np.asarray([v for v in values if v is not None], np.float64)
  counts = [(str(b), float(np.sum(values <= b))) for b in BUCKETS_S]
  counts.append(("+Inf", float(values.size)))
  return HistogramMetricFamily(name, doc, buckets=counts, sum_value=float(values.sum()))


class _Collector:
  def __init__(self, system):
    self.system = system

  def collect(self):
    s = self.system
    c = CounterMetricFamily("jaxsun_requests", "Requests by outcome", labels=["outcome"])
    for k in ("admitted", "completed", "failed", "rejected"):
      c.add_metric([k], s.counters[k])
    yield c
    yield CounterMetricFamily("jaxsun_generated_tokens", "Output tokens delivered",
                              value=s.counters["tokens"])
    yield CounterMetricFamily("jaxsun_retries", "Requests recomputed (dead worker, bad KV)",
                              value=s.counters["retries"])
    yield CounterMetricFamily("jaxsun_kv_digest_failures", "KV transfers that failed the "
                              "digest check", value=s.counters["corrupt_kv"])
    t = s.transfer.stats()
    yield CounterMetricFamily("jaxsun_kv_transfer_bytes", "KV bytes moved prefill->decode",
                              value=t["bytes"])
    yield CounterMetricFamily("jaxsun_kv_transfer_seconds", "KV transfer latency, summed",
                              value=t["seconds"])
    pc = s.prefix_cache_stats()
    yield CounterMetricFamily("jaxsun_prefix_cache_hit_tokens", "Prompt tokens served from "
                              "the prefix cache", value=pc.get("hit_tokens", 0))
    yield CounterMetricFamily("jaxsun_prefix_cache_lookup_tokens", "Prompt tokens looked up",
                              value=pc.get("lookup_tokens", 0))
    yield GaugeMetricFamily("jaxsun_inflight_requests", "Requests queued or running",
                            value=len(s.inflight))
    gauges = {k: GaugeMetricFamily(f"jaxsun_worker_{k}", f"Worker {k}",
                                   labels=["worker", "pool"])
              for k in ("alive", "queue_len", "running", "kv_used_tokens")}
    for w in s.prefill_workers + s.decode_workers:
      load = w.load()
      for k, g in gauges.items():
        v = getattr(load, k)
        if v is not None:
          g.add_metric([load.worker_id, load.pool], float(v))
    yield from gauges.values()
    recs = [r for r in list(s.records) if r.ok]
    yield _histogram("jaxsun_time_to_first_token_seconds", "TTFT", [r.ttft for r in recs])
    yield _histogram("jaxsun_time_per_output_token_seconds", "TPOT", [r.tpot for r in recs])
    yield _histogram("jaxsun_e2e_request_latency_seconds", "End-to-end latency",
                     [r.e2el for r in recs])


def render(system) -> str:
  registry = CollectorRegistry()
  registry.register(_Collector(system))
  return generate_latest(registry).decode()
