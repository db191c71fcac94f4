"""Jobs: the importable logic behind `experiments/launch.py`, also called by notebooks.

A job is `run(config, workdir) -> dict`; the config's `job` field names it:

    from jaxsun import jobs
    results = jobs.run(configs.quickstart.get_config("smoke"), "/tmp/qs")
"""

from __future__ import annotations

import importlib
import os

# name -> "module:function", imported on use (the data stack is optional).
JOBS = {
    "quickstart": "jaxsun.jobs.quickstart:run",
    "lm": "jaxsun.jobs.lm:run",
    "codebook_quant": "jaxsun.jobs.codebook_quant:run",
    "finetune_split": "jaxsun.jobs.finetune_split:run",
    "eval_harness": "jaxsun.jobs.eval_harness:run",
    "pretrain_attention": "jaxsun.jobs.pretrain_attention:run",
    "qsun": "jaxsun.jobs.qsun:run",
    "ptq": "jaxsun.jobs.ptq:run",
    "fp8_inference": "jaxsun.jobs.fp8_inference:run",
    "precision_stability": "jaxsun.jobs.precision_stability:run",
}


def get_job(name: str):
  """The `run(config, workdir)` function of job `name`."""
  if name not in JOBS:
    raise ValueError(f"unknown job {name!r} (config key `job`); available: {sorted(JOBS)}")
  module, fn = JOBS[name].split(":")
  return getattr(importlib.import_module(module), fn)


def run(config, workdir: str | os.PathLike) -> dict:
  """Runs the job named by `config.job` with `config` in `workdir`."""
  if "job" not in config:
    raise ValueError("the config has no `job` key naming what to run; available: "
                     f"{sorted(JOBS)}")
  return get_job(config.job)(config, workdir)
