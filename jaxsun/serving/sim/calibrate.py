r"""Profile the engine on this device and write a versioned step-time calibration.

    python -m jaxsun.serving.sim.calibrate --mode=live \
        --out=experiments/results/serving/calibration/cpu_live.json

The engine logs every device call it makes (`Engine.step_log`: module, step-time
features, measured seconds). Two sources of logs, fitted together or apart:

* a sweep (`profile_engine`): prefill calls over prompt and cached-prefix lengths, and
  decode chunks over live rows, KV lengths and chunk lengths, each after a warm-up
  call of its shape (no compilation is timed), synchronously;
* a live deployment (`enable_step_logs` / `collect_steps`): the steps the workers ran
  while serving a workload, with whatever the device shares with (on a CPU: the other
  workers' threads).

`fit` (`stepmodel.fit`) gives a non-negative linear model per module, and a measured
table where it predicts held-out steps better; transports are fitted as
`alpha + bytes / bandwidth` from timed transfers. The file records the device, the
versions and the git commit it was measured at.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import time
from typing import Mapping, Sequence

import numpy as np

from jaxsun.serving.sim.stepmodel import (Calibration, StepFeatures, StepRecord,
                                          TransportModel, fit)

DEFAULT_BASE = "shipped:llama_bytes"


def environment() -> tuple[dict, dict]:
  """(device, versions) of this process: what a calibration is only valid for."""
  import jax  # pylint: disable=import-outside-toplevel

  dev = jax.devices()[0]
  device = {"platform": dev.platform, "device_kind": dev.device_kind,
            "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
            "host": platform.node()}
  versions = {"jax": jax.__version__, "jaxlib": jax.lib.__version__,
              "python": platform.python_version(), "jaxsun": git_commit()}
  return device, versions


def git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=True, timeout=10,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def save_steps(records: Sequence[StepRecord], path: str) -> None:
  """The logged steps a calibration was fitted to (gzipped JSON lines), so it can be
  refitted or audited without measuring again."""
  import gzip  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel

  tmp = path + ".tmp"
  with gzip.open(tmp, "wt") as f:
    for r in records:
      f.write(json.dumps(r.to_dict()) + "\n")
  os.replace(tmp, path)


def load_steps(path: str) -> list[StepRecord]:
  import gzip  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel

  with gzip.open(path, "rt") as f:
    return [StepRecord.from_dict(json.loads(line)) for line in f if line.strip()]


def to_records(logged) -> list[StepRecord]:
  """`Engine.step_log` entries as StepRecords (zero-length ones dropped)."""
  return [StepRecord(e.module, StepFeatures(**e.work), e.seconds) for e in logged
          if e.seconds > 0]


# ----------------------------------------------------------------------------- live logs


def _engines(system):
  for w in system.prefill_workers + system.decode_workers:
    yield w.engine
    pre = getattr(w, "prefiller", None)
    if pre is not None:
      yield pre.engine


def enable_step_logs(system) -> None:
  """Makes every engine of a (real) ServingSystem log its device calls from now on."""
  for e in _engines(system):
    e.step_log = []


def collect_steps(system, cores: int | None = None) -> list[StepRecord]:
  """The device calls every engine of `system` logged (`enable_step_logs`).

  With `cores`, each step's time is divided by the processor sharing it met: the mean
  number of the system's engines busy during it over `cores` (when above 1). Worker
  threads of a CPU engine share its cores; the simulator puts that sharing back
  (`SimDevice.contention`) for whatever concurrency its own runs have.
  """
  logged = [e for eng in _engines(system) for e in (eng.step_log or []) if e.seconds > 0]
  if cores and logged:
    start = np.array([e.start for e in logged])
    end = start + np.array([e.seconds for e in logged])
    overlap = np.clip(np.minimum(end[:, None], end[None, :]) -
                      np.maximum(start[:, None], start[None, :]), 0, None).sum(axis=1)
    busy = overlap / (end - start)  # self included: >= 1
    factor = np.maximum(1.0, busy / cores)
    logged = [dataclasses.replace(e, seconds=e.seconds / f) for e, f in zip(logged, factor)]
  return to_records(logged)


# ----------------------------------------------------------------------------- sweep


def profile_engine(engine, prefill_params: Sequence, decode_params: Sequence, *,
                   prefill_samples: int = 120, decode_samples: int = 160, seed: int = 0,
                   progress: bool = False) -> list[StepRecord]:
  """Times the engine's prefill calls and decode chunks over a randomised sweep.

  Args:
    engine: a real `Engine` (its capacity, slots and chunk set the shapes).
    prefill_params: prefill trees to time (each gets its own module key by variant).
    decode_params: decode trees to time.
    prefill_samples, decode_samples: timed calls per tree.
    seed: the sweep's seed.
    progress: print a line per tree.

  Returns:
    StepRecords of the timed calls (warm-up calls of each new shape excluded).
  """
  from jaxsun.serving.request import SamplingParams  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  vocab, cap = engine.cfg.vocab_size, engine.capacity
  records: list[StepRecord] = []

  def prompt(n):
    return tuple(int(t) for t in rng.integers(1, vocab, size=n))

  seen: set = set()
  for p in prefill_params:
    engine.step_log = []
    for _ in range(prefill_samples):
      n = int(rng.integers(2, cap // 2 + 1))
      cached_n = int(rng.integers(0, n - 1)) if rng.random() < 0.4 else 0
      toks = prompt(n)
      hit = None
      if cached_n > 0:
        hit, _ = engine.prefill(p, toks[:cached_n])
      engine.step_log = []
      shape = ("p", p.tree_id, _prefill_shape(engine, p, n, hit))
      if shape not in seen:  # compile outside the log
        engine.prefill(p, toks, existing_prefix=hit)
        seen.add(shape)
        engine.step_log = []
      engine.prefill(p, toks, existing_prefix=hit)
      records += to_records(engine.step_log)
    if progress:
      print(f"  prefill {p.tree_id}: {prefill_samples} calls")
  pre = prefill_params[0]

  def fill(rows: int, longest: int, steps: int):
    """A store with `rows` live rows, the first `longest` tokens long."""
    state = engine.init_decode_state()
    for slot in range(rows):
      n = longest if slot == 0 else int(rng.integers(2, longest + 1))
      prefix, _ = engine.prefill(pre, prompt(n))
      state = engine.insert(prefix, state, slot, valid_producers={prefix.producer},
                            sampling=SamplingParams(max_tokens=steps + 1, ignore_eos=True))
    return state

  for p in decode_params:
    for _ in range(decode_samples):
      rows = int(rng.integers(1, engine.slots + 1))
      steps = int(rng.integers(1, engine.chunk + 1))
      longest = int(rng.integers(4, cap - engine.chunk - 1))
      engine.step_log = None
      key = ("d", p.tree_id, engine.kv_len_for(longest))
      if key not in seen:  # compile outside the log
        _, chunk = engine.generate(p, fill(rows, longest, steps), max_live_length=longest)
        engine.fetch(chunk)
        seen.add(key)
      state = fill(rows, longest, steps)
      engine.step_log = []
      engine._last_fetch = 0.0  # pylint: disable=protected-access
      _, chunk = engine.generate(p, state, max_live_length=longest)
      engine.fetch(chunk)
      records += to_records(engine.step_log)
    if progress:
      print(f"  decode {p.tree_id}: {decode_samples} chunks")
  engine.step_log = None
  return records


def _prefill_shape(engine, params, n: int, hit) -> tuple:
  from jaxsun.serving.engine import prefill_plan  # pylint: disable=import-outside-toplevel

  n_cache = n - 1 if params.last_prompt_token == "decode" else n
  cached = 0 if hit is None else min(hit.length, n_cache)
  return prefill_plan(n_cache, cached, engine.capacity), hit is not None


def time_transfers(transfer, prefixes: Sequence, repeats: int = 3) -> TransportModel:
  """Fits `alpha + bytes / bandwidth` to timed send + receive of each prefix."""
  sizes, secs = [], []
  for p in prefixes:
    transfer.receive(transfer.send(p))  # warm-up
    for _ in range(repeats):
      t0 = time.perf_counter()
      transfer.receive(transfer.send(p))
      secs.append(time.perf_counter() - t0)
      sizes.append(p.nbytes)
  return TransportModel.fit(sizes, secs)


def calibrate(records: Sequence[StepRecord], *, name: str,
              transports: Mapping[str, TransportModel], engine: Mapping | None = None,
              notes: str = "", seed: int = 0) -> Calibration:
  """A measured Calibration of `records` on this device."""
  device, versions = environment()
  return Calibration(name=name, modules=fit(records, seed=seed), transports=dict(transports),
                     source="measured", device=device, versions=versions,
                     engine=dict(engine or {}),
                     date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"), notes=notes)


def engine_info(engine, base: str) -> dict:
  cfg = engine.cfg
  return {"layout": "static", "slots": engine.slots, "capacity": engine.capacity,
          "chunk": engine.chunk, "base": base,
          "model": {"name": cfg.name, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                    "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                    "vocab_size": cfg.vocab_size, "params": cfg.num_params()}}


def profile_calibration(*, base: str = DEFAULT_BASE, slots: int = 8, capacity: int = 256,
                        chunk: int = 16, prefill_samples: int = 120,
                        decode_samples: int = 160, seed: int = 0, name: str | None = None,
                        decode_trees: Mapping | None = None,
                        progress: bool = False) -> tuple[Calibration, list[StepRecord]]:
  """Profiles a base model's engine (and extra decode trees, e.g. quantized ones).

  Args:
    base: the base model spec (`jaxsun.serving.launch.load_base`).
    slots, capacity, chunk: the engine's shape.
    prefill_samples, decode_samples: timed calls per tree.
    seed: sweep seed.
    name: the calibration's name (default "<platform>-<base>").
    decode_trees: extra decode `Params` to profile (their `variant` names the module).
    progress: print progress.

  Returns:
    (calibration, the records it was fitted to).
  """
  from jaxsun.serving import launch  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.engine import Engine, Params  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.transfer import KVTransfer  # pylint: disable=import-outside-toplevel

  split = launch.load_base(base)
  engine = Engine(split.cfg, slots=slots, capacity=min(capacity, split.cfg.max_len),
                  chunk=chunk)
  p = Params.prefill_of(split)
  decode = [Params.decode_of(split)] + list((decode_trees or {}).values())
  records = profile_engine(engine, [p], decode, prefill_samples=prefill_samples,
                           decode_samples=decode_samples, seed=seed, progress=progress)
  rng = np.random.default_rng(seed + 1)
  prefixes = [engine.prefill(p, tuple(int(t) for t in rng.integers(1, split.cfg.vocab_size,
                                                                    size=n)))[0]
              for n in (8, 32, 96, engine.capacity // 2)]
  transports = {"in_process": time_transfers(KVTransfer(), prefixes)}
  device, _ = environment()
  cal = calibrate(records, name=name or f"{device['platform']}-{base.split(':')[-1]}",
                  transports=transports, engine=engine_info(engine, base), seed=seed,
                  notes="isolated sweep (profile_engine)")
  return cal, records


def live_calibration(*, loads: Sequence[float] = (0.3, 0.6, 0.9), seed_offset: int = 1000,
                     scale: float = 1.0, base: str = DEFAULT_BASE, name: str | None = None,
                     progress: bool = False) -> tuple[Calibration, list[StepRecord]]:
  """Fits the steps the engine logged while serving: the validation cases' workloads
  (`jaxsun.serving.sim.validate.default_cases`) with other seeds, at `loads` of each
  case's saturation, so the calibration never sees the traces it is validated on.

  Returns:
    (calibration, the records it was fitted to).
  """
  from jaxsun.serving.sim import validate  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.engine import Engine, Params  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.transfer import KVTransfer  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.workload import make_workload  # pylint: disable=import-outside-toplevel

  records: list[StepRecord] = []
  cases = validate.default_cases(scale)
  device, _ = environment()
  # Worker threads share a CPU's cores: log times with that sharing divided out.
  cores = device["cpu_count"] if device["platform"] == "cpu" else None
  for case in cases:
    sat = validate.saturation(case, base, repeats=1)
    for load in loads:
      for case_run in _policy_variants(case):
        spec = dataclasses.replace(case.workload, rate=validate.arrival_rate(case, load, sat),
                                   seed=case.workload.seed + seed_offset)
        validate.run_engine(case, make_workload(spec), case_run, base, step_log=records,
                            cores=cores)
    if progress:
      print(f"  {case.name}: saturation {sat:.1f} req/s, {len(records)} steps so far",
            flush=True)
  split = validate.base_model(base)
  dep = cases[0].deployment
  engine = Engine(split.cfg, slots=dep.slots, capacity=dep.capacity, chunk=dep.chunk)
  rng = np.random.default_rng(seed_offset)
  p = Params.prefill_of(split)
  prefixes = [engine.prefill(p, tuple(int(t) for t in rng.integers(1, split.cfg.vocab_size,
                                                                    size=n)))[0]
              for n in (8, 32, 96, dep.capacity // 2)]
  transports = {"in_process": time_transfers(KVTransfer(), prefixes)}
  cal = calibrate(records, name=name or f"{device['platform']}-{base.split(':')[-1]}-live",
                  transports=transports, engine={**engine_info(engine, base),
                                                 "host_cores": cores},
                  notes=f"steps logged by live deployments ({', '.join(c.name for c in cases)})"
                  f" at loads {list(loads)} of saturation, trace seeds +{seed_offset}")
  return cal, records


def _policy_variants(case):
  if case.policies is None:
    return [case.deployment]
  field, names = case.policies
  return [dataclasses.replace(case.deployment, **{field: n}) for n in names]


def main(argv: Sequence[str] | None = None) -> Calibration:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="calibration JSON to write")
  ap.add_argument("--base", default=DEFAULT_BASE)
  ap.add_argument("--slots", type=int, default=8)
  ap.add_argument("--capacity", type=int, default=256)
  ap.add_argument("--chunk", type=int, default=16)
  ap.add_argument("--prefill-samples", type=int, default=120)
  ap.add_argument("--decode-samples", type=int, default=160)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--mode", choices=("live", "sweep"), default="live",
                  help="live: steps logged while serving the validation workloads (other "
                  "seeds); sweep: an isolated sweep of the engine's calls")
  ap.add_argument("--scale", type=float, default=1.0, help="live: trace size multiplier")
  ap.add_argument("--refit", default=None,
                  help="fit the steps a previous run saved (<out>.steps.jsonl.gz) again, "
                  "measuring nothing")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  if args.refit:
    old = Calibration.load(args.refit.replace(".steps.jsonl.gz", ""))
    records = load_steps(args.refit)
    cal = dataclasses.replace(old, modules=fit(records, seed=args.seed),
                              notes=old.notes + " (refitted)")
  elif args.mode == "live":
    cal, records = live_calibration(base=args.base, scale=args.scale, progress=True)
  else:
    cal, records = profile_calibration(base=args.base, slots=args.slots,
                                       capacity=args.capacity, chunk=args.chunk,
                                       prefill_samples=args.prefill_samples,
                                       decode_samples=args.decode_samples, seed=args.seed,
                                       progress=True)
  cal.save(args.out)
  save_steps(records, args.out + ".steps.jsonl.gz")
  for key, m in sorted(cal.modules.items()):
    print(f"{key}: {m.n_train} steps, use={m.use}, held-out MAPE linear "
          f"{_pct(m.linear_mape)} table {_pct(m.table_mape)}")
  print(f"wrote {args.out} ({len(records)} steps, {time.perf_counter() - t0:.0f} s)")
  return cal


def _pct(x):
  return "n/a" if x is None else f"{x:.1f}%"


if __name__ == "__main__":
  main()
