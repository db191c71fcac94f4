"""The accelerator microbenchmark suite (experiments/benchmarks/micro)."""

import json
import pathlib
import subprocess
import sys

import pytest

from experiments.benchmarks.micro import counts, peaks

ROOT = pathlib.Path(__file__).parents[1]


def test_counts_match_hand_computed_values():
  # [4, 8] x [8, 2]: 2 * 4 * 2 * 8 = 128 FLOPs; bf16 operands (32 + 16) * 2 = 96 bytes,
  # f32 output 8 * 4 = 32 bytes.
  assert counts.gemm_flops(4, 8, 2) == 128
  assert counts.gemm_bytes(4, 8, 2, in_bytes=2, out_bytes=4) == 128
  assert counts.arithmetic_intensity(128, 128) == 1.0
  assert counts.elementwise_bytes(1000, 4, n_inputs=2) == 12_000  # read 2, write 1
  assert counts.gather_bytes(10, 64) == 10 * 4 + 2 * 10 * 64  # indices, rows in, rows out
  assert counts.scatter_add_bytes(10, 64) == 10 * 4 + 3 * 10 * 64
  mib = 1 << 20
  assert counts.collective_bus_bytes("all_reduce", mib, 8) == 2 * 7 / 8 * mib
  for kind in ("all_gather", "reduce_scatter", "all_to_all"):
    assert counts.collective_bus_bytes(kind, mib, 8) == 7 / 8 * mib
  assert counts.collective_bus_bytes("all_reduce", mib, 1) == 0  # nothing to send
  with pytest.raises(ValueError, match="kind='broadcast'"):
    counts.collective_bus_bytes("broadcast", mib, 8)
  assert peaks.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert peaks.peak_tflops("cpu", "bfloat16") is None


def test_tiny_suite_runs_on_eight_cpu_devices(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.micro.run", "--tiny",
       "--fake_cpu_devices=8", f"--out={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((tmp_path / "micro_tiny_cpu.json").read_text())
  assert r["machine"]["num_devices"] == 8 and r["versions"]["jax"]
  for g in r["gemm"]:
    if g["supported"]:
      assert g["flops"] == counts.gemm_flops(g["m"], g["k"], g["n"])
      assert g["tflops"] > 0 and 0 < g["fraction"] <= 1.0 + 1e-9
      assert g["fraction_of"] == "measured roofline"  # no stated peak for a CPU
  assert {g["dtype"] for g in r["gemm"] if g["supported"]} >= {"float32", "bfloat16", "int8"}
  sizes = {x["vector_bytes"] for x in r["gather_scatter"]}
  assert min(sizes) == 4 and max(sizes) == 4096
  kinds = {c["op"] for c in r["collectives"]}
  assert kinds == set(counts.COLLECTIVES)
  for c in r["collectives"]:
    assert c["devices"] == 8 and c["bus_gbps"] > 0
    assert c["bus_bytes"] == counts.collective_bus_bytes(c["op"], c["buffer_bytes"], 8)
  assert max(e["fraction"] for e in r["elementwise"]) == pytest.approx(1.0)
  for name in r["plots"]:
    assert (tmp_path / name).stat().st_size > 1000
  assert "## Collectives" in (tmp_path / "micro_tiny_cpu.md").read_text()


def test_bad_flag_is_named():
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.micro.run",
                         "--fake_cpu_devices=-1"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode != 0 and "--fake_cpu_devices=-1" in proc.stderr
