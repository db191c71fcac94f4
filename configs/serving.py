r"""Serving deployments: SUN / PrefillShare task models behind the OpenAI-compatible API.

Launch:

    python -m jaxsun.serving --config=configs/serving.py:tiny --port=8000
    python -m jaxsun.serving --config=configs/serving.py:tiny_prefillshare --port=8000
    python -m jaxsun.serving --config=configs/serving.py --config.base=/path/to/hf/llama \
        --config.task_models.math=sun:/path/to/math_prefill_ckpt

then, from any OpenAI client:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="math", prompt="Q: 2+2?\nA:", max_tokens=8,
                              temperature=0)

Variants:
  * (default) "sun": the shipped byte-level llama checkpoint as the base, two SUN task
    models (random prefill trees: a demo of the machinery, not of quality) sharing one
    decode pool.
  * tiny: the same at small pools, for tests and laptops.
  * tiny_prefillshare: two PrefillShare task models on one shared prefill pool with
    prefix reuse, per-model decode pools.
  * tiny_conventional / tiny_colocated: the baselines for the same SUN task models.

Measured: the tests start `:tiny` with this command and query it with the openai client
(tests/test_serving_cli.py); figures of the engine are in
experiments/benchmarks/results/serving_*.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = "shipped:llama_bytes"  # HF dir, shipped:<name> or random:<preset>:<seed>
  # name -> "sun:<source>" | "prefillshare:<source>" | "full:<source>" | "split:<dir>" | "base"
  c.task_models = ml_collections.ConfigDict({"math": "sun:random:1", "code": "sun:random:2"})
  c.tokenizer = "byte"  # jaxsun.data.tokenizers name (the API encodes text with it)
  c.eos_id = 258  # -1: no EOS
  c.runtime = "local"  # "local" (a thread per worker) or "ray" (an actor per worker)
  c.chat_template = "default"  # "default" or "qa" ("Q: ...\nA:" as the tasks are trained)
  c.deployment = ml_collections.ConfigDict(dict(
      kind="sun",  # conventional | sun | prefillshare | colocated
      prefill_workers=1,  # per prefill pool
      decode_workers=1,  # per decode pool (colocated: per model)
      slots=16,  # decode rows per decode worker
      capacity=256,  # KV tokens per row: prompt + max_tokens
      chunk=16,  # decode steps per device call
      prefix_cache_mb=64.0,  # per prefill worker
      prefix_block=16,
      prefill_policy="least_loaded",
      decode_policy="least_loaded",
      max_queue=256,  # waiting requests per prefill worker before 429
      max_inflight=1024,  # requests in the system before 429
      max_retries=2,
      transfer="in_process",
      seed=0,
  ))
  variant = arg.strip()
  if variant.startswith("study_"):
    c.study = _study(variant)
  elif variant.startswith("tiny"):
    c.deployment.slots = 4
    c.deployment.capacity = 128
    c.deployment.chunk = 8
    c.deployment.max_inflight = 64
    kind = variant.partition("_")[2] or "sun"
    if kind == "prefillshare":
      c.task_models = ml_collections.ConfigDict({"planner": "prefillshare:random:3",
                                                 "critic": "prefillshare:random:4"})
      c.deployment.prefill_policy = "cache_aware"
    elif kind not in ("sun", "conventional", "colocated"):
      raise ValueError(f"unknown variant {arg!r}")
    c.deployment.kind = kind
  elif variant:
    raise ValueError(f"unknown variant {arg!r}; known: tiny, tiny_prefillshare, "
                     f"tiny_conventional, tiny_colocated, {', '.join(STUDIES)}")
  c.lock()
  return c


CAL = "experiments/results/serving/calibration"
STUDIES = tuple(f"study_{s}_{b}" for s in ("sun", "qsun", "prefillshare")
                for b in ("engine", "h100", "h200"))

# The engine on this machine: the shipped byte-level base, short requests.
_ENGINE = dict(
    sun=dict(n_models=4, skews=(0.0, 1.5), seeds=3, num_requests=120, prompt_len=(16, 64),
             output_len=(32, 160), slots=8, capacity=256, chunk=16,
             slo={"ttft_ms": 60.0, "tpot_ms": 2.0}, search_iters=3),
    prefillshare=dict(n_models=2, concurrency=(2, 4, 8, 16), seeds=3, turns=4,
                      context_len=(48, 96), output_len=(8, 24), observation_len=(8, 24),
                      slots=8, capacity=256, chunk=16, prefix_cache_mb=0.5,
                      prefix_block=16),
)
# An 8B-class model at cluster scale in the simulator.
_PAPER = dict(
    sun=dict(n_models=4, skews=(0.0, 0.5, 1.0, 1.5, 2.0), seeds=3, num_requests=800,
             prompt_len=(128, 512), output_len=(256, 1024), slots=128, capacity=2048,
             chunk=8, slo={"ttft_ms": 1000.0, "tpot_ms": 40.0}, search_iters=6),
    prefillshare=dict(n_models=4, concurrency=(8, 16, 32, 64, 128), seeds=3, turns=6,
                      context_len=(1024, 2048), output_len=(64, 192),
                      observation_len=(64, 256), slots=128, capacity=8192, chunk=8,
                      prefix_cache_mb=8192.0, prefix_block=16),
)


def _study(variant: str) -> ml_collections.ConfigDict:
  """`study_<sun|qsun|prefillshare>_<engine|h100|h200>` (`jaxsun.serving.sim.studies`).

  Launch: python -m jaxsun.serving.sim.studies --config=configs/serving.py:study_sun_h100
  Results: experiments/results/serving/<study>/<backend>.{json,md,png}.
  """
  if variant not in STUDIES:
    raise ValueError(f"unknown study variant {variant!r}; known: {', '.join(STUDIES)}")
  _, name, where = variant.split("_")
  s = ml_collections.ConfigDict()
  s.name = name
  s.backend = "engine" if where == "engine" else "sim"
  s.calibration = "" if where == "engine" else f"{CAL}/{where}_llama-3.1-8b_derived.json"
  s.model = "llama-3.1-8b"
  s.layout = "paged"
  s.transport = "rdma"
  s.base = "shipped:llama_bytes"
  s.decode_variant = "codebook:m1v4g64" if where == "engine" else "int4"
  params = (_ENGINE if where == "engine" else _PAPER)["prefillshare" if name == "prefillshare"
                                                     else "sun"]
  s.params = ml_collections.ConfigDict(params)
  if name == "qsun":  # one skew: the decode module is the variable
    for k in ("skews",):
      del s.params[k]
  s.out = f"experiments/results/serving/{name}"
  s.stem = where
  return s
