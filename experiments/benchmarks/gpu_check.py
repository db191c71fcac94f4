r"""The prepared GPU check: correctness first, then the headline cases, inside 9 minutes.

    bash scripts/gpu_check.sh                  # on the device machine (thin wrapper)
    python -m experiments.benchmarks.gpu_check --out /tmp/gc             # the same
    python -m experiments.benchmarks.gpu_check --cpu --out /tmp/gc       # CPU: tiny shapes

Through the device tool: `run(command="bash scripts/gpu_check.sh", timeout_s=600)`. The
GPU machines have jax 0.11.2 but no pytest, ml-collections or grain: this imports jax,
numpy and the project's kernels and benchmark helpers only.

Order (priority; each case's result is appended to ONE JSON file, `<out>/gpu_check.json`,
rewritten atomically as soon as the case is measured, so a stop loses nothing done):

  1. correctness: every compiled kernel against its float32 reference at the benchmark
     shapes (FP8 Mosaic 8192^3 and thin M = 16; Psumbook CUDA GEMV, Pallas-Triton
     lookups and dequant at batch 1 and 16), relative error ||out - ref|| / ||ref||;
  2. copy bandwidth: a device copy amortised over many copies in one jitted loop;
  3. FP8 GEMM 8192^3: Mosaic (weight prepared once, `mosaic.prepare_weight`) vs XLA's
     cuBLASLt FP8 given the K-major weight ("xla_fp8_tn", target >= 1.3x) and the [K, N]
     weight ("xla_fp8"), XLA bf16, and Mosaic laying the weight out per call;
  4. FP8 thin GEMMs M = 16, 32, 64, 128, K = N = 8192: Mosaic vs XLA bf16 (>= 1.5x) and
     XLA FP8 (both layouts);
  5. Psumbook GEMV, 2.125 bits/weight (m1v4g128), batch 1, 4096 x 14336: CUDA GEMV vs XLA
     bf16 GEMV (>= 5x, <= 27 us) and vs the dequant kernel (>= 2x);
  6. the same at batch 16: vs the dequant kernel (>= 1.3x).

Every figure carries its cost model (`cost.py`: bytes, FLOPs, the limit at the device's
stated peak and bandwidth, "% of limit"). Timing: `common.time_per_call` (many calls
inside one jitted loop, median over trials).

Time: a global deadline (`--deadline`, 480 s from start) is checked before every case
and every method; a case whose estimate does not fit what is left is recorded as
skipped with the reason, and the run ends cleanly with status "stopped_at_deadline". A
watchdog thread ends the process at deadline + `--grace` (60 s) in case a compile or a
kernel hangs, after marking the JSON "killed_by_watchdog": 540 s in all, inside the
600 s command limit. A case that raises is recorded (type, message, traceback tail) and
the rest continue.

Compile cache: jax's persistent compilation cache and the CUDA GEMV's nvcc build live in
`--cache` (default `.gpu_check_cache/` in the repository, git-ignored: ignored build
outputs stay on a warm device machine between calls), so a rerun skips the compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEADLINE_S = 480.0
GRACE_S = 60.0
JSON_NAME = "gpu_check.json"

# Shapes: (GPU, --cpu).
FP8_SQUARE = {"gpu": 8192, "cpu": 256}
FP8_THIN = {"gpu": ((16, 32, 64, 128), 8192), "cpu": ((16,), 256)}
PSUMBOOK = {"gpu": ("m1v4g128", 4096, 14336), "cpu": ("m1v4g128", 256, 512)}
PSUMBOOK_BATCHES = (1, 16)
REPS = {"gpu": {"fp8_square": 10, "fp8_thin": 100, "psumbook": 200}, "cpu": {}}
TRIALS = {"gpu": 5, "cpu": 1}
# Tolerances on ||out - ref|| / ||ref||: fp8 tensor cores accumulate with fewer bits than
# f32 (~14, "promote" schemes aside), bf16 outputs round to 8 bits; f32 kernels far less.
TOL = {"fp8": 2e-3, "psumbook_f32": 2e-5, "psumbook_ffi": 1e-3}


@dataclasses.dataclass(frozen=True)
class Case:
  """One step of the check.

  Attributes:
    name: the JSON record's name (also what `--only` and `--raise-in` match).
    kind: "correctness", "bandwidth" or "benchmark".
    run: called with the absolute deadline (`time.monotonic()` seconds); returns the
      record's fields ("status" defaults to "ok").
    est_s: seconds it may take on the GPU with a cold cache, compiles included; a case
      is skipped when less than this is left before the deadline.
  """

  name: str
  kind: str
  run: Callable[[float], dict]
  est_s: float


class Recorder:
  """The one JSON file: header, cases as they finish, final status; atomic rewrites."""

  def __init__(self, path: pathlib.Path, header: dict):
    self.path = path
    self.result = {**header, "status": "running", "cases": []}
    self._lock = threading.Lock()
    self.write()

  def write(self) -> None:
    from experiments.benchmarks import common  # pylint: disable=import-outside-toplevel
    with self._lock:
      self.result["elapsed_s"] = time.monotonic() - self.result["_t0"]
      text = json.dumps({k: v for k, v in self.result.items() if k != "_t0"}, indent=2,
                        default=str)
      common.write_atomic(self.path, text + "\n")

  def add(self, record: dict) -> None:
    with self._lock:
      self.result["cases"].append(record)
    self.write()

  def finish(self, status: str, reason: str | None = None) -> None:
    with self._lock:
      self.result["status"] = status
      if reason:
        self.result["stop_reason"] = reason
    self.write()


def run_cases(cases: list[Case], rec: Recorder, *, deadline_s: float, t0: float,
              raise_in: tuple[str, ...] = ()) -> str:
  """Runs `cases` in order under the deadline; returns the final status."""
  deadline = t0 + deadline_s
  stopped = None
  for case in cases:
    left = deadline - time.monotonic()
    base = {"name": case.name, "kind": case.kind}
    if left < case.est_s or left <= 0:
      reason = (f"deadline: {max(left, 0):.0f} s left of {deadline_s:.0f} s, the case "
                f"may take {case.est_s:.0f} s")
      stopped = stopped or reason
      rec.add({**base, "status": "skipped", "reason": reason})
      print(f"[gpu_check] {case.name}: skipped ({reason})", flush=True)
      continue
    start = time.monotonic()
    try:
      if case.name in raise_in:
        raise RuntimeError(f"injected failure in {case.name} (--raise-in)")
      out = {"status": "ok", **case.run(deadline)}
    except Exception as e:  # pylint: disable=broad-except
      out = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
             "traceback": traceback.format_exc()[-3000:]}
    out["seconds"] = time.monotonic() - start
    rec.add({**base, **out})
    print(f"[gpu_check] {case.name}: {out['status']} in {out['seconds']:.1f} s "
          f"{_summary(out)}", flush=True)
  status = "stopped_at_deadline" if stopped else "done"
  rec.finish(status, stopped)
  return status


def _summary(out: dict) -> str:
  if "error" in out:
    return out["error"].splitlines()[0][:200]
  parts = []
  for name, m in out.get("methods", {}).items():
    if "us" in m:
      pct = m["cost"]["pct_of_limit"]
      parts.append(f"{name} {m['us']:.1f} us" + (f" ({pct:.0f}% of limit)" if pct else ""))
    else:
      parts.append(f"{name} {m.get('status')}")
  for name, c in out.get("checks", {}).items():
    parts.append(f"{name} err {c.get('rel_err', float('nan')):.1e}"
                 + ("" if c.get("ok") else " FAIL"))
  for t in out.get("targets", []):
    if t.get("speedup") is not None:
      parts.append(f"{t['ours']}/{t['baseline']} x{t['speedup']:.2f} (target "
                   f"x{t['target']}{'' if t['met'] else ', missed'})")
  if "copy_gb_s" in out:
    parts.append(f"{out['copy_gb_s']:.0f} GB/s")
  return "; ".join(parts)


def start_watchdog(rec: Recorder, at_s: float, *, exit_fn=os._exit) -> threading.Timer:
  """Marks the JSON "killed_by_watchdog" and ends the process `at_s` seconds from now."""

  def fire():
    rec.finish("killed_by_watchdog", f"still running {at_s:.0f} s after the watchdog "
                                     "started (deadline + grace)")
    print("[gpu_check] watchdog: ending the process", flush=True)
    exit_fn(3)

  timer = threading.Timer(max(at_s, 0.0), fire)
  timer.daemon = True
  timer.start()
  return timer


# ----------------------------------------------------------------------------- cases


def _environment(cache: pathlib.Path) -> dict:
  from experiments.benchmarks import common  # pylint: disable=import-outside-toplevel
  env = common.environment()
  smi = shutil.which("nvidia-smi")
  if smi:
    try:
      env["nvidia_smi"] = subprocess.run(
          [smi, "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version",
           "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
    except Exception as e:  # pylint: disable=broad-except
      env["nvidia_smi"] = f"{type(e).__name__}: {e}"
  env["cache"] = {"dir": str(cache), "files_at_start": _count_files(cache)}
  return env


def _count_files(path: pathlib.Path) -> int:
  return sum(len(f) for _, _, f in os.walk(path)) if path.exists() else 0


def _rel_err(out, ref) -> dict:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  out32, ref32 = jnp.asarray(out, jnp.float32), jnp.asarray(ref, jnp.float32)
  finite = bool(jnp.isfinite(out32).all())
  err = float(jnp.linalg.norm(out32 - ref32) / jnp.linalg.norm(ref32))
  return {"rel_err": err, "finite": finite}


class Suite:
  """The cases for one platform ("gpu" or "cpu"), sharing operands between them."""

  def __init__(self, mode: str, device_kind: str):
    import jax  # pylint: disable=import-outside-toplevel
    self.mode = mode
    self.on_gpu = mode == "gpu"
    self.interpret = not self.on_gpu
    self.kind = device_kind
    self.hbm = None  # the measured copy rate, used where no peak is stated
    self.reps = REPS[mode]
    self.trials = TRIALS[mode]
    self._cache = {}
    self.jax = jax

  # -- operands

  def fp8_operands(self, m: int, k: int, n: int):
    key = ("fp8", m, k, n)
    if key not in self._cache:
      import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
      from jaxsun.quant import fp8  # pylint: disable=import-outside-toplevel
      ka, kb = self.jax.random.split(self.jax.random.key(m + k + n))
      a = self.jax.random.normal(ka, (m, k), jnp.float32)
      b = self.jax.random.normal(kb, (k, n), jnp.float32) * 0.05
      qa, sa = fp8.quantize(a, "e4m3", block=(1, k))  # per token
      qb, sb = fp8.quantize(b, "e4m3", block=(k, 1))  # per output channel
      self._cache[key] = (qa, sa, qb, sb, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    return self._cache[key]

  def psumbook_operands(self, b: int):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from pallas_kernels import psumbook_gemm as pg  # pylint: disable=import-outside-toplevel
    name, k, n = PSUMBOOK[self.mode]
    if "w" not in self._cache:
      fmt = pg.CodebookFormat.parse(name)
      w = pg.random_quantized(self.jax.random.key(0), fmt, k, n)
      self._cache["w"] = (fmt, w, pg.dequantize_reference(w).astype(jnp.bfloat16))
    fmt, w, w16 = self._cache["w"]
    x = self.jax.random.normal(self.jax.random.key(b), (b, k), jnp.float32)
    return fmt, w, w16, x

  # -- methods: {name: (fn, args)}

  def fp8_methods(self, m, k, n, names):
    from experiments.benchmarks import fp8_matmul  # pylint: disable=import-outside-toplevel
    return fp8_matmul.make_methods(names, *self.fp8_operands(m, k, n),
                                   interpret=self.interpret)

  def psumbook_methods(self, b, names):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from pallas_kernels import psumbook_gemm as pg  # pylint: disable=import-outside-toplevel
    _, w, w16, x = self.psumbook_operands(b)

    def pb(backend):
      return (lambda xi: pg.psumbook_matmul(xi, w, backend=backend,
                                            interpret=self.interpret), (x,))

    table = {"ffi": lambda: pb("ffi"), "gather_triton": lambda: pb("gather_triton"),
             "dequant_triton": lambda: pb("dequant_triton"),
             "xla_bf16": lambda: (lambda xi: jnp.dot(xi.astype(jnp.bfloat16), w16,
                                                     preferred_element_type=jnp.float32),
                                  (x,))}
    return {name: table[name]() for name in names}

  def fp8_names(self, square: bool = False):
    if self.on_gpu:  # the per-call form once, on the square shape (its transpose cost)
      return ["mosaic", "xla_fp8_tn", "xla_fp8", "xla_bf16"] + (
          ["mosaic_per_call"] if square else [])
    return ["pallas_triton", "xla_fp8_tn", "xla_fp8", "xla_bf16"]

  def fp8_auto(self, m: int, k: int, n: int) -> str:
    """What `fp8_matmul(backend="auto")` runs here for row/column scales."""
    from pallas_kernels.fp8_matmul import kernel as fk  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=protected-access
    thin, block = fk._mosaic_features() if self.on_gpu else (False, False)
    return fk.choose_backend(self.jax.default_backend(), self.kind, m, k, n, "rowcol",
                             interpret=self.interpret, mosaic_thin=thin, mosaic_block=block)

  def fp8_ours(self):
    return "mosaic" if self.on_gpu else "pallas_triton"

  # -- cases

  def correctness(self, deadline: float) -> dict:
    """Each kernel at the benchmark shapes against its f32 reference."""
    from pallas_kernels import fp8_matmul as fm  # pylint: disable=import-outside-toplevel
    from pallas_kernels import psumbook_gemm as pg  # pylint: disable=import-outside-toplevel
    checks = {}
    s = FP8_SQUARE[self.mode]
    thin_m = FP8_THIN[self.mode][0][0]
    kn = FP8_THIN[self.mode][1]
    jobs = []
    for m, k, n in ((s, s, s), (thin_m, kn, kn)):
      qa, sa, qb, sb, _, _ = self.fp8_operands(m, k, n)
      ref = self.jax.jit(fm.fp8_matmul_reference)(qa, sa, qb, sb)
      for backend in [self.fp8_ours(), "xla"]:
        fn = self.jax.jit(lambda qa, sa, qb, sb, backend=backend: fm.fp8_matmul(
            qa, sa, qb, sb, backend=backend, interpret=self.interpret))
        jobs.append((f"fp8_{backend}_{m}x{k}x{n}", lambda fn=fn, a=(qa, sa, qb, sb): fn(*a),
                     ref, TOL["fp8"]))
    for b in PSUMBOOK_BATCHES:
      _, w, _, x = self.psumbook_operands(b)
      ref = self.jax.jit(pg.dequant_matmul_reference)(x, w)
      for backend in ("ffi", "gather_triton", "dequant_triton"):
        fn = self.jax.jit(lambda x, backend=backend: pg.psumbook_matmul(
            x, w, backend=backend, interpret=self.interpret))
        tol = TOL["psumbook_ffi" if backend == "ffi" else "psumbook_f32"]
        jobs.append((f"psumbook_{backend}_b{b}", lambda fn=fn, x=x: fn(x), ref, tol))
    for name, run, ref, tol in jobs:
      if time.monotonic() > deadline:
        checks[name] = {"status": "skipped", "reason": "deadline"}
        continue
      try:
        got = _rel_err(run(), ref)
        checks[name] = {**got, "tol": tol, "ok": got["finite"] and got["rel_err"] < tol}
      except Exception as e:  # pylint: disable=broad-except
        checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:1000]}
    ok = all(c.get("ok") for c in checks.values() if c.get("status") != "skipped")
    return {"status": "ok" if ok else "fail", "checks": checks}

  def copy(self, deadline: float) -> dict:
    del deadline
    from experiments.benchmarks import common  # pylint: disable=import-outside-toplevel
    nbytes = (1 << 30) if self.on_gpu else (16 << 20)
    gb_s = common.copy_bandwidth(nbytes, trials=self.trials + 2, reps=20 if self.on_gpu else 3)
    self.hbm = gb_s
    return {"copy_gb_s": gb_s, "bytes": nbytes,
            "method": "jnp.roll by half (a pure copy) x reps in one jitted loop"}

  def _bench(self, methods: dict, costs: dict, reps: int, deadline: float,
             targets: list, extra: dict) -> dict:
    from experiments.benchmarks import common, cost  # pylint: disable=import-outside-toplevel
    hbm = None if cost.device_peaks(self.kind) else self.hbm
    rec = {**extra, "methods": {}, "reps": reps, "trials": self.trials}
    for name, (fn, args) in methods.items():
      if time.monotonic() > deadline:
        rec["methods"][name] = {"status": "skipped", "reason": "deadline"}
        continue
      try:
        sec = common.time_per_call(fn, args, reps=reps, trials=self.trials)
        rec["methods"][name] = {"us": sec * 1e6,
                                "cost": cost.record(costs[name], self.kind, sec,
                                                    hbm_gbps=hbm)}
      except Exception as e:  # pylint: disable=broad-except
        rec["methods"][name] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:1000]}
    t = {n: m["us"] for n, m in rec["methods"].items() if "us" in m}
    rec["targets"] = []
    for ours, base, target in targets:
      speedup = t[base] / t[ours] if ours in t and base in t else None
      rec["targets"].append({"ours": ours, "baseline": base, "target": target,
                             "speedup": speedup,
                             "met": speedup is not None and speedup >= target})
    if any(m.get("status") == "error" for m in rec["methods"].values()):
      rec["status"] = "partial"
    return rec

  def fp8_square(self, deadline: float) -> dict:
    from experiments.benchmarks import cost  # pylint: disable=import-outside-toplevel
    s = FP8_SQUARE[self.mode]
    names = self.fp8_names(square=True)
    costs = {n: (cost.bf16_gemm(s, s, s) if n == "xla_bf16" else cost.fp8_gemm(s, s, s))
             for n in names}
    return self._bench(self.fp8_methods(s, s, s, names), costs,
                       self.reps.get("fp8_square", 2), deadline,
                       [(self.fp8_ours(), "xla_fp8_tn", 1.3), (self.fp8_ours(), "xla_fp8", 1.3),
                        (self.fp8_ours(), "xla_bf16", 1.0)],
                       {"M": s, "K": s, "N": s, "auto_pick": self.fp8_auto(s, s, s)})

  def fp8_thin(self, m: int) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
      from experiments.benchmarks import cost  # pylint: disable=import-outside-toplevel
      kn = FP8_THIN[self.mode][1]
      names = self.fp8_names()
      costs = {n: (cost.bf16_gemm(m, kn, kn) if n == "xla_bf16"
                   else cost.fp8_gemm(m, kn, kn)) for n in names}
      return self._bench(self.fp8_methods(m, kn, kn, names), costs,
                         self.reps.get("fp8_thin", 2), deadline,
                         [(self.fp8_ours(), "xla_bf16", 1.5),
                          (self.fp8_ours(), "xla_fp8_tn", 1.0)],
                         {"M": m, "K": kn, "N": kn, "auto_pick": self.fp8_auto(m, kn, kn)})
    return run

  def psumbook(self, b: int) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
      # pylint: disable-next=import-outside-toplevel
      from experiments.benchmarks import psumbook as psumbook_bench
      fmt, w, _, _ = self.psumbook_operands(b)
      _, k, n = PSUMBOOK[self.mode]
      c = psumbook_bench.costs(fmt, b, k, n, scale_bytes=w.scales.dtype.itemsize)
      costs = {"ffi": c["psumbook_ffi"], "gather_triton": c["psumbook"],
               "dequant_triton": c["dequant"], "xla_bf16": c["xla_bf16"]}
      targets = ([("ffi", "xla_bf16", 5.0), ("ffi", "dequant_triton", 2.0)] if b == 1
                 else [("ffi", "dequant_triton", 1.3), ("ffi", "xla_bf16", 1.0)])
      rec = self._bench(self.psumbook_methods(b, list(costs)), costs,
                        self.reps.get("psumbook", 2), deadline, targets,
                        {"format": fmt.name, "bits_per_weight": fmt.bits_per_weight,
                         "batch": b, "K": k, "N": n})
      if b == 1 and "us" in rec["methods"].get("ffi", {}):
        us = rec["methods"]["ffi"]["us"]
        rec["targets"].append({"ours": "ffi", "baseline": "27 us", "target": 27.0,
                               "us": us, "met": us <= 27.0, "speedup": None})
      return rec
    return run

  def cases(self) -> list[Case]:
    g = self.on_gpu
    out = [Case("correctness", "correctness", self.correctness, 90 if g else 1),
           Case("copy_bandwidth", "bandwidth", self.copy, 10 if g else 1),
           Case(f"fp8_{FP8_SQUARE[self.mode]}_cubed", "benchmark", self.fp8_square,
                40 if g else 1)]
    out += [Case(f"fp8_thin_m{m}", "benchmark", self.fp8_thin(m), 25 if g else 1)
            for m in FP8_THIN[self.mode][0]]
    out += [Case(f"psumbook_b{b}", "benchmark", self.psumbook(b), 45 if g else 1)
            for b in PSUMBOOK_BATCHES]
    return out


def _configure_cache(cache: pathlib.Path) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  (cache / "jax").mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(cache / "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  os.environ.setdefault("JAXSUN_FFI_CACHE", str(cache / "ffi"))


def main(argv=None) -> dict:
  t0 = time.monotonic()
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"),
                  help=f"folder for {JSON_NAME} (default $OUT)")
  ap.add_argument("--deadline", type=float, default=DEADLINE_S,
                  help="seconds from start after which no case or method starts")
  ap.add_argument("--grace", type=float, default=GRACE_S,
                  help="the watchdog ends the process at deadline + grace")
  ap.add_argument("--cache", default=str(ROOT / ".gpu_check_cache"),
                  help="persistent compile cache (jax) and the CUDA GEMV build")
  ap.add_argument("--cpu", "--dry", dest="cpu", action="store_true",
                  help="tiny shapes, kernels in interpret mode (tests; no GPU needed)")
  ap.add_argument("--only", default="", help="comma-separated case names to run")
  ap.add_argument("--raise-in", default="", help="for tests: cases that raise at start")
  args = ap.parse_args(argv)

  cache = pathlib.Path(args.cache)
  _configure_cache(cache)
  import jax  # pylint: disable=import-outside-toplevel
  mode = "cpu" if args.cpu or jax.default_backend() != "gpu" else "gpu"
  if mode == "cpu" and not args.cpu:
    print(f"[gpu_check] no GPU (backend {jax.default_backend()!r}): running --cpu")
  header = {"_t0": t0, "check": "gpu_check", "mode": mode, "deadline_s": args.deadline,
            "grace_s": args.grace, "argv": sys.argv[1:] if argv is None else list(argv),
            **_environment(cache)}
  rec = Recorder(pathlib.Path(args.out) / JSON_NAME, header)
  watchdog = start_watchdog(rec, args.deadline + args.grace - (time.monotonic() - t0))
  try:
    suite = Suite(mode, header["machine"]["device_kind"])
    cases = suite.cases()
    if args.only:
      only = set(filter(None, args.only.split(",")))
      unknown = sorted(only - {c.name for c in cases})
      if unknown:  # a typo would otherwise spend a device window running nothing
        msg = (f"--only names no case of this mode ({mode}): {unknown}; the cases are "
               f"{[c.name for c in cases]}")
        rec.finish("bad_arguments", msg)
        raise SystemExit(msg)
      cases = [c for c in cases if c.name in only]
    status = run_cases(cases, rec, deadline_s=args.deadline, t0=t0,
                       raise_in=tuple(filter(None, args.raise_in.split(","))))
  finally:
    watchdog.cancel()
  rec.result["cache"]["files_at_end"] = _count_files(cache)
  rec.write()
  print(f"[gpu_check] {status} after {time.monotonic() - t0:.0f} s; "
        f"wrote {rec.path}", flush=True)
  for c in rec.result["cases"]:
    print(f"  {c['name']:22s} {c['status']:8s} {_summary(c)[:300]}")
  return {k: v for k, v in rec.result.items() if k != "_t0"}


if __name__ == "__main__":
  main()
