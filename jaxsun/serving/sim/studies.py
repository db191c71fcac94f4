r"""The serving studies: SUN vs conventional disaggregation, QSUN, PrefillShare.

    python -m jaxsun.serving.sim.studies --config=configs/serving.py:study_sun_h100
    python -m jaxsun.serving.sim.studies --config=configs/serving.py:study_sun_engine

Each study runs on a *backend*: the real engine at this machine's scale (`ServingSystem`
with random task trees of a small base, a thread per worker) or the simulator at paper
scale (`SimSystem`, an 8B-class model on a calibration such as the H100 one derived from
published figures). The same deployments, workloads and metrics go to both; every point
is the mean ± std over seeds, and the papers' claims sit beside the measured figures.

* `sun_study`: N task models with Zipf-skewed popularity; conventional disaggregation
  (per-model prefill and decode workers) against SUN (per-model prefill, one shared decode
  pool) at equal device count, and SUN with half the decode workers. Measured: the
  highest request rate whose requests meet a TTFT and TPOT SLO (attainment >= 90%, as
  DistServe), per device, and TPOT at one equal load; the skew is swept.
* `qsun_study`: SUN with its shared decode module in low bit: the measured (engine) or
  modelled (simulator) decode step time and its effect on TPOT and SLO throughput.
* `prefillshare_study`: multi-agent sessions (the task models take turns on one growing
  context), per-model prefill (each model its own prefill workers and caches) against
  PrefillShare (one shared prefill pool and prefix cache, cache-aware routing) at equal
  device count: p95 latency, throughput and prefix hit rate as concurrency grows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

from jaxsun.serving import metrics
from jaxsun.serving.sim.stepmodel import Calibration
from jaxsun.serving.sim.validate import base_model, engine_models
from jaxsun.serving.system import DeploymentConfig
from jaxsun.serving.workload import LengthDist, WorkloadSpec, make_workload

PAPERS = {
    "sun": {"throughput_per_gpu_vs_conventional": "up to 2.0x", "tpot": "within 5%",
            "source": "SUN (arXiv 2603.02599) abstract"},
    "qsun": {"speedup_vs_sun": "45% (TPOT up to 45% lower)",
             "source": "SUN abstract; secondary summaries"},
    "prefillshare": {"p95_latency": "4.5x lower", "throughput": "3.9x higher",
                     "prefix_hit_rate_high_concurrency": "~89% (baseline collapses beyond "
                     "~40 sessions)", "source": "PrefillShare (arXiv 2602.12029) abstract; "
                     "secondary summaries"},
}


# ----------------------------------------------------------------------------- backends


@dataclasses.dataclass
class Backend:
  """Where a study's runs happen.

  Attributes:
    kind: "engine" (the real ServingSystem on this machine) or "sim".
    calibration: the simulator's step-time model (sim).
    model: the simulated architecture, a `ModelConfig` preset name (sim).
    layout: what a simulated decode step reads: "paged" or "static" (sim).
    transport: the calibration's KV transport (sim).
    base: the engine's base model spec (engine).
    decode_variant: the shared decode tree's format for QSUN: a calibration module
      variant (sim, e.g. "int4") or a quantizer (engine, "codebook:m1v4g128").
  """

  kind: str
  calibration: Calibration | None = None
  model: str = "llama-3.1-8b"
  layout: str = "paged"
  transport: str = "rdma"
  base: str = "shipped:llama_bytes"
  decode_variant: str = ""
  _models: dict = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    if self.kind not in ("engine", "sim"):
      raise ValueError(f"Backend.kind={self.kind!r} must be 'engine' or 'sim'")
    if self.kind == "sim" and self.calibration is None:
      raise ValueError("Backend(kind='sim') needs a calibration")

  @property
  def name(self) -> str:
    return "engine" if self.kind == "engine" else f"sim:{self.calibration.name}"

  def cfg(self):
    from jaxsun.config import ModelConfig  # pylint: disable=import-outside-toplevel
    if self.kind == "sim":
      return ModelConfig.preset(self.model)
    return base_model(self.base).cfg

  def models(self, kinds: Mapping[str, str]) -> dict:
    """Task models of `kinds` (model -> sun / prefillshare / full / base)."""
    key = tuple(sorted(kinds.items()))
    if key not in self._models:
      self._models[key] = (self._sim_models(kinds) if self.kind == "sim"
                           else self._engine_models(kinds))
    return self._models[key]

  def _sim_models(self, kinds):
    from jaxsun.serving.sim.published import weight_bytes  # pylint: disable=import-outside-toplevel
    from jaxsun.serving.sim.system import sim_models  # pylint: disable=import-outside-toplevel

    cfg = self.cfg()
    kw = {}
    if self.decode_variant:
      kw = dict(decode_variant=self.decode_variant,
                decode_weight_bytes=weight_bytes(cfg, self.decode_variant))
    return sim_models(cfg, kinds, weight_bytes=weight_bytes(cfg, "bf16"), **kw)

  def _engine_models(self, kinds):
    models = engine_models(kinds, self.base)
    if self.decode_variant:
      models = quantize_shared_decode(models, self.decode_variant, base_model(self.base))
    return models

  def run(self, deployment: DeploymentConfig, kinds: Mapping[str, str], items,
          slo: Mapping[str, float]) -> dict[str, Any]:
    """One run: the summary (vLLM names) plus device counts and hit rate."""
    if self.kind == "sim":
      from jaxsun.serving.sim.system import SimSystem  # pylint: disable=import-outside-toplevel
      system = SimSystem(deployment, self.models(kinds), self.calibration,
                         layout=self.layout, transport=self.transport)
      result = system.run(items)
      records = result.records
    else:
      from jaxsun.serving.bench import run_workload  # pylint: disable=import-outside-toplevel
      from jaxsun.serving.system import ServingSystem  # pylint: disable=import-outside-toplevel
      system = ServingSystem(deployment, self.models(kinds), eos_id=None)
      try:
        system.warm_up()
        result = run_workload(system, items)
        server = {r.request_id: r for r in system.records}
        records = [server.get(r.request_id, r) for r in result.records]
      finally:
        system.shutdown(drain=False)
    n_dev = len(system.prefill_workers) + len(system.decode_workers)
    s = metrics.summarize(records, max(result.duration_s, 1e-9), slo=slo, n_devices=n_dev)
    keep = ("completed", "rejected", "failed", "request_throughput", "output_throughput",
            "request_goodput", "throughput_per_device", "goodput_per_device",
            "prefix_hit_rate", "good_requests", "num_requests", "duration")
    out = {k: s[k] for k in keep}
    for m in ("ttft_ms", "tpot_ms", "e2el_ms"):
      for q in ("median", "p90", "p95", "p99", "mean"):
        out[f"{q}_{m}"] = s[f"{q}_{m}"]
    out["n_devices"] = n_dev
    out["attainment"] = (s["good_requests"] / len(records)) if records else 0.0
    return out


def quantize_shared_decode(models: Mapping, variant: str, base) -> dict:
  """The task models with their shared (base) decode tree replaced by a quantized one.

  `variant` is "codebook:<format>" (`jaxsun.quant.layers.quantize_model`, e.g.
  "codebook:m1v4g128": 8-bit codes over 4 weights, 2 bits per weight plus scales).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from jaxsun.quant.layers import quantize_model  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.engine import Params, tree_fingerprint  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.system import TaskTrees  # pylint: disable=import-outside-toplevel
  from pallas_kernels.psumbook_gemm import CodebookFormat  # pylint: disable=import-outside-toplevel

  kind, _, fmt = variant.partition(":")
  if kind != "codebook" or not fmt:
    raise ValueError(f"decode_variant={variant!r}: the engine quantizes with "
                     "'codebook:<format>', e.g. 'codebook:m1v4g128'")
  model = nnx.merge(base.graphdef, base.prefill)
  calib = jax.numpy.asarray(np.random.default_rng(0).integers(1, base.cfg.vocab_size,
                                                               (4, 64)), jax.numpy.int32)
  qmodel, _ = quantize_model(model, calib, pattern=r"layers/\d+/(attn|mlp)/.*",
                             fmt=CodebookFormat.parse(fmt))
  gd, state = nnx.split(qmodel)
  from jaxsun.split import SplitModel  # pylint: disable=import-outside-toplevel
  qsplit = SplitModel(graphdef=gd, prefill=state, last_prompt_token=base.last_prompt_token)
  qparams = Params(tree_fingerprint(state), qsplit, variant=variant.replace(":", "-"))
  base_id = Params.decode_of(base).tree_id
  out = {}
  for m, split in models.items():
    dec = Params.decode_of(split)
    if dec.tree_id != base_id:
      raise ValueError(f"model {m!r} does not decode with the base tree: QSUN quantizes the "
                       "shared decode module of SUN models")
    out[m] = TaskTrees(Params.prefill_of(split), qparams)
  return out


