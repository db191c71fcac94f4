"""The decode-throughput benchmark runs and reports (no timing is asserted)."""

import json

from experiments.benchmarks import decode_loop


def test_tiny_benchmark_writes_its_json(tmp_path):
  result = decode_loop.main(["--tiny", "--out", str(tmp_path)])
  saved = json.loads(next(tmp_path.glob("decode_loop_tiny_*.json")).read_text())
  assert saved["results"].keys() == {"host_loop", "generate_chunks", "on_device"}
  assert saved["results"]["on_device"]["ratio_to_on_device"] == 1.0
  assert all(r["tokens_per_s"] > 0 for r in saved["results"].values())
  assert result["chunks_equal_on_device_tokens"]  # same tokens on both device paths
  assert "versions" in saved and "machine" in saved
