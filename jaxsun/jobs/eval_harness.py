"""Evaluates a checkpoint with lm-evaluation-harness (offline), through the split.

    python -m experiments.launch --config=configs/eval_harness.py:tiny --workdir=/tmp/ev

The checkpoint is a Hugging Face directory (config.json + *.safetensors) or a split
exported by `jaxsun.interop.save_hf_split` (a SUN / PrefillShare task model: prefill/ and
decode/). Writes results.json (lm-eval's per-task metrics, the versions, the wall time).
"""

from __future__ import annotations

import os
import pathlib
import time

from jaxsun.jobs import common


def check_config(config) -> None:
  """Clear errors naming the config key, before anything is loaded."""
  if not config.checkpoint:
    raise ValueError("config.checkpoint is empty; give a Hugging Face checkpoint directory "
                     "(config.json + *.safetensors) or a jaxsun.interop.save_hf_split one")
  if not pathlib.Path(config.checkpoint).is_dir():
    raise FileNotFoundError(f"config.checkpoint={config.checkpoint!r} is not a directory")
  if not config.tokenizer:
    raise ValueError("config.tokenizer is empty; give a tokenizer name or "
                     "file:<path to tokenizer.json>")
  if not config.tasks:
    raise ValueError("config.tasks is empty")
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size={config.batch_size} must be >= 1")
  if config.limit < 0:
    raise ValueError(f"config.limit={config.limit} must be >= 0 (0: every item)")


def metrics_table(results: dict) -> str:
  """One line per (task, metric) of lm-eval's `results` section."""
  lines = [f"{'task':32s} {'metric':28s} {'value':>12s}", "-" * 74]
  for task, metrics in results.items():
    for key, value in metrics.items():
      if key in ("alias", "name", "sample_len") or "_stderr" in key:
        continue
      if isinstance(value, (int, float)):
        lines.append(f"{task:32s} {key:28s} {value:12.4f}")
  return "\n".join(lines)


def run(config, workdir) -> dict:
  """Loads the checkpoint, runs the tasks, writes and returns results.json's contents."""
  import lm_eval  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from jaxsun import interop  # pylint: disable=g-import-not-at-top
  from jaxsun.data import tokenizers  # pylint: disable=g-import-not-at-top
  from jaxsun.eval import harness  # pylint: disable=g-import-not-at-top

  check_config(config)
  workdir = common.prepare_workdir(workdir)
  start = time.time()
  tokenizer = tokenizers.get_tokenizer(config.tokenizer)
  split = interop.load_hf_split(config.checkpoint, param_dtype=config.param_dtype or None)
  if split.cfg.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"config.checkpoint has vocab_size={split.cfg.vocab_size}, smaller than "
                     f"config.tokenizer={config.tokenizer!r}'s {tokenizer.vocab_size}")
  lm = harness.JaxsunLM(split, tokenizer, batch_size=config.batch_size,
                        max_length=config.max_length or None)
  res = harness.evaluate(lm, list(config.tasks), limit=config.limit or None,
                         num_fewshot=config.num_fewshot if config.num_fewshot >= 0 else None,
                         include_path=config.include_path or None, seed=config.seed)
  out = {
      "checkpoint": os.path.abspath(config.checkpoint),
      "tied": split.tied,
      "model": {"num_params": split.cfg.num_params(), "vocab_size": split.cfg.vocab_size},
      "tasks": list(config.tasks),
      "limit": config.limit,
      "results": common.to_dict(res["results"]),
      "n_samples": common.to_dict(res.get("n-samples", {})),
      "versions": {"lm_eval": lm_eval.__version__, "jax": jax.__version__},
      "device": jax.devices()[0].device_kind,
      "wall_time_s": round(time.time() - start, 2),
      "config": common.to_dict(config),
  }
  common.write_json_atomic(workdir / "results.json", out)
  print(metrics_table(out["results"]))
  print(f"results: {workdir / 'results.json'} ({out['wall_time_s']} s)")
  return out
