"""Benchmark metrics against hand-computed values on a few handmade records."""

from __future__ import annotations

import ast
import json
import math
import pathlib

import pytest

from jaxsun.serving import metrics
from jaxsun.serving.metrics import meets_slo, plot_latency_cdfs, summarize, write_json
from jaxsun.serving.request import RequestRecord

approx = pytest.approx


def done(rid, model, arrival, times, *, prompt_len, cached=0, transfer_s=0.0, nbytes=0,
         prefill=None, decode=None, end=None) -> RequestRecord:
  return RequestRecord(request_id=rid, model=model, prompt_len=prompt_len, arrival=arrival,
                       output_tokens=list(range(len(times))), token_times=list(times),
                       cached_prompt_tokens=cached, transfer_s=transfer_s,
                       transfer_bytes=nbytes, prefill_worker=prefill, decode_worker=decode,
                       finish_reason="length", end=times[-1] if end is None else end)


@pytest.fixture
def records():
  """Three completed requests, one rejected (429), one failed (500).

  r1: TTFT 100, TTST 150, ITLs 50 50 50, TPOT 50, E2EL 300 (ms)
  r2: TTFT 200, TTST 300, ITLs 100 200, TPOT 150, E2EL 500
  r3: TTFT 400, one token (no TTST, TPOT or ITL), E2EL 400
  """
  return [
      done("r1", "a", 0.0, [0.1, 0.15, 0.2, 0.25], end=0.3, prompt_len=10, cached=4,
           transfer_s=0.01, nbytes=1000, prefill="p0", decode="d0"),
      done("r2", "b", 1.0, [1.2, 1.3, 1.5], prompt_len=20, transfer_s=0.03, nbytes=3000,
           prefill="p1", decode="d0"),
      done("r3", "a", 2.0, [2.4], prompt_len=5, cached=5, transfer_s=0.02, nbytes=500,
           prefill="p0", decode="d1"),
      RequestRecord("r4", "a", prompt_len=7, arrival=3.0, error="queue full", status=429),
      RequestRecord("r5", "b", prompt_len=9, arrival=4.0, transfer_bytes=200, retries=1,
                    prefill_worker="p1", decode_worker="d1", error="digest mismatch",
                    status=500),
  ]


def test_counts_tokens_and_throughput(records):
  s = summarize(records, duration_s=10.0)
  assert (s["num_requests"], s["completed"], s["failed"], s["rejected"]) == (5, 3, 1, 1)
  assert s["status_counts"] == {"429": 1, "500": 1}
  assert s["retries"] == 1
  assert (s["total_input_tokens"], s["total_output_tokens"]) == (35, 8)
  assert s["request_throughput"] == approx(0.3)
  assert s["output_throughput"] == approx(0.8)
  assert s["total_token_throughput"] == approx(4.3)
  assert s["duration"] == 10.0


def test_latency_statistics_by_hand(records):
  s = summarize(records, duration_s=10.0)
  # TTFT 100, 200, 400: linear percentiles between order statistics.
  assert s["mean_ttft_ms"] == approx(700 / 3)
  assert s["median_ttft_ms"] == approx(200) and s["p50_ttft_ms"] == approx(200)
  assert s["std_ttft_ms"] == approx(math.sqrt((133.333 ** 2 + 33.333 ** 2 + 166.667 ** 2) / 3),
                                    rel=1e-4)
  assert s["p90_ttft_ms"] == approx(360)  # 200 + 0.8 * 200
  assert s["p95_ttft_ms"] == approx(380)
  assert s["p99_ttft_ms"] == approx(396)
  # Time to second token: r1 and r2 only.
  assert (s["mean_ttst_ms"], s["p90_ttst_ms"]) == (approx(225), approx(285))
  # TPOT: r1 (0.25 - 0.1) / 3 = 50 ms, r2 (1.5 - 1.2) / 2 = 150 ms; r3 has none.
  assert (s["mean_tpot_ms"], s["median_tpot_ms"]) == (approx(100), approx(100))
  assert s["p99_tpot_ms"] == approx(149)
  # ITL: every gap of every request: 50, 50, 50, 100, 200.
  assert (s["mean_itl_ms"], s["median_itl_ms"]) == (approx(90), approx(50))
  assert s["std_itl_ms"] == approx(math.sqrt(3400))
  assert s["p90_itl_ms"] == approx(160)
  # E2EL 300, 500, 400.
  assert (s["mean_e2el_ms"], s["median_e2el_ms"], s["p99_e2el_ms"]) == \
         (approx(400), approx(400), approx(498))


def test_transfer_prefix_hits_devices_and_occupancy(records):
  s = summarize(records, duration_s=10.0, n_devices={"prefill": 2, "decode": 2},
                occupancy=[0.5, 1.0, 0.75, 0.25])
  assert (s["mean_transfer_ms"], s["p50_transfer_ms"]) == (approx(20), approx(20))
  assert s["transfer_bytes"] == 4700  # the failed request's bytes were moved too
  assert s["prefix_hit_rate"] == approx(9 / 35)
  assert s["n_devices"] == {"prefill": 2, "decode": 2}
  assert s["throughput_per_device"] == approx(0.8 / 4)
  assert s["request_throughput_per_device"] == approx(0.3 / 4)
  assert (s["mean_occupancy"], s["p50_occupancy"], s["occupancy_samples"]) == \
         (approx(0.625), approx(0.625), 4)
  assert summarize(records, 10.0, n_devices=8)["throughput_per_device"] == approx(0.1)


