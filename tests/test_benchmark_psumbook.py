"""The Psumbook benchmark runs end to end on CPU (tiny shapes, interpret mode)."""

import json

from experiments.benchmarks import psumbook as bench


def test_tiny_benchmark_writes_json_and_markdown(tmp_path):
  result = bench.main(["--tiny", "--batches", "1,16", "--out", str(tmp_path)])
  on_disk = json.loads((tmp_path / "psumbook_tiny_cpu.json").read_text())
  assert on_disk["cases"] == json.loads(json.dumps(result["cases"]))
  assert on_disk["machine"]["platform"] == "cpu" and on_disk["versions"]["jax"]
  assert len(result["cases"]) == len(bench.TINY_SHAPES) * 2
  for case in result["cases"]:
    ms = case["methods"]
    assert set(ms) == {"psumbook", "psumbook_ffi", "dequant", "xla_bf16"}
    assert ms["psumbook"]["rel_err_vs_f32_reference"] < 1e-5
    assert ms["psumbook_ffi"]["rel_err_vs_f32_reference"] < 1e-5  # the CPU twin here
    assert ms["dequant"]["rel_err_vs_f32_reference"] < 1e-5
    assert ms["xla_bf16"]["rel_err_vs_f32_reference"] < 2e-2  # bf16 weights
    best = ms[case["best_psumbook"]]["us"]
    assert best == min(ms["psumbook"]["us"], ms["psumbook_ffi"]["us"])
    assert case["speedup_vs_dequant"] == ms["dequant"]["us"] / best
    assert ms["psumbook"]["bytes"] < ms["xla_bf16"]["bytes"]  # ~2 bits vs 16 per weight
    for v in ms.values():  # the cost model beside every figure (CPU: copy-rate bound)
      assert v["cost"]["bytes"] == v["bytes"] and v["cost"]["bound"] == "memory"
      assert v["cost"]["pct_of_limit"] > 0
  table = (tmp_path / "psumbook_tiny_cpu.md").read_text()
  assert table.count("| m1v4g128 |") == len(result["cases"])
