"""Benchmark metrics from per-request records, with vLLM `bench serve` field names.

    summary = summarize(records, duration_s=30.0, slo={"ttft_ms": 200, "tpot_ms": 50},
                        n_devices={"prefill": 2, "decode": 1}, occupancy=samples)
    write_json("results/sun.json", summary, records)
    plot_latency_cdfs({"sun": sun_records, "conventional": conv_records}, "cdf.png")

Latencies are in milliseconds: `{mean,median,std,p50,p90,p95,p99}_{ttft,ttst,tpot,itl,
e2el,transfer}_ms`, over completed requests (ITL: over every gap of every completed
request, as vLLM). TPOT of a request is (last token - first token) / (tokens - 1), and is
undefined for one-token outputs. Statistics of an empty set are None, never a crash;
`std` is the population standard deviation and percentiles interpolate linearly (numpy).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import pathlib
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsun.serving.request import RequestRecord

PERCENTILES = (50, 90, 95, 99)
SLO_METRICS = ("ttft_ms", "ttst_ms", "tpot_ms", "e2el_ms")
REJECTED_STATUSES = (429, 503)  # admission refused (`Overloaded`), as opposed to failed


def _ms(x: float | None) -> float | None:
  return None if x is None else 1000.0 * x


def _ms_values(records: Sequence[RequestRecord], metric: str) -> list[float]:
  """Per-request values of `metric` (e.g. "ttft_ms") in ms, skipping undefined ones."""
  if metric == "itl_ms":
    return [1000.0 * g for r in records for g in r.itl]
  if metric == "transfer_ms":
    return [1000.0 * r.transfer_s for r in records if _transferred(r)]
  values = (_ms(getattr(r, metric[:-3])) for r in records)
  return [v for v in values if v is not None]


def _transferred(r: RequestRecord) -> bool:
  return r.transfer_bytes > 0 or r.transfer_s > 0


def stats(name: str, values: Sequence[float],
          percentiles: Sequence[int] = PERCENTILES) -> dict[str, float | None]:
  """mean/median/std/pNN of `values` under vLLM's names, e.g. `mean_ttft_ms`.

  Args:
    name: the metric name, e.g. "ttft_ms".
    values: the samples (may be empty).
    percentiles: which pNN to add.

  Returns:
    A dict of `{mean,median,std}_{name}` and `p{q}_{name}`; all None if `values` is empty.
  """
  keys = [f"mean_{name}", f"median_{name}", f"std_{name}"] + [f"p{q}_{name}" for q in percentiles]
  if len(values) == 0:
    return dict.fromkeys(keys)
  a = np.asarray(values, dtype=np.float64)
  out = [a.mean(), np.median(a), a.std()] + list(np.percentile(a, percentiles))
  return {k: float(v) for k, v in zip(keys, out)}


def _normalize_slo(slo: Mapping[str, float]) -> dict[str, float]:
  """Accepts vLLM's short names ("ttft") and ours ("ttft_ms"); values are ms."""
  out = {}
  for key, target in slo.items():
    name = key if key.endswith("_ms") else f"{key}_ms"
    if name not in SLO_METRICS:
      raise ValueError(f"slo: unknown metric {key!r}; known: {list(SLO_METRICS)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0:
      raise ValueError(f"slo[{key!r}]={target!r} must be a number of ms > 0")
    out[name] = float(target)
  return out


def meets_slo(record: RequestRecord, slo: Mapping[str, float]) -> bool:
  """Whether a completed record meets every target of `slo` (metric -> ms).

  An undefined metric (TPOT or time to second token of a one-token output) is met, as in
  vLLM, which counts such a TPOT as 0. A request that did not complete never meets it.
  """
  if not record.ok:
    return False
  for name, target in _normalize_slo(slo).items():
    value = _ms(getattr(record, name[:-3]))
    if value is not None and value > target:
      return False
  return True


def _n_devices(n_devices: int | Mapping[str, int]) -> int:
  counts = n_devices.values() if isinstance(n_devices, Mapping) else [n_devices]
  if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) \
      or sum(counts) < 1:
    raise ValueError(f"n_devices={n_devices!r} must be a positive integer or a mapping of "
                     "pool -> device count with a positive total")
  return sum(counts)


