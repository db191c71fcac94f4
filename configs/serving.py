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
  if variant.startswith("tiny"):
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
                     "tiny_conventional, tiny_colocated")
  c.lock()
  return c
