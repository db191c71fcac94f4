"""The GPU check on CPU: end to end in its --cpu mode (tiny shapes, interpret mode), a
deadline that stops it cleanly, per-case JSON records, a raising case recorded while the
rest continue, and the watchdog. No assertion on how fast anything runs."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from experiments.benchmarks import gpu_check

ROOT = pathlib.Path(__file__).parents[1]


def _run(tmp_path, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         # share the CPU twin's build with the FFI tests (the cache key covers the source)
         "JAXSUN_FFI_CACHE": os.environ.get(
             "JAXSUN_FFI_CACHE", str(pathlib.Path.home() / ".cache" / "jaxsun" / "ffi"))}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.gpu_check", "--cpu", "--out",
       str(tmp_path), "--cache", str(tmp_path / "cache"), *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads((tmp_path / gpu_check.JSON_NAME).read_text()), proc.stdout


def test_cpu_mode_end_to_end_with_a_raising_case(tmp_path):
  result, stdout = _run(tmp_path, "--raise-in", "fp8_thin_m16")
  assert result["status"] == "done" and result["mode"] == "cpu"
  assert result["machine"]["platform"] == "cpu" and result["versions"]["jax"]
  names = [c["name"] for c in result["cases"]]
  assert names == ["correctness", "copy_bandwidth", "fp8_256_cubed", "fp8_thin_m16",
                   "psumbook_b1", "psumbook_b16"]  # correctness first, then priority
  cases = {c["name"]: c for c in result["cases"]}
  checks = cases["correctness"]["checks"]
  assert cases["correctness"]["status"] == "ok" and len(checks) == 10
  assert all(c["ok"] and c["rel_err"] < c["tol"] for c in checks.values()), checks
  assert cases["copy_bandwidth"]["copy_gb_s"] > 0
  # The raising case is recorded with its message; the cases after it still ran.
  thin = cases["fp8_thin_m16"]
  assert thin["status"] == "error" and "injected failure" in thin["error"]
  for name in ("fp8_256_cubed", "psumbook_b1", "psumbook_b16"):
    case = cases[name]
    assert case["status"] == "ok", case
    for method, m in case["methods"].items():
      assert m["us"] > 0 and m["cost"]["bytes"] > 0, (name, method)
      # no stated peaks on a CPU: the measured copy rate bounds the bytes
      assert m["cost"]["bound"] == "memory" and m["cost"]["pct_of_limit"] > 0
    assert all(t["speedup"] > 0 for t in case["targets"] if "us" not in t)
  assert set(cases["psumbook_b1"]["methods"]) == {"ffi", "gather_triton",
                                                   "dequant_triton", "xla_bf16"}
  assert "% of limit" in stdout


def test_deadline_zero_runs_no_case_and_says_why(tmp_path):
  result, _ = _run(tmp_path, "--deadline", "0")
  assert result["status"] == "stopped_at_deadline"
  assert "deadline" in result["stop_reason"]
  assert len(result["cases"]) == 6
  for case in result["cases"]:
    assert case["status"] == "skipped" and case["reason"].startswith("deadline"), case
    assert "methods" not in case and "checks" not in case


def test_only_with_an_unknown_case_is_named_and_recorded(tmp_path):
  # In a subprocess, as `_run`: main() points jax's compile cache at its --cache.
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmarks.gpu_check", "--cpu", "--out",
       str(tmp_path), "--cache", str(tmp_path / "cache"), "--only",
       "copy_bandwidth,fp8_typo"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
      text=True, timeout=600)
  assert proc.returncode != 0
  assert "--only names no case" in proc.stderr and "'fp8_typo'" in proc.stderr, proc.stderr
  assert "copy_bandwidth" in proc.stderr  # the valid names are listed
  result = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
  assert result["status"] == "bad_arguments" and "fp8_typo" in result["stop_reason"]
  assert result["cases"] == []


def _case(name, fn, est_s=0.0):
  return gpu_check.Case(name, "benchmark", fn, est_s)


def test_each_case_is_on_disk_before_the_next_starts(tmp_path):
  path = tmp_path / "gpu_check.json"
  rec = gpu_check.Recorder(path, {"_t0": time.monotonic()})
  seen = []

  def second(deadline):
    del deadline
    seen.append([c["name"] for c in json.loads(path.read_text())["cases"]])
    return {"value": 2}

  def boom(deadline):
    raise ValueError("bad kernel")

  status = gpu_check.run_cases(
      [_case("first", lambda d: {"value": 1}), _case("boom", boom),
       _case("second", second), _case("too_long", lambda d: {}, est_s=1e9)],
      rec, deadline_s=3600, t0=time.monotonic())
  assert seen == [["first", "boom"]]  # written as each finished
  on_disk = json.loads(path.read_text())
  assert status == on_disk["status"] == "stopped_at_deadline"
  got = {c["name"]: c for c in on_disk["cases"]}
  assert got["first"]["value"] == 1 and got["second"]["value"] == 2
  assert got["boom"]["status"] == "error" and "ValueError: bad kernel" in got["boom"]["error"]
  assert got["too_long"]["status"] == "skipped"  # its estimate does not fit: not started
  assert not list(tmp_path.glob("*.tmp"))  # atomic rewrites leave no temporaries


def test_watchdog_marks_the_json_and_exits(tmp_path):
  path = tmp_path / "gpu_check.json"
  rec = gpu_check.Recorder(path, {"_t0": time.monotonic()})
  fired = threading.Event()
  codes = []
  gpu_check.start_watchdog(rec, 0.0, exit_fn=lambda code: codes.append(code) or fired.set())
  assert fired.wait(60)
  assert codes == [3]
  assert json.loads(path.read_text())["status"] == "killed_by_watchdog"


def test_the_wrapper_calls_the_driver():
  text = (ROOT / "scripts" / "gpu_check.sh").read_text()
  assert "experiments.benchmarks.gpu_check" in text and "timeout" in text
  # deadline + grace + slack inside the 600 s command limit
  assert gpu_check.DEADLINE_S + gpu_check.GRACE_S < 570 < 600
  assert ".gpu_check_cache/" in (ROOT / ".gitignore").read_text()


@pytest.mark.parametrize("module", ["experiments.benchmarks.gpu_check",
                                    "experiments.benchmarks.cost"])
def test_imports_nothing_the_gpu_machine_lacks(module):
  code = (f"import sys, {module}; import experiments.benchmarks.psumbook, "
          "experiments.benchmarks.fp8_matmul; "
          "bad = [m for m in sys.modules if m.split('.')[0] in "
          "('ml_collections', 'tensorflow_datasets', 'grain', 'pytest', 'array_record')]; "
          "print(bad); sys.exit(1 if bad else 0)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