def _group(records: Sequence[RequestRecord], attr: str) -> dict[str, list[RequestRecord]]:
  groups = collections.defaultdict(list)
  for r in records:
    key = getattr(r, attr)
    if key is not None:
      groups[key].append(r)
  return dict(sorted(groups.items()))


def _breakdown(records: Sequence[RequestRecord], duration_s: float) -> dict[str, Any]:
  """Counts, throughput and headline latencies of one worker's or one model's records."""
  ok = [r for r in records if r.ok]
  prompt = sum(r.prompt_len for r in ok)
  out = sum(len(r.output_tokens) for r in ok)
  row = {
      "completed": len(ok),
      "failed": len(records) - len(ok),
      "input_tokens": prompt,
      "output_tokens": out,
      "cached_prompt_tokens": sum(r.cached_prompt_tokens for r in ok),
      "prefix_hit_rate": sum(r.cached_prompt_tokens for r in ok) / prompt if prompt else None,
      "request_throughput": len(ok) / duration_s,
      "output_throughput": out / duration_s,
  }
  for metric in ("ttft_ms", "tpot_ms", "itl_ms", "transfer_ms"):
    s = stats(metric, _ms_values(ok, metric), percentiles=(99,))
    row[f"mean_{metric}"] = s[f"mean_{metric}"]
    row[f"p99_{metric}"] = s[f"p99_{metric}"]
  return row


def summarize(records: Sequence[RequestRecord], duration_s: float, *,
              slo: Mapping[str, float] | None = None,
              n_devices: int | Mapping[str, int] | None = None,
              occupancy: Sequence[float] | None = None) -> dict[str, Any]:
  """The benchmark summary of `records` over a run of `duration_s` seconds.

  Args:
    records: one `RequestRecord` per request sent (completed, failed or rejected).
    duration_s: wall-clock length of the benchmark (> 0), the throughput denominator.
    slo: goodput targets in ms, e.g. `{"ttft_ms": 200, "tpot_ms": 50}` (vLLM's
      `--goodput ttft:200 tpot:50`); keys among ttft, ttst, tpot, e2el, with or without
      the `_ms` suffix.
    n_devices: devices the deployment used, a count or a mapping such as
      `{"prefill": 2, "decode": 1}`; throughputs are also given per device.
    occupancy: decode-batch occupancy samples measured by the workers (e.g. occupied
      slots / slots per step); passed through as mean and p50.

  Returns:
    A JSON-able dict: counts (`completed`, `failed`, `rejected`, `status_counts`), token
    totals, throughputs, latency statistics, KV transfer statistics and `transfer_bytes`,
    `prefix_hit_rate`, goodput, per-device throughput, occupancy, and breakdowns
    `per_model`, `per_prefill_worker`, `per_decode_worker`. Values that cannot be
    computed (no samples, no SLO, no device count) are None.
  """
  if isinstance(duration_s, bool) or not isinstance(duration_s, (int, float)) \
      or not 0 < duration_s < math.inf:
    raise ValueError(f"duration_s={duration_s!r} must be a finite number of seconds > 0")
  records = list(records)
  ok = [r for r in records if r.ok]
  bad = [r for r in records if not r.ok]
  rejected = sum(r.status in REJECTED_STATUSES for r in bad)
  input_tokens = sum(r.prompt_len for r in ok)
  output_tokens = sum(len(r.output_tokens) for r in ok)
  cached = sum(r.cached_prompt_tokens for r in ok)

  s: dict[str, Any] = {
      "duration": float(duration_s),
      "num_requests": len(records),
      "completed": len(ok),
      "failed": len(bad) - rejected,
      "rejected": rejected,
      "status_counts": {str(k): v for k, v in
                        sorted(collections.Counter(r.status for r in bad).items())},
      "retries": sum(r.retries for r in records),
      "total_input_tokens": input_tokens,
      "total_output_tokens": output_tokens,
      "request_throughput": len(ok) / duration_s,
      "output_throughput": output_tokens / duration_s,
      "total_token_throughput": (input_tokens + output_tokens) / duration_s,
  }
  for metric in ("ttft_ms", "ttst_ms", "tpot_ms", "itl_ms", "e2el_ms", "transfer_ms"):
    s.update(stats(metric, _ms_values(ok, metric)))
  # Bytes moved are a cost of the run, so requests that later failed count too.
  s["transfer_bytes"] = sum(r.transfer_bytes for r in records)
  s["prefix_hit_rate"] = cached / input_tokens if input_tokens else None

  good = None
  if slo is not None:
    norm = _normalize_slo(slo)
    good = sum(meets_slo(r, norm) for r in ok)
    s["goodput_slo"] = norm
  else:
    s["goodput_slo"] = None
  s["good_requests"] = good
  s["request_goodput"] = None if good is None else good / duration_s
  s["goodput"] = s["request_goodput"]  # the name the serving docs use

  devices = None if n_devices is None else _n_devices(n_devices)
  s["n_devices"] = dict(n_devices) if isinstance(n_devices, Mapping) else n_devices
  s["throughput_per_device"] = None if devices is None else s["output_throughput"] / devices
  s["request_throughput_per_device"] = (None if devices is None
                                        else s["request_throughput"] / devices)
  s["goodput_per_device"] = (None if devices is None or good is None
                             else s["request_goodput"] / devices)

  occ = [] if occupancy is None else [float(x) for x in occupancy]
  s["occupancy_samples"] = len(occ)
  s["mean_occupancy"] = float(np.mean(occ)) if occ else None
  s["p50_occupancy"] = float(np.median(occ)) if occ else None

  s["per_model"] = {m: _breakdown(rs, duration_s) for m, rs in _group(records, "model").items()}
  s["per_prefill_worker"] = {w: _breakdown(rs, duration_s)
                             for w, rs in _group(records, "prefill_worker").items()}
  s["per_decode_worker"] = {w: _breakdown(rs, duration_s)
                            for w, rs in _group(records, "decode_worker").items()}
  return s