# ----------------------------------------------------------------------------- helpers


def mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
  vals = [v for v in values if v is not None and not math.isnan(v)]
  if not vals:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(statistics.fmean(vals)),
          "std": float(statistics.pstdev(vals)) if len(vals) > 1 else 0.0, "n": len(vals)}


def max_rate_under_slo(run_at: Callable[[float], Mapping], *, lo: float, hi: float,
                       attainment: float = 0.9, iters: int = 7) -> tuple[float, dict]:
  """The highest rate whose run meets the SLO for `attainment` of its requests
  (DistServe's goodput search): bisection in log space between lo and hi.

  Returns:
    (rate, that run's summary); rate 0 and the `lo` run when even `lo` misses.
  """
  best, best_run = 0.0, None
  lo_run = run_at(lo)
  if lo_run["attainment"] < attainment:
    return 0.0, lo_run
  best, best_run = lo, lo_run
  hi_run = run_at(hi)
  if hi_run["attainment"] >= attainment:
    return hi, hi_run
  for _ in range(iters):
    mid = math.sqrt(lo * hi)
    r = run_at(mid)
    if r["attainment"] >= attainment:
      lo, best, best_run = mid, mid, r
    else:
      hi = mid
  return best, best_run


# ----------------------------------------------------------------------------- SUN


