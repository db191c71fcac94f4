r"""Validate the simulator against the engine: the same seeded traces on both, side by side.

    python -m jaxsun.serving.sim.validate \
        --calibration=experiments/results/serving/calibration/cpu.json \
        --out=experiments/results/serving/validation

For each case (a deployment, task models and a workload):

1. the engine's saturation throughput is measured (every request sent at t=0);
2. the same seeded trace is replayed at `loads` (default 30%, 60%, 85%) of it on the
   real engine (`ServingSystem`, a thread per worker) and on the simulator built from
   the same system's trees (`sim_twins`), with the same deployment config and so the
   same router, policies, caches and batching;
3. TTFT and TPOT p50 / p90 / p99 and throughput are compared: medians must agree within
   `median_tol` (15%), p99s within `p99_tol` (25%);
4. policy cases replay one trace under each routing policy on both, and the simulator
   must pick the engine's best policy.

The report (JSON, Markdown, a plot) keeps the engine's measurements, so `resimulate`
re-runs only the simulator side, e.g. under another calibration (a deliberately wrong
one must fail the thresholds: the check can fail).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import time
from typing import Any, Mapping, Sequence

from jaxsun.serving import metrics
from jaxsun.serving.sim.stepmodel import Calibration
from jaxsun.serving.system import DeploymentConfig
from jaxsun.serving.workload import LengthDist, WorkloadSpec, make_workload

COMPARED = ("ttft_ms", "tpot_ms")
QUANTILES = ("median", "p90", "p99")
DEFAULT_LOADS = (0.3, 0.6, 0.85)


@dataclasses.dataclass(frozen=True)
class Case:
  """One deployment and workload to validate.

  Attributes:
    name: its name in the report.
    deployment: the DeploymentConfig (both sides).
    kinds: task model id -> "sun" / "prefillshare" / "full" / "base" (random trees of the
      base architecture, `jaxsun.serving.launch.build_task_model`).
    workload: the trace (its `rate` is replaced by load x saturation).
    policies: for a policy case: the DeploymentConfig field ("prefill_policy" or
      "decode_policy") and the policies to rank, e.g. ("prefill_policy", ("round_robin",
      "cache_aware")); the trace then runs at `policy_load` of saturation.
    rank_metric: summary key the policies are ranked by (lower is better).
  """

  name: str
  deployment: DeploymentConfig
  kinds: Mapping[str, str]
  workload: WorkloadSpec
  policies: tuple[str, tuple[str, ...]] | None = None
  rank_metric: str = "mean_ttft_ms"
  policy_load: float = 0.85


def default_cases(scale: float = 1.0) -> list[Case]:
  """The committed report's cases (`scale` shrinks the traces for tests)."""
  n = max(8, int(160 * scale))
  lengths = dict(prompt_len=LengthDist.uniform(16, 96),
                 output_len=LengthDist.uniform(16, 96), vocab=(1, 250))
  dep = DeploymentConfig(kind="sun", prefill_workers=1, decode_workers=1, slots=8,
                         capacity=256, chunk=16, max_inflight=4096, max_queue=4096)
  cases = [Case("sun-1P1D", dep, {"math": "sun"},
                WorkloadSpec(models=("math",), num_requests=n, seed=1, **lengths))]
  # Multi-turn sessions on PrefillShare's shared prefill pool: routing a turn to the
  # worker that holds its session's context (cache-aware) prefills only the new tokens;
  # round robin finds the context on the other worker half the time and prefills it all.
  pol = DeploymentConfig(kind="prefillshare", prefill_workers=2, decode_workers=1, slots=8,
                         capacity=256, chunk=16, max_inflight=4096, max_queue=4096)
  cases.append(Case(
      "prefillshare-2P1D-prefill-policies", pol, {"planner": "prefillshare"},
      WorkloadSpec(models=("planner",), kind="sessions", num_sessions=max(4, n // 4),
                   turns=4, prompt_len=LengthDist.uniform(64, 112),
                   output_len=LengthDist.uniform(8, 24), observation_len=LengthDist.uniform(8, 24),
                   max_context_len=256, vocab=(1, 250), seed=2),
      policies=("prefill_policy", ("round_robin", "cache_aware")),
      rank_metric="mean_ttft_ms", policy_load=0.6))
  return cases


# ----------------------------------------------------------------------------- running


def build_engine_system(case: Case, deployment: DeploymentConfig | None = None,
                        base: str = "shipped:llama_bytes"):
  """The real ServingSystem of a case (threads started)."""
  from jaxsun.serving.system import ServingSystem  # pylint: disable=import-outside-toplevel

  return ServingSystem(deployment or case.deployment, engine_models(case.kinds, base),
                       eos_id=None)


def engine_models(kinds: Mapping[str, str], base: str = "shipped:llama_bytes") -> dict:
  """Task models of `kinds` (model -> sun / prefillshare / full / base) with random task
  trees (seeded by the model's rank) over the base (`launch.build_task_model`)."""
  from jaxsun.serving import launch  # pylint: disable=import-outside-toplevel

  split = base_model(base)
  return {m: launch.build_task_model(m, "base" if k == "base" else f"{k}:random:{i + 1}",
                                     split)
          for i, (m, k) in enumerate(sorted(kinds.items()))}


_BASES: dict = {}


def base_model(spec: str):
  """`launch.load_base(spec)`, loaded once per process."""
  if spec not in _BASES:
    from jaxsun.serving import launch  # pylint: disable=import-outside-toplevel
    _BASES[spec] = launch.load_base(spec)
  return _BASES[spec]


def summary_of(records, duration_s: float, n_devices: int) -> dict[str, Any]:
  """The compared figures of a run (ms; throughput in output tokens/s)."""
  s = metrics.summarize(records, max(duration_s, 1e-9), n_devices=n_devices)
  out = {k: s[k] for k in ("completed", "failed", "rejected", "output_throughput",
                           "request_throughput", "prefix_hit_rate", "mean_ttft_ms",
                           "mean_tpot_ms", "mean_e2el_ms", "median_e2el_ms")}
  for m in COMPARED:
    for q in QUANTILES:
      out[f"{q}_{m}"] = s[f"{q}_{m}"]
  out["duration_s"] = duration_s
  return out


def run_engine(case: Case, items, deployment: DeploymentConfig | None = None,
               base: str = "shipped:llama_bytes", warmup: bool = True,
               step_log: list | None = None, cores: int | None = None) -> dict[str, Any]:
  """Replays `items` on the real engine; the server-side records' summary (and the
  engines' logged steps appended to `step_log` if given)."""
  from jaxsun.serving.bench import run_workload  # pylint: disable=import-outside-toplevel

  system = build_engine_system(case, deployment, base)
  try:
    if warmup:  # no request may wait for a compilation
      system.warm_up()
    if step_log is not None:
      from jaxsun.serving.sim.calibrate import enable_step_logs  # pylint: disable=import-outside-toplevel
      enable_step_logs(system)
    result = run_workload(system, items)
    if step_log is not None:
      from jaxsun.serving.sim.calibrate import collect_steps  # pylint: disable=import-outside-toplevel
      step_log.extend(collect_steps(system, cores))
    server = {r.request_id: r for r in system.records}
    records = [server.get(r.request_id, r) for r in result.records]
    n_dev = len(system.prefill_workers) + len(system.decode_workers)
    return summary_of(records, result.duration_s, n_dev)
  finally:
    system.shutdown(drain=False)


def run_sim(case: Case, items, calibration: Calibration, twins: Mapping,
            deployment: DeploymentConfig | None = None) -> dict[str, Any]:
  """Replays `items` on the simulator of the same deployment and trees."""
  from jaxsun.serving.sim.system import SimSystem  # pylint: disable=import-outside-toplevel

  sim = SimSystem(deployment or case.deployment, twins, calibration)
  result = sim.run(items)
  n_dev = len(sim.prefill_workers) + len(sim.decode_workers)
  return summary_of(result.records, result.duration_s, n_dev)


def arrival_rate(case: Case, load: float, saturation_req_s: float) -> float:
  """The workload `rate` that offers `load` x saturation requests per second (a sessions
  workload's rate counts sessions, each `turns` requests)."""
  per = case.workload.turns if case.workload.kind == "sessions" else 1
  return load * saturation_req_s / per


def saturation(case: Case, base: str = "shipped:llama_bytes", repeats: int = 5) -> float:
  """The engine's request throughput with the whole trace sent at t=0 (req/s): the
  median of `repeats` runs (a loaded CPU is noisy)."""
  rates = []
  for r in range(repeats):
    items = make_workload(dataclasses.replace(case.workload, rate=math.inf,
                                              seed=case.workload.seed + 7919 * r))
    rates.append(run_engine(case, items, base=base)["request_throughput"])
  return float(statistics.median(rates))


def mean_std(summaries: Sequence[Mapping]) -> tuple[dict, dict]:
  """Per-key mean and (population) std over runs, for numeric keys defined in all."""
  mean, std = {}, {}
  for key in summaries[0]:
    vals = [s.get(key) for s in summaries]
    if all(isinstance(v, (int, float)) and v is not None for v in vals):
      mean[key] = float(statistics.fmean(vals))
      std[key] = float(statistics.pstdev(vals)) if len(vals) > 1 else 0.0
  return mean, std


def sim_twins_of(case: Case, base: str = "shipped:llama_bytes"):
  """The simulated twins of a case's task models (the engine's tree ids and sizes)."""
  return _twins(case, base)


def _twins(case: Case, base: str):
  from jaxsun.serving.sim.system import sim_twins  # pylint: disable=import-outside-toplevel

  system = build_engine_system(case, base=base)
  try:
    return sim_twins(system)
  finally:
    system.shutdown(drain=False)


# ----------------------------------------------------------------------------- comparing


def rel_err(sim: float | None, eng: float | None) -> float | None:
  if sim is None or eng is None or eng == 0:
    return None
  return (sim - eng) / eng


def compare(engine: Mapping, sim: Mapping, median_tol: float, p99_tol: float) -> dict:
  """Relative errors of the compared figures and whether each is within tolerance."""
  rows, ok = {}, True
  for m in COMPARED:
    for q in QUANTILES:
      key = f"{q}_{m}"
      e = rel_err(sim.get(key), engine.get(key))
      tol = median_tol if q == "median" else (p99_tol if q == "p99" else None)
      within = None if tol is None or e is None else abs(e) <= tol
      rows[key] = {"engine": engine.get(key), "sim": sim.get(key), "rel_err": e,
                   "tol": tol, "ok": within}
      ok &= within is not False
  e = rel_err(sim.get("output_throughput"), engine.get("output_throughput"))
  rows["output_throughput"] = {"engine": engine.get("output_throughput"),
                               "sim": sim.get("output_throughput"), "rel_err": e,
                               "tol": median_tol, "ok": e is not None and abs(e) <= median_tol}
  ok &= rows["output_throughput"]["ok"]
  return {"rows": rows, "ok": bool(ok)}


def validate(calibration: Calibration, *, cases: Sequence[Case] | None = None,
             loads: Sequence[float] = DEFAULT_LOADS, seeds: int = 3,
             median_tol: float = 0.15, p99_tol: float = 0.25,
             base: str = "shipped:llama_bytes", progress: bool = True) -> dict[str, Any]:
  """Runs every case on the engine and the simulator; the report (see the module doc).

  Each (case, load) runs `seeds` traces (the case's seed, +1, ...); figures are compared
  on their means over the seeds, and both sides' std is reported.
  """
  cases = list(default_cases() if cases is None else cases)
  report = {"calibration": calibration.name, "calibration_source": calibration.source,
            "device": calibration.device, "base": base, "loads": list(loads),
            "seeds": seeds, "median_tol": median_tol, "p99_tol": p99_tol, "cases": []}
  cores = calibration.engine.get("host_cores")
  fold_steps: list[list] = [[] for _ in range(seeds)]  # engine steps of trace seed k
  for case in cases:
    t0 = time.perf_counter()
    sat = saturation(case, base)
    entry = {"name": case.name, "deployment": dataclasses.asdict(case.deployment),
             "kinds": dict(case.kinds), "workload": _spec_dict(case.workload),
             "saturation_req_s": sat, "runs": []}
    if case.policies is None:
      runs = [(load, None) for load in loads]
    else:
      runs = [(case.policy_load, pol) for pol in case.policies[1]]
    for load, pol in runs:
      dep = _deployment(case, pol)
      engine_runs = []
      rate = arrival_rate(case, load, sat)
      for k in range(seeds):
        items = make_workload(dataclasses.replace(case.workload, rate=rate,
                                                  seed=case.workload.seed + k))
        engine_runs.append(run_engine(case, items, dep, base, step_log=fold_steps[k],
                                      cores=cores))
      entry["runs"].append({"load": load, "policy": pol, "rate": rate,
                            "engine_runs": engine_runs})
      if progress:
        m, _ = mean_std(engine_runs)
        print(f"[{case.name}] load {load:.2f}{'' if pol is None else ' ' + pol}: engine "
              f"ttft p50 {m['median_ttft_ms']:.1f} ms, tpot p50 {m['median_tpot_ms']:.2f} ms",
              flush=True)
    entry["wall_s"] = time.perf_counter() - t0
    report["cases"].append(entry)
  twins = {c.name: _twins(c, base) for c in cases}
  folds = fold_calibrations(calibration, fold_steps)
  out = resimulate(report, folds, cases=cases, twins=twins)
  given = resimulate(report, calibration, cases=cases, twins=twins)
  out["given_calibration"] = {"name": calibration.name, "passed": given["passed"],
                              "cases": given["cases"]}
  out["_folds"] = folds  # written beside the report by `write`, then dropped
  return out


def fold_calibrations(calibration: Calibration, fold_steps: Sequence[Sequence]
                      ) -> list[Calibration]:
  """Calibration k is fitted to the engine steps logged while serving every trace but
  those of seed k, so the traces it is compared on are never in its fit, while its steps
  come from the same minutes of this machine (a shared CPU drifts between runs)."""
  from jaxsun.serving.sim.stepmodel import fit  # pylint: disable=import-outside-toplevel

  out = []
  for k in range(len(fold_steps)):
    steps = [r for j, fs in enumerate(fold_steps) if j != k for r in fs]
    out.append(dataclasses.replace(
        calibration, name=f"{calibration.name}-fold{k}", modules=fit(steps),
        notes=f"fitted to the validation's engine steps of every trace seed but {k} "
        f"({len(steps)} steps); transports from {calibration.name}"))
  return out


def _deployment(case: Case, policy: str | None) -> DeploymentConfig:
  if policy is None:
    return case.deployment
  return dataclasses.replace(case.deployment, **{case.policies[0]: policy})


def resimulate(report: Mapping, calibration: Calibration | Sequence[Calibration], *,
               cases: Sequence[Case], twins: Mapping[str, Mapping]) -> dict[str, Any]:
  """The simulator side of a report (its engine measurements kept) under `calibration`,
  or under per-seed calibrations (`fold_calibrations`: seed k's traces under the k-th)."""
  report = json.loads(json.dumps({k: v for k, v in report.items() if k != "_folds"}))
  cals = [calibration] if isinstance(calibration, Calibration) else list(calibration)
  report["calibration"] = ", ".join(c.name for c in cals)
  by_name = {c.name: c for c in cases}
  passed = True
  for entry in report["cases"]:
    case = by_name[entry["name"]]
    for run in entry["runs"]:
      dep = _deployment(case, run["policy"])
      run["sim_runs"] = []
      for k in range(len(run["engine_runs"])):
        items = make_workload(dataclasses.replace(case.workload, rate=run["rate"],
                                                  seed=case.workload.seed + k))
        run["sim_runs"].append(run_sim(case, items, cals[k % len(cals)], twins[case.name],
                                       dep))
      run["engine"], run["engine_std"] = mean_std(run["engine_runs"])
      run["sim"], run["sim_std"] = mean_std(run["sim_runs"])
      run["compare"] = compare(run["engine"], run["sim"], report["median_tol"],
                               report["p99_tol"])
      if run["policy"] is None:
        passed &= run["compare"]["ok"]
    if case.policies is not None:
      metric = case.rank_metric
      rank_e = sorted(entry["runs"], key=lambda r: r["engine"][metric])
      rank_s = sorted(entry["runs"], key=lambda r: r["sim"][metric])
      entry["ranking"] = {"metric": metric,
                          "engine": [r["policy"] for r in rank_e],
                          "sim": [r["policy"] for r in rank_s],
                          "engine_values": {r["policy"]: r["engine"][metric] for r in rank_e},
                          "sim_values": {r["policy"]: r["sim"][metric] for r in rank_s}}
      entry["ranking"]["same_best"] = rank_e[0]["policy"] == rank_s[0]["policy"]
      passed &= entry["ranking"]["same_best"]
  report["passed"] = bool(passed)
  report["score"] = score(report)
  return report


def score(report: Mapping) -> dict[str, Any]:
  """How far the simulator is from the engine over a report's load cases: mean absolute
  relative error of the medians and of the p99s, and rows within tolerance."""
  med, p99, ok, n = [], [], 0, 0
  for entry in report["cases"]:
    for run in entry["runs"]:
      if run["policy"] is not None:
        continue
      for key, row in run["compare"]["rows"].items():
        if row["tol"] is None or row["rel_err"] is None:
          continue
        n += 1
        ok += bool(row["ok"])
        (med if key.startswith("median") else p99 if key.startswith("p99") else []).append(
            abs(row["rel_err"]))
  return {"median_abs_rel_err": statistics.fmean(med) if med else None,
          "p99_abs_rel_err": statistics.fmean(p99) if p99 else None,
          "rows_ok": ok, "rows": n}


def _spec_dict(spec: WorkloadSpec) -> dict:
  d = dataclasses.asdict(spec)
  return json.loads(json.dumps(d, default=str))


# ----------------------------------------------------------------------------- output


def markdown(report: Mapping) -> str:
  lines = [f"# Simulator vs engine ({report['calibration']})", "",
           f"Device: {report['device'].get('device_kind')} "
           f"({report['device'].get('cpu_count')} CPUs). Tolerances: medians "
           f"{100 * report['median_tol']:.0f}%, p99 {100 * report['p99_tol']:.0f}%. "
           f"**{'PASSED' if report['passed'] else 'FAILED'}**", ""]
  given = report.get("given_calibration")
  if given:
    lines += [f"The simulator runs seed k's traces under a calibration fitted to the engine "
              f"steps of the other seeds' traces, logged in the same minutes "
              f"(`fold_calibrations`). Under the calibration measured before the run "
              f"(`{given['name']}`), the report {'passes' if given['passed'] else 'fails'}: "
              + "; ".join(_worst(e) for e in given["cases"]), ""]
  for entry in report["cases"]:
    lines += [f"## {entry['name']} (saturation {entry['saturation_req_s']:.2f} req/s)", "",
              "| load | policy | metric | engine (mean ± std) | sim (mean ± std) | error | ok |",
              "|---|---|---|---|---|---|---|"]
    for run in entry["runs"]:
      for key, row in run["compare"]["rows"].items():
        if row["tol"] is None and run["policy"] is None and "p90" not in key:
          continue
        err = "n/a" if row["rel_err"] is None else f"{100 * row['rel_err']:+.1f}%"
        lines.append(f"| {run['load']:.2f} | {run['policy'] or '-'} | {key} | "
                     f"{_f(row['engine'])} ± {_f(run['engine_std'].get(key))} | "
                     f"{_f(row['sim'])} ± {_f(run['sim_std'].get(key))} | {err} | "
                     f"{'' if row['ok'] is None else ('yes' if row['ok'] else 'NO')} |")
    if "ranking" in entry:
      r = entry["ranking"]
      lines += ["", f"Policy ranking by {r['metric']}: engine {r['engine']}, simulator "
                f"{r['sim']}: same best: **{r['same_best']}**"]
    lines.append("")
  return "\n".join(lines) + "\n"


def _worst(entry: Mapping) -> str:
  errs = [(abs(row["rel_err"]), key, run["load"]) for run in entry["runs"]
          for key, row in run["compare"]["rows"].items()
          if row["tol"] is not None and row["rel_err"] is not None]
  if not errs:
    return entry["name"]
  e, key, load = max(errs)
  return f"{entry['name']}: worst {key} at load {load:.2f} off by {100 * e:.0f}%"


def _f(x) -> str:
  return "n/a" if x is None else f"{x:.2f}"


def plot(report: Mapping, path: pathlib.Path) -> None:
  """Engine vs simulator TTFT / TPOT percentiles per load (one panel per metric)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  entries = [e for e in report["cases"] if all(r["policy"] is None for r in e["runs"])]
  fig, axes = plt.subplots(len(entries) or 1, 2, figsize=(10, 3.6 * max(1, len(entries))),
                           squeeze=False)
  for row, entry in enumerate(entries):
    for col, m in enumerate(COMPARED):
      ax = axes[row][col]
      for q, style in zip(QUANTILES, ("-", "--", ":")):
        loads = [r["load"] for r in entry["runs"]]
        ax.plot(loads, [r["engine"][f"{q}_{m}"] for r in entry["runs"]], "o" + style,
                color="C0", label=f"engine {q}")
        ax.plot(loads, [r["sim"][f"{q}_{m}"] for r in entry["runs"]], "s" + style,
                color="C1", label=f"simulator {q}")
      ax.set_xlabel("load (fraction of saturation)")
      ax.set_ylabel(m)
      ax.set_title(f"{entry['name']}: {m}")
      ax.legend(fontsize=7)
  fig.tight_layout()
  metrics._write_atomic(path, _png(fig))  # pylint: disable=protected-access
  plt.close(fig)


def _png(fig) -> bytes:
  import io  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  return buf.getvalue()


def write(report: Mapping, out: str | pathlib.Path, stem: str = "validation") -> pathlib.Path:
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  metrics._write_atomic(out / f"{stem}.json",  # pylint: disable=protected-access
                        (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
  metrics._write_atomic(out / f"{stem}.md", markdown(report).encode())  # pylint: disable=protected-access
  plot(report, out / f"{stem}.png")
  return out / f"{stem}.json"


def main(argv: Sequence[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--calibration", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--scale", type=float, default=1.0, help="trace size multiplier")
  ap.add_argument("--base", default="shipped:llama_bytes")
  ap.add_argument("--resimulate", default=None,
                  help="a report JSON: keep its engine measurements, rerun the simulator")
  args = ap.parse_args(argv)
  cal = Calibration.load(args.calibration)
  cases = default_cases(args.scale)
  if args.resimulate:
    with open(args.resimulate) as f:
      old = json.load(f)
    names = {e["name"] for e in old["cases"]}
    cases = [c for c in cases if c.name in names]
    folds = [Calibration.load(f) for f in old.get("fold_calibration_files", [])]
    report = resimulate(old, folds or cal, cases=cases,
                        twins={c.name: _twins(c, args.base) for c in cases})
  else:
    report = validate(cal, cases=cases, base=args.base)
    report["fold_calibration_files"] = []
    for k, fc in enumerate(report.pop("_folds")):
      path = pathlib.Path(args.out) / f"calibration_fold{k}.json"
      path.parent.mkdir(parents=True, exist_ok=True)
      fc.save(path)
      report["fold_calibration_files"].append(str(path))
  report["calibration_file"] = args.calibration
  command = "python -m jaxsun.serving.sim.validate " + " ".join(
      argv if argv is not None else __import__("sys").argv[1:])
  if args.resimulate:  # the engine side came from the original command
    report["resimulate_command"] = command
  else:
    report["command"] = command
  path = write(report, args.out)
  print(markdown(report))
  print(f"wrote {path}")
  return report


if __name__ == "__main__":
  main()
