"""The FP8 benchmark runs end to end on CPU (tiny shapes, interpret mode)."""

import json

from experiments.benchmarks import fp8_matmul as bench


def test_tiny_fp8_benchmark_writes_json_and_markdown(tmp_path):
  result = bench.main(["--tiny", "--out", str(tmp_path)])
  on_disk = json.loads((tmp_path / "fp8_matmul_tiny_cpu.json").read_text())
  assert on_disk["cases"] == json.loads(json.dumps(result["cases"]))
  assert len(result["cases"]) == len(bench.TINY_SHAPES)
  for case in result["cases"]:
    assert {"pallas_triton", "xla_fp8", "xla_bf16"} <= set(case["methods"])
    for name, v in case["methods"].items():  # the cost model beside every figure
      want = 2 * case["M"] * case["K"] * case["N"]
      assert v["cost"]["flops"] == want and v["cost"]["bytes"] > 0, name
    t = {k: v["us"] for k, v in case["methods"].items()}
    assert case["speedup_vs_xla_fp8"] == t["xla_fp8"] / t[case["best_ours"]]
  acc = result["accuracy"]
  assert set(acc) == {f"{f}_{g}" for f in ("e4m3", "e5m2", "e4m3_g2")
                      for g in ("tensor", "row", "block128")}
  # E4M3 keeps one more mantissa bit than E5M2: about half the error.
  assert acc["e4m3_row"]["rel_err"] < 0.7 * acc["e5m2_row"]["rel_err"]
  assert all(v["rel_err"] < 0.1 for v in acc.values())
  assert "| recipe |" in (tmp_path / "fp8_matmul_tiny_cpu.md").read_text()