@dataclasses.dataclass(frozen=True)
class SunStudy:
  """SUN vs conventional disaggregation (see the module doc).

  Attributes:
    n_models: task models (>= 4 in the committed runs).
    skews: Zipf exponents of model popularity swept.
    seeds: traces per point.
    num_requests: requests per run.
    prompt_len, output_len: request lengths.
    slots, capacity, chunk: engine shape per decode worker.
    slo: TTFT / TPOT targets in ms.
    equal_load_fraction: TPOT at equal load is measured at this fraction of the
      conventional deployment's saturation rate.
    search_iters: bisection steps of the SLO-throughput search.
  """

  n_models: int = 4
  skews: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
  seeds: int = 3
  num_requests: int = 400
  prompt_len: LengthDist | int = dataclasses.field(
      default_factory=lambda: LengthDist.uniform(256, 1024))
  output_len: LengthDist | int = dataclasses.field(
      default_factory=lambda: LengthDist.uniform(128, 512))
  slots: int = 128
  capacity: int = 2048
  chunk: int = 8
  slo: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"ttft_ms": 2000.0, "tpot_ms": 40.0})
  equal_load_fraction: float = 0.6
  search_iters: int = 6
  prefix_cache_mb: float = 0.0


def _names(n: int) -> tuple[str, ...]:
  base = ("math", "code", "tools", "chat", "sql", "legal", "med", "summ")
  return tuple(base[i] if i < len(base) else f"task{i}" for i in range(n))