def record_dict(record: RequestRecord) -> dict[str, Any]:
  """A record as a JSON-able dict, with its derived latencies in ms."""
  d = dataclasses.asdict(record)
  for name in ("ttft", "ttst", "tpot", "e2el"):
    d[f"{name}_ms"] = _ms(getattr(record, name))
  return d


def _jsonable(x):
  """numpy scalars -> Python numbers; NaN and infinities -> None (strict JSON)."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_json(path: str | os.PathLike, summary: Mapping[str, Any],
               records: Sequence[RequestRecord] | None = None) -> pathlib.Path:
  """Writes `summary` (plus `"records"`, if given) as JSON, atomically.

  The file is written under a temporary name in the same directory and renamed, so a
  reader never sees half a file.

  Args:
    path: the JSON file; its parent directory is created if missing.
    summary: what `summarize` returned.
    records: per-request records to include under the key "records".

  Returns:
    `path` as a `pathlib.Path`.
  """
  payload = dict(summary)
  if records is not None:
    payload["records"] = [record_dict(r) for r in records]
  text = json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n"
  return _write_atomic(path, text.encode())


def _write_atomic(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to a temporary file beside `path` and renames it into place, so a
  reader never sees half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results are meant to be read
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def plot_latency_cdfs(results: Mapping[str, Sequence[RequestRecord]],
                      path: str | os.PathLike) -> pathlib.Path:
  """Empirical CDFs of TTFT, TPOT and E2EL (ms), one line per deployment, in one PNG.

  Args:
    results: deployment name -> its records (only completed requests are drawn; a
      deployment without samples of a metric has no line in that panel).
    path: the PNG to write (atomically); its parent directory is created if missing.

  Returns:
    `path` as a `pathlib.Path`.
  """
  if not isinstance(results, Mapping) or not results:
    raise ValueError("results must be a non-empty mapping of deployment name -> records")

  # Lazy: matplotlib costs ~0.3 s to import and only plotting needs it.
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  panels = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2el_ms", "E2EL"))
  fig = Figure(figsize=(4.6 * len(panels), 4.0), dpi=100)
  FigureCanvasAgg(fig)
  for k, (metric, title) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), k + 1)
    for name, records in results.items():
      values = np.sort(_ms_values([r for r in records if r.ok], metric))
      if values.size:
        ax.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                label=str(name), linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel(f"{title} (ms)")
    if k == 0:
      ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()

  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return _write_atomic(path, buf.getvalue())