def test_goodput_counts_completed_requests_meeting_every_target(records):
  # r1 meets both; r2 misses TPOT (150 > 100); r3 misses TTFT (400 > 250).
  s = summarize(records, duration_s=10.0, slo={"ttft_ms": 250, "tpot_ms": 100},
                n_devices=2)
  assert s["good_requests"] == 1
  assert s["request_goodput"] == s["goodput"] == approx(0.1)
  assert s["goodput_per_device"] == approx(0.05)
  # vLLM's short names; a one-token output (r3) has no TPOT and meets a TPOT target.
  s = summarize(records, duration_s=10.0, slo={"ttft": 450, "tpot": 60})
  assert s["good_requests"] == 2 and s["goodput_slo"] == {"ttft_ms": 450.0, "tpot_ms": 60.0}
  assert [meets_slo(r, {"e2el_ms": 450}) for r in records] == [True, False, True, False, False]
  assert summarize(records, 10.0)["request_goodput"] is None
  with pytest.raises(ValueError, match="unknown metric 'latency'"):
    summarize(records, 10.0, slo={"latency": 1})
  with pytest.raises(ValueError, match="slo"):
    summarize(records, 10.0, slo={"ttft_ms": 0})


def test_per_worker_and_per_model_breakdowns(records):
  s = summarize(records, duration_s=10.0)
  p0, p1 = s["per_prefill_worker"]["p0"], s["per_prefill_worker"]["p1"]
  assert (p0["completed"], p0["failed"], p0["input_tokens"], p0["cached_prompt_tokens"]) == \
         (2, 0, 15, 9)
  assert p0["prefix_hit_rate"] == approx(0.6) and p0["mean_ttft_ms"] == approx(250)
  assert (p1["completed"], p1["failed"], p1["prefix_hit_rate"]) == (1, 1, 0.0)
  d0, d1 = s["per_decode_worker"]["d0"], s["per_decode_worker"]["d1"]
  assert (d0["completed"], d0["output_tokens"]) == (2, 7)
  assert d0["output_throughput"] == approx(0.7)
  assert (d0["mean_tpot_ms"], d0["mean_itl_ms"]) == (approx(100), approx(90))
  assert (d1["completed"], d1["failed"], d1["mean_tpot_ms"]) == (1, 1, None)
  assert d1["mean_transfer_ms"] == approx(20)
  a, b = s["per_model"]["a"], s["per_model"]["b"]
  assert (a["completed"], a["failed"], b["completed"], b["failed"]) == (2, 1, 1, 1)
  assert a["mean_ttft_ms"] == approx(250) and b["mean_ttft_ms"] == approx(200)
  assert sorted(s["per_model"]) == ["a", "b"]


def test_empty_and_all_failed_inputs_give_none_not_a_crash(records):
  for recs in ([], records[3:]):
    s = summarize(recs, duration_s=5.0, slo={"ttft_ms": 100}, occupancy=[])
    assert s["completed"] == 0 and s["request_throughput"] == 0.0
    assert s["total_output_tokens"] == 0
    for key in ("mean_ttft_ms", "p99_tpot_ms", "std_itl_ms", "median_e2el_ms",
                "mean_ttst_ms", "mean_transfer_ms", "prefix_hit_rate", "mean_occupancy"):
      assert s[key] is None, key
    assert s["good_requests"] == 0 and s["request_goodput"] == 0.0
  assert metrics.stats("x_ms", []) == {k: None for k in (
      "mean_x_ms", "median_x_ms", "std_x_ms", "p50_x_ms", "p90_x_ms", "p95_x_ms", "p99_x_ms")}


@pytest.mark.parametrize("kw", [dict(duration_s=0.0), dict(duration_s=math.inf),
                                dict(duration_s=1.0, n_devices=0),
                                dict(duration_s=1.0, n_devices={"prefill": -1, "decode": 2})])
def test_bad_arguments_are_named(records, kw):
  with pytest.raises(ValueError, match="duration_s" if "n_devices" not in kw else "n_devices"):
    summarize(records, **kw)


def test_write_json_round_trips_and_replaces_atomically(records, tmp_path):
  path = tmp_path / "out" / "bench.json"
  s = summarize(records, duration_s=10.0, slo={"ttft_ms": 250}, n_devices={"decode": 1})
  assert write_json(path, s, records) == path
  loaded = json.loads(path.read_text())
  assert {k: v for k, v in loaded.items() if k != "records"} == s
  assert [r["request_id"] for r in loaded["records"]] == ["r1", "r2", "r3", "r4", "r5"]
  assert loaded["records"][0]["ttft_ms"] == approx(100)
  assert loaded["records"][2]["tpot_ms"] is None
  write_json(path, {"completed": 0})  # replaces the file
  assert json.loads(path.read_text()) == {"completed": 0}
  with pytest.raises(TypeError):  # not JSON-able: the old file stays whole
    write_json(path, {"completed": object()})
  assert json.loads(path.read_text()) == {"completed": 0}
  assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temp files left


def test_plot_latency_cdfs_writes_a_png(records, tmp_path):
  path = plot_latency_cdfs({"sun": records, "conventional": records[:1], "none": records[3:]},
                           tmp_path / "plots" / "cdf.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p.name for p in path.parent.iterdir()] == ["cdf.png"]
  with pytest.raises(ValueError, match="results"):
    plot_latency_cdfs({}, tmp_path / "x.png")


def test_the_serving_modules_do_not_import_jax():
  """Router, workload and metrics run in processes that never load an accelerator."""
  root = pathlib.Path(metrics.__file__).parent
  for name in ("router.py", "workload.py", "metrics.py"):
    tree = ast.parse((root / name).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("jax", "flax")}, name