def sun_deployments(st: SunStudy) -> dict[str, tuple[DeploymentConfig, str]]:
  """name -> (deployment, task model kind) at equal device count (and SUN with half the
  decode workers)."""
  n = st.n_models
  common = dict(slots=st.slots, capacity=st.capacity, chunk=st.chunk, max_queue=1 << 16,
                max_inflight=1 << 20, prefix_cache_mb=st.prefix_cache_mb,
                decode_policy="least_loaded", prefill_policy="least_loaded")
  return {
      "conventional": (DeploymentConfig(kind="conventional", prefill_workers=1,
                                        decode_workers=1, **common), "full"),
      "sun": (DeploymentConfig(kind="sun", prefill_workers=1, decode_workers=n, **common),
              "sun"),
      "sun_half_decode": (DeploymentConfig(kind="sun", prefill_workers=1,
                                           decode_workers=max(1, n // 2), **common), "sun"),
  }


def _spec(st, models, skew, seed, rate):
  return WorkloadSpec(models=models, num_requests=st.num_requests, rate=rate, zipf_s=skew,
                      prompt_len=st.prompt_len, output_len=st.output_len,
                      vocab=(1, 250), seed=seed, max_context_len=st.capacity)


def sun_study(backend: Backend, st: SunStudy = SunStudy(), *,
              deployments: Sequence[str] | None = None, progress: bool = True) -> dict:
  """Runs the SUN study; returns its JSON-able result."""
  models = _names(st.n_models)
  deps = sun_deployments(st)
  names = list(deps) if deployments is None else list(deployments)
  out = {"study": "sun", "backend": backend.name, "params": _params(st),
         "deployments": {k: dataclasses.asdict(deps[k][0]) for k in names},
         "papers": PAPERS["sun"], "points": []}
  t0 = time.perf_counter()
  for skew in st.skews:
    point = {"skew": skew, "by_deployment": {}}
    for seed in range(st.seeds):
      # Saturation of the baseline sets the search range and the equal load.
      dep0, kind0 = deps["conventional"]
      kinds0 = {m: kind0 for m in models}
      sat = backend.run(dep0, kinds0, make_workload(_spec(st, models, skew, seed, math.inf)),
                        st.slo)["request_throughput"]
      for name in names:
        dep, kind = deps[name]
        kinds = {m: kind for m in models}

        def run_at(rate, dep=dep, kinds=kinds, seed=seed):
          return backend.run(dep, kinds, make_workload(_spec(st, models, skew, seed, rate)),
                             st.slo)

        # Past its own saturation a finite trace only queues: search below 1.2x of it.
        own = sat if name == "conventional" else run_at(math.inf)["request_throughput"]
        rate, best = max_rate_under_slo(run_at, lo=0.1 * own, hi=1.2 * own,
                                        iters=st.search_iters)
        equal = run_at(st.equal_load_fraction * sat)
        rec = point["by_deployment"].setdefault(name, {"runs": []})
        rec["runs"].append({"seed": seed, "baseline_saturation_req_s": sat,
                            "slo_rate_req_s": rate,
                            "slo_rate_per_device": rate / best["n_devices"],
                            "n_devices": best["n_devices"],
                            "equal_load": {k: equal[k] for k in (
                                "median_tpot_ms", "p90_tpot_ms", "median_ttft_ms",
                                "p90_ttft_ms", "output_throughput", "attainment")}})
    for name, rec in point["by_deployment"].items():
      rec["slo_rate_per_device"] = mean_std([r["slo_rate_per_device"] for r in rec["runs"]])
      for k in ("median_tpot_ms", "p90_tpot_ms", "median_ttft_ms"):
        rec[f"equal_load_{k}"] = mean_std([r["equal_load"][k] for r in rec["runs"]])
    base_rate = point["by_deployment"].get("conventional", {}).get("slo_rate_per_device")
    for name, rec in point["by_deployment"].items():
      if base_rate and base_rate["mean"]:
        rec["per_device_vs_conventional"] = _ratio(rec["runs"],
                                                   point["by_deployment"]["conventional"]["runs"],
                                                   "slo_rate_per_device")
        rec["equal_load_tpot_vs_conventional"] = _ratio(
            rec["runs"], point["by_deployment"]["conventional"]["runs"],
            ("equal_load", "median_tpot_ms"))
    out["points"].append(point)
    if progress:
      print(f"[sun/{backend.name}] skew {skew}: " + ", ".join(
          f"{n} {r['slo_rate_per_device']['mean']:.3g} req/s/dev" for n, r in
          point["by_deployment"].items()) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
  out["wall_s"] = time.perf_counter() - t0
  return out


def _get(run, key):
  if isinstance(key, tuple):
    for k in key:
      run = run[k]
    return run
  return run[key]


def _ratio(runs, base_runs, key) -> dict:
  """Per-seed ratio run/base (same seed), mean ± std over seeds."""
  by_seed = {r["seed"]: _get(r, key) for r in base_runs}
  vals = []
  for r in runs:
    b = by_seed.get(r["seed"])
    v = _get(r, key)
    if b and v is not None:
      vals.append(v / b)
  return mean_std(vals)


def _params(st) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(st), default=str))


# ----------------------------------------------------------------------------- QSUN


def qsun_study(backend: Backend, quantized: Backend, st: SunStudy = SunStudy(), *,
               skew: float = 1.0, progress: bool = True) -> dict:
  """SUN with a full-precision vs a low-bit shared decode module (same deployment)."""
  models = _names(st.n_models)
  dep, kind = sun_deployments(st)["sun"]
  kinds = {m: kind for m in models}
  out = {"study": "qsun", "backend": backend.name, "quantized": quantized.decode_variant,
         "params": _params(st), "skew": skew, "deployment": dataclasses.asdict(dep),
         "papers": PAPERS["qsun"], "by_variant": {}}
  t0 = time.perf_counter()
  for label, b in (("sun", backend), ("qsun", quantized)):
    runs = []
    for seed in range(st.seeds):
      sat_run = b.run(dep, kinds, make_workload(_spec(st, models, skew, seed, math.inf)),
                      st.slo)

      def run_at(rate, b=b, seed=seed):
        return b.run(dep, kinds, make_workload(_spec(st, models, skew, seed, rate)), st.slo)

      rate, _ = max_rate_under_slo(run_at, lo=0.1 * sat_run["request_throughput"],
                                   hi=1.2 * sat_run["request_throughput"],
                                   iters=st.search_iters)
      runs.append({"seed": seed, "saturation_output_tok_s": sat_run["output_throughput"],
                   "saturation_median_tpot_ms": sat_run["median_tpot_ms"],
                   "slo_rate_req_s": rate})
    out["by_variant"][label] = {
        "runs": runs,
        "saturation_output_tok_s": mean_std([r["saturation_output_tok_s"] for r in runs]),
        "saturation_median_tpot_ms": mean_std([r["saturation_median_tpot_ms"] for r in runs]),
        "slo_rate_req_s": mean_std([r["slo_rate_req_s"] for r in runs])}
  q, f = out["by_variant"]["qsun"]["runs"], out["by_variant"]["sun"]["runs"]
  out["qsun_vs_sun"] = {k: _ratio(q, f, k) for k in ("saturation_output_tok_s",
                                                      "saturation_median_tpot_ms",
                                                      "slo_rate_req_s")}
  out["wall_s"] = time.perf_counter() - t0
  if progress:
    print(f"[qsun/{backend.name}] " + json.dumps({k: v["mean"] for k, v in
                                                  out["qsun_vs_sun"].items()}), flush=True)
  return out


def decode_step_times(backend: Backend, variants: Sequence[str], *, batch: int,
                      context: int, steps: int) -> dict[str, float]:
  """Seconds of one decode chunk per module variant: modelled (sim) from the calibration."""
  from jaxsun.serving.sim.published import weight_bytes  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.engine import decode_work  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.sim.stepmodel import StepFeatures  # pylint: disable=import-outside-toplevel

  cfg = backend.cfg()
  out = {}
  for v in variants:
    work = decode_work(steps, batch * steps, 0, weight_bytes(cfg, v or "bf16"))
    work["kv_tokens"] = float(steps * batch * context)
    out[v or "bf16"] = backend.calibration.predict("decode" + (f":{v}" if v else ""),
                                                   StepFeatures(**work))
  return out


def measure_decode_chunks(backend: Backend, st: SunStudy, *, repeats: int = 15) -> dict:
  """The engine's measured decode chunk time (ms, median of `repeats`) for the shared
  decode tree in full precision and in `backend.decode_variant`, every slot live."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.engine import Engine, Params  # pylint: disable=import-outside-toplevel
  from jaxsun.serving.request import SamplingParams  # pylint: disable=import-outside-toplevel

  base = base_model(backend.base)
  engine = Engine(base.cfg, slots=st.slots, capacity=st.capacity, chunk=st.chunk)
  pre = Params.prefill_of(base)
  trees = {"full": Params.decode_of(base)}
  if backend.decode_variant:
    q = quantize_shared_decode({"m": base}, backend.decode_variant, base)["m"].decode
    trees[q.variant] = q
  rng = np.random.default_rng(0)
  out = {}
  for name, tree in trees.items():
    times = []
    for r in range(repeats + 1):
      state = engine.init_decode_state()
      for slot in range(st.slots):
        prefix, _ = engine.prefill(pre, tuple(int(t) for t in rng.integers(1, 250, 64)))
        state = engine.insert(prefix, state, slot, valid_producers={pre.tree_id},
                              sampling=SamplingParams(max_tokens=st.chunk + 1,
                                                      ignore_eos=True))
      t0 = time.perf_counter()
      state, chunk = engine.generate(tree, state, max_live_length=64)
      engine.fetch(chunk)
      if r:  # the first call compiles
        times.append(time.perf_counter() - t0)
    out[name] = 1e3 * float(np.median(times))
  return out


# ----------------------------------------------------------------------------- PrefillShare


@dataclasses.dataclass(frozen=True)
class PrefillShareStudy:
  """Per-model prefill vs PrefillShare on multi-agent sessions (see the module doc).

  Attributes:
    n_models: task models (agents) taking turns.
    concurrency: concurrent sessions swept (closed loop: a session's next turn is sent
      when its previous one ends).
    seeds: traces per point.
    turns: turns per session.
    context_len: the initial shared context.
    output_len, observation_len: each turn's output and the tool result appended.
    slots, capacity, chunk: engine shape.
    prefix_cache_mb: prefix-cache budget per prefill worker.
    prefill_workers: per model (baseline) = total shared pool / n_models (PrefillShare).
  """

  n_models: int = 4
  concurrency: tuple[int, ...] = (8, 16, 32, 64, 128)
  seeds: int = 3
  turns: int = 6
  context_len: LengthDist | int = dataclasses.field(
      default_factory=lambda: LengthDist.uniform(1024, 2048))
  output_len: LengthDist | int = dataclasses.field(
      default_factory=lambda: LengthDist.uniform(64, 192))
  observation_len: LengthDist | int = dataclasses.field(
      default_factory=lambda: LengthDist.uniform(64, 256))
  slots: int = 128
  capacity: int = 8192
  chunk: int = 8
  prefix_cache_mb: float = 8192.0
  prefill_workers: int = 1
  prefix_block: int = 16


def prefillshare_deployments(st: PrefillShareStudy) -> dict[str, tuple[DeploymentConfig, str]]:
  common = dict(slots=st.slots, capacity=st.capacity, chunk=st.chunk, max_queue=1 << 16,
                max_inflight=1 << 20, prefix_cache_mb=st.prefix_cache_mb,
                prefix_block=st.prefix_block, decode_policy="least_loaded")
  return {
      "per_model_prefill": (DeploymentConfig(kind="conventional",
                                             prefill_workers=st.prefill_workers,
                                             decode_workers=1, prefill_policy="cache_aware",
                                             **common), "full"),
      "prefillshare": (DeploymentConfig(kind="prefillshare",
                                        prefill_workers=st.prefill_workers * st.n_models,
                                        decode_workers=1, prefill_policy="cache_aware",
                                        **common), "prefillshare"),
  }


def prefillshare_study(backend: Backend, st: PrefillShareStudy = PrefillShareStudy(), *,
                       progress: bool = True) -> dict:
  """Runs the PrefillShare study; returns its JSON-able result."""
  models = _names(st.n_models)
  deps = prefillshare_deployments(st)
  out = {"study": "prefillshare", "backend": backend.name, "params": _params(st),
         "deployments": {k: dataclasses.asdict(v[0]) for k, v in deps.items()},
         "papers": PAPERS["prefillshare"], "points": []}
  t0 = time.perf_counter()
  for conc in st.concurrency:
    point = {"concurrency": conc, "by_deployment": {}}
    for name, (dep, kind) in deps.items():
      runs = []
      for seed in range(st.seeds):
        spec = WorkloadSpec(models=models, kind="sessions", num_sessions=conc,
                            turns=st.turns, rate=math.inf, prompt_len=st.context_len,
                            output_len=st.output_len, observation_len=st.observation_len,
                            vocab=(1, 250), seed=seed, max_context_len=st.capacity)
        r = backend.run(dep, {m: kind for m in models}, make_workload(spec), slo={})
        runs.append({"seed": seed, **{k: r[k] for k in (
            "p95_e2el_ms", "median_e2el_ms", "p95_ttft_ms", "median_ttft_ms",
            "request_throughput", "output_throughput", "prefix_hit_rate", "completed",
            "n_devices", "duration")}})
      rec = {"runs": runs}
      for k in ("p95_e2el_ms", "p95_ttft_ms", "request_throughput", "prefix_hit_rate"):
        rec[k] = mean_std([r[k] for r in runs])
      point["by_deployment"][name] = rec
    b, t = point["by_deployment"]["per_model_prefill"], point["by_deployment"]["prefillshare"]
    point["p95_latency_reduction"] = _ratio(b["runs"], t["runs"], "p95_e2el_ms")
    point["throughput_gain"] = _ratio(t["runs"], b["runs"], "request_throughput")
    out["points"].append(point)
    if progress:
      print(f"[prefillshare/{backend.name}] {conc} sessions: p95 "
            f"{b['p95_e2el_ms']['mean']:.0f} -> {t['p95_e2el_ms']['mean']:.0f} ms, "
            f"throughput x{point['throughput_gain']['mean']:.2f}, hit rate "
            f"{b['prefix_hit_rate']['mean']:.2f} -> {t['prefix_hit_rate']['mean']:.2f} "
            f"({time.perf_counter() - t0:.0f} s)", flush=True)
  out["wall_s"] = time.perf_counter() - t0
  return out


# ----------------------------------------------------------------------------- output


def write(result: Mapping, out_dir: str | pathlib.Path, stem: str, command: str) -> pathlib.Path:
  """`<stem>.json`, `<stem>.md` (with the command) and `<stem>.png` under out_dir."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  result = {**result, "command": command}
  metrics._write_atomic(out / f"{stem}.json",  # pylint: disable=protected-access
                        (json.dumps(result, indent=1, default=str) + "\n").encode())
  metrics._write_atomic(out / f"{stem}.md", markdown(result).encode())  # pylint: disable=protected-access
  plot(result, out / f"{stem}.png")
  return out / f"{stem}.json"


def _ms(d) -> str:
  if not d or d.get("mean") is None:
    return "n/a"
  return f"{d['mean']:.3g} ± {d['std']:.2g}"


def markdown(r: Mapping) -> str:
  lines = [f"# {r['study']} study ({r['backend']})", "", f"Command: `{r['command']}`", "",
           "Papers: " + "; ".join(f"{k}: {v}" for k, v in r["papers"].items()), ""]
  if r["study"] == "sun":
    names = list(r["deployments"])
    lines += ["| Zipf s | " + " | ".join(f"{n}: SLO req/s/device" for n in names) +
              " | SUN vs conv. per device | SUN-half vs conv. | TPOT@equal load SUN/conv. |",
              "|---" * (len(names) + 4) + "|"]
    for p in r["points"]:
      bd = p["by_deployment"]
      row = [f"{p['skew']:.1f}"] + [_ms(bd[n]["slo_rate_per_device"]) for n in names]
      row += [_ms(bd.get("sun", {}).get("per_device_vs_conventional")),
              _ms(bd.get("sun_half_decode", {}).get("per_device_vs_conventional")),
              _ms(bd.get("sun", {}).get("equal_load_tpot_vs_conventional"))]
      lines.append("| " + " | ".join(row) + " |")
  elif r["study"] == "qsun":
    lines += ["| variant | saturation output tok/s | saturation p50 TPOT ms | SLO req/s |",
              "|---|---|---|---|"]
    for k, v in r["by_variant"].items():
      lines.append(f"| {k} | {_ms(v['saturation_output_tok_s'])} | "
                   f"{_ms(v['saturation_median_tpot_ms'])} | {_ms(v['slo_rate_req_s'])} |")
    lines += ["", "QSUN / SUN: " + ", ".join(f"{k} {_ms(v)}" for k, v in
                                            r["qsun_vs_sun"].items())]
    if "decode_step_ms" in r:
      lines += ["", "Modelled decode step times (ms, 1k-token contexts): " +
                json.dumps(r["decode_step_ms"])]
    if "decode_chunk_ms_measured" in r:
      lines += ["", "Measured decode chunk times on this machine (ms, every slot live, "
                "median): " + json.dumps(r["decode_chunk_ms_measured"])]
  else:
    lines += ["| sessions | per-model p95 ms | PrefillShare p95 ms | p95 reduction | "
              "throughput gain | hit rate per-model | hit rate PrefillShare |",
              "|---|---|---|---|---|---|---|"]
    for p in r["points"]:
      b, t = p["by_deployment"]["per_model_prefill"], p["by_deployment"]["prefillshare"]
      lines.append(f"| {p['concurrency']} | {_ms(b['p95_e2el_ms'])} | {_ms(t['p95_e2el_ms'])} | "
                   f"{_ms(p['p95_latency_reduction'])} | {_ms(p['throughput_gain'])} | "
                   f"{_ms(b['prefix_hit_rate'])} | {_ms(t['prefix_hit_rate'])} |")
  lines += ["", "Every cell: mean ± std over seeds (ratios per seed, then averaged)."]
  return "\n".join(lines) + "\n"


def plot(r: Mapping, path: pathlib.Path) -> None:
  import io  # pylint: disable=import-outside-toplevel
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 3 if r["study"] == "prefillshare" else 2, figsize=(13, 3.8))
  if r["study"] == "sun":
    xs = [p["skew"] for p in r["points"]]
    for n in r["deployments"]:
      m = [p["by_deployment"][n]["slo_rate_per_device"] for p in r["points"]]
      axes[0].errorbar(xs, [v["mean"] for v in m], [v["std"] for v in m], marker="o", label=n)
      t = [p["by_deployment"][n]["equal_load_median_tpot_ms"] for p in r["points"]]
      axes[1].errorbar(xs, [v["mean"] for v in t], [v["std"] for v in t], marker="o", label=n)
    axes[0].set_ylabel("req/s per device within SLO")
    axes[1].set_ylabel("p50 TPOT at equal load (ms)")
    for a in axes:
      a.set_xlabel("Zipf exponent of model popularity")
      a.legend(fontsize=8)
  elif r["study"] == "qsun":
    labels = list(r["by_variant"])
    for a, key, name in ((axes[0], "saturation_output_tok_s", "output tok/s at saturation"),
                         (axes[1], "saturation_median_tpot_ms", "p50 TPOT at saturation (ms)")):
      vals = [r["by_variant"][k][key] for k in labels]
      a.bar(labels, [v["mean"] for v in vals], yerr=[v["std"] for v in vals])
      a.set_ylabel(name)
  else:
    xs = [p["concurrency"] for p in r["points"]]
    for n in ("per_model_prefill", "prefillshare"):
      for a, key in zip(axes, ("p95_e2el_ms", "request_throughput", "prefix_hit_rate")):
        v = [p["by_deployment"][n][key] for p in r["points"]]
        a.errorbar(xs, [x["mean"] for x in v], [x["std"] for x in v], marker="o", label=n)
        a.set_xlabel("concurrent sessions")
        a.set_ylabel(key)
        a.set_xscale("log", base=2)
        a.legend(fontsize=8)
  fig.suptitle(f"{r['study']} ({r['backend']})")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  metrics._write_atomic(path, buf.getvalue())  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- the command


def backend_from_config(c) -> Backend:
  """The Backend a `configs/serving.py:study_*` config describes."""
  cal = Calibration.load(c.calibration) if c.backend == "sim" else None
  return Backend(kind=c.backend, calibration=cal, model=c.model, layout=c.layout,
                 transport=c.transport, base=c.base)


def run_config(c, command: str) -> pathlib.Path:
  """Runs the study of a `study_*` config and writes its results (JSON, Markdown, PNG)."""
  from jaxsun.serving.workload import LengthDist as LD  # pylint: disable=import-outside-toplevel

  backend = backend_from_config(c)
  params = dict(c.params)
  for k in ("prompt_len", "output_len", "context_len", "observation_len"):
    if k in params and not isinstance(params[k], int):
      lo, hi = params[k]
      params[k] = LD.uniform(int(lo), int(hi))
  for k in ("skews", "concurrency"):
    if k in params:
      params[k] = tuple(params[k])
  if "slo" in params:
    params["slo"] = dict(params["slo"])
  if c.name == "sun":
    result = sun_study(backend, SunStudy(**params))
  elif c.name == "qsun":
    quantized = dataclasses.replace(backend, decode_variant=c.decode_variant, _models={})
    result = qsun_study(backend, quantized, SunStudy(**params))
    if backend.kind == "engine":
      result["decode_chunk_ms_measured"] = measure_decode_chunks(
          quantized, SunStudy(**params))
    if backend.kind == "sim":
      result["decode_step_ms"] = {
          f"batch {b}": {k: 1e3 * v for k, v in decode_step_times(
              backend, ["", c.decode_variant], batch=b, context=1024, steps=1).items()}
          for b in (1, 32, 128)}
  elif c.name == "prefillshare":
    result = prefillshare_study(backend, PrefillShareStudy(**params))
  else:
    raise ValueError(f"config.study.name={c.name!r} is not one of sun, qsun, prefillshare")
  return write(result, c.out, c.stem, command)


def main(argv) -> None:
  import sys  # pylint: disable=import-outside-toplevel
  del argv
  path = run_config(_CONFIG.value.study, "python -m jaxsun.serving.sim.studies " +
                    " ".join(sys.argv[1:]))
  print(f"wrote {path}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/serving.py:study_*",
                                            lock_config=True)
  app.run(main)
