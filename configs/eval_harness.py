r"""lm-evaluation-harness on a checkpoint, offline, through the prefill/decode split.

    python -m experiments.launch --config=configs/eval_harness.py:tiny --workdir=/tmp/ev
    python -m experiments.launch --config=configs/eval_harness.py --workdir=/tmp/ev \
        --config.checkpoint=/models/Llama-3.2-1B \
        --config.tokenizer=file:/models/Llama-3.2-1B/tokenizer.json

What it does (`jaxsun.jobs.eval_harness`): imports the checkpoint (Hugging Face layout, or
a SUN / PrefillShare task model from `jaxsun.interop.save_hf_split`), wraps it in
`jaxsun.eval.harness.JaxsunLM` and runs `lm_eval.simple_evaluate` on the shipped tasks
(`jaxsun/eval/harness_tasks`: multiple choice, generation, rolling perplexity; local
JSONL, no download) or your own (`--config.include_path`).

Variants:
  * `:tiny`: the shipped random byte-vocabulary Llama (jaxsun/data/files/checkpoints/
    llama_bytes, written by transformers), 32 items per shipped task. A random model scores at
    chance or worse: measured byte perplexity 471.5 (a uniform model would give 259), in
    about 10 s on 2 CPU cores (limit 32).
  * default: every item; `config.checkpoint` and `config.tokenizer` must be given.
"""

import ml_collections

from jaxsun.data import paths
from jaxsun.eval.harness_tasks import SHIPPED_TASKS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "eval_harness"
  c.checkpoint = ""  # a Hugging Face or save_hf_split directory
  c.tokenizer = ""  # "byte", "bpe4k", "gpt2" or "file:<tokenizer.json>"
  c.param_dtype = ""  # "" = the checkpoint's storage dtype
  c.tasks = SHIPPED_TASKS
  c.include_path = ""  # a directory of your own lm-eval task YAMLs
  c.limit = 0  # items per task; 0 = all
  c.num_fewshot = -1  # -1 = the task's default
  c.batch_size = 8
  c.max_length = 0  # 0 = the model's max_len
  c.seed = 0
  if arg == "tiny":
    c.checkpoint = str(paths.data_root() / "checkpoints" / "llama_bytes")
    c.tokenizer = "byte"
    c.limit = 32
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} of configs/eval_harness.py (use :tiny)")
  c.lock()
  return c
