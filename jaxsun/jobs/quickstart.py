"""The main job: pretrain a tiny base LM, fine-tune it per task in four regimes, evaluate.

    python -m experiments.launch --config=configs/quickstart.py --workdir=/tmp/qs

1. Pretrain a base decoder (tied trees) on the shipped Shakespeare corpus mixed with
   task-formatted text (the tasks' train splits as "Q: ...\\nA: ..." documents).
2. For each task and regime (`full`, `prefill` = SUN, `decode` = PrefillShare, `none`;
   see `jaxsun.jobs.finetune`), fine-tune a task model from the base on the task's train
   split with the loss on the answer tokens only.
3. Score exact match by greedy generation through the split on the task's test split
   (disjoint from train by prompt).

Writes into the workdir: `results.json`, `loss_curves.png`, metrics (`logs/*/metrics.jsonl`
and TensorBoard files), checkpoints (`checkpoints/*`, a rerun resumes from them), and
prints a table. Every piece is a function here, so notebooks can run them one by one.
"""

from __future__ import annotations

import os
import pathlib

import jax

import jaxsun
from jaxsun import data as data_lib
from jaxsun import lora
from jaxsun.jobs import common
from jaxsun.jobs import finetune as ft
from jaxsun.jobs import lm
from jaxsun.train import metrics as metrics_lib


def _enable_compilation_cache(config, workdir: pathlib.Path) -> None:
  """Identical steps (same shapes, another task) then compile once per machine."""
  path = config.get("compilation_cache_dir", "")
  if path == "none":
    return
  path = path or str(pathlib.Path.home() / ".cache" / "jaxsun" / "jax_compilation_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def check_config(config) -> None:
  """Fails early, naming the key, on names the run would only reject minutes later."""
  if not config.tasks:
    raise ValueError("config.tasks is empty")
  for t in config.tasks:
    if t not in data_lib.TASKS:
      raise ValueError(f"config.tasks: unknown task {t!r}; available: {list(data_lib.TASKS)}")
  for r in config.regimes:
    if r not in ft.REGIMES:
      raise ValueError(f"config.regimes: unknown regime {r!r}; available: "
                       f"{list(ft.REGIMES)}")
    for t in config.tasks:
      if r != "none":
        learning_rate(config, t, r)  # a missing entry is an error naming the key
  data_lib.get_tokenizer(config.tokenizer)  # unknown name -> clear error
  lora_config(config)


def learning_rate(config, task: str, regime: str) -> float:
  """`config.finetune.learning_rates[task][regime]`, else `...default[regime]`."""
  lrs = config.finetune.learning_rates
  for key in (task, "default"):
    if key in lrs and regime in lrs[key]:
      return float(lrs[key][regime])
  raise ValueError(f"config.finetune.learning_rates has no entry for regime {regime!r} "
                   f"(neither learning_rates.{task}.{regime} nor "
                   f"learning_rates.default.{regime})")


def lora_config(config):
  """The `jaxsun.lora.LoRAConfig` of `config.finetune.lora` (for the *_lora regimes)."""
  try:
    return lora.LoRAConfig(**common.to_dict(config.finetune.lora))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.finetune.lora: {e}") from None


def pretrain(config, model_cfg: jaxsun.ModelConfig, tokenizer, workdir: pathlib.Path,
             data_dir: str) -> tuple[jaxsun.SplitModel, dict]:
  """The base model: the corpus mixed with the tasks' train text (`jaxsun.jobs.lm`)."""
  pc = config.pretrain
  w = pc.task_text_weight
  sources = [pc.corpus] + list(config.tasks)
  weights = [1.0 - w] + [w / len(config.tasks)] * len(config.tasks)
  return lm.pretrain(pc, model_cfg, tokenizer, workdir, data_dir, sources=sources,
                     weights=weights, eval_source=pc.corpus, seed=config.seed,
                     identity={"model": common.to_dict(config.model),
                               "tokenizer": config.tokenizer, "tasks": list(config.tasks)})


def finetune_and_eval(config, base: jaxsun.SplitModel, task: str, regime: str, tokenizer,
                      workdir: pathlib.Path, data_dir: str) -> dict:
  """One task model: fine-tune `base` in `regime` on `task`, then score it on test."""
  fc, ec = config.finetune, config.eval
  seq_len = ft.task_seq_len(task, tokenizer, fc.seq_len)
  lr = 0.0 if regime == "none" else learning_rate(config, task, regime)
  name = f"finetune/{task}/{regime}"
  identity = {"finetune": common.to_dict(fc), "task": task, "regime": regime,
              "base": common.to_dict(config.pretrain), "model": common.to_dict(config.model),
              "tokenizer": config.tokenizer, "seed": config.seed}
  split, summary = ft.fit_task_model(
      base, task, regime, tokenizer, steps=fc.steps, batch_size=fc.batch_size,
      seq_len=seq_len, optimizer=ft.with_learning_rate(fc.optimizer, lr),
      lora_cfg=lora_config(config), seed=config.seed, workdir=workdir, name=name,
      identity=identity, data_dir=data_dir, log_every=fc.log_every,
      checkpoint_every=fc.checkpoint_every)
  ev = ft.evaluate_task_model(split, task, tokenizer, split_name="test",
                              items=ec.test_items, loss_items=ec.loss_items,
                              batch_size=ec.batch_size, seq_len=seq_len, data_dir=data_dir)
  summary.update(accuracy=ev["accuracy"], test_items=ev["items"], correct=ev["correct"],
                 test_loss=ev["loss"], examples=ev["examples"], seq_len=seq_len,
                 eval_time_s=ev["eval_time_s"])
  return summary


def plot_losses(workdir: pathlib.Path, config) -> pathlib.Path:
  """`loss_curves.png`: pretraining (train and validation), then each task's regimes."""
  logs = workdir / "logs"
  panels = {"pretraining": {"train": lm.loss_series(logs / "pretrain"),
                            "validation": lm.loss_series(logs / "pretrain", "eval_loss")}}
  for task in config.tasks:
    trained = {regime: lm.loss_series(logs / "finetune" / task / regime)
               for regime in config.regimes if regime != "none"}
    if trained:
      panels[f"fine-tuning: {task}"] = trained
  return metrics_lib.plot_panels(panels, workdir / "loss_curves.png", ylabel="loss",
                                 logy=True)


def format_table(results: dict) -> str:
  """Task x regime tables: exact match (with the constant-answer baseline and each
  shared-module regime's ratio to full fine-tuning), then the answer-token loss."""
  tasks = results["tasks"]
  regimes = list(next(iter(tasks.values())))
  ratio_of = [r for r in regimes if r != "full" and r != "none" and "full" in regimes]
  cols = ["baseline"] + [c for r in regimes for c in ([r, f"{r}/full"] if r in ratio_of
                                                        else [r])]
  head = f"{'task':<24}" + "".join(f"{c:>14}" for c in cols)
  lines = ["exact match on the test split (greedy generation through the split; baseline: "
           "always the most common train answer)", head, "-" * len(head)]
  for task, by_regime in tasks.items():
    cells = [results["baselines"][task]["accuracy"]]
    for r in regimes:
      cells.append(by_regime[r]["accuracy"])
      if r in ratio_of:
        full = by_regime["full"]["accuracy"]
        cells.append(by_regime[r]["accuracy"] / full if full else float("nan"))
    lines.append(f"{task:<24}" + "".join(f"{c:>14.3f}" for c in cells))
  lines += ["", "answer-token loss on the test split (teacher forced)",
            f"{'task':<24}" + "".join(f"{r:>14}" for r in regimes)]
  lines.append("-" * len(lines[-1]))
  for task, by_regime in tasks.items():
    lines.append(f"{task:<24}" + "".join(f"{by_regime[r]['test_loss']:>14.3f}"
                                         for r in regimes))
  n = next(iter(next(iter(tasks.values())).values()))["test_items"]
  b = results["base"]
  lines += ["", f"({n} exact-match items per task; base validation loss "
            f"{b['validation_loss']:.3f}; {b['num_params']:,} parameters; wall time "
            f"{results['wall_time_s']:.0f} s)"]
  return "\n".join(lines)


def run(config, workdir: str | os.PathLike) -> dict:
  """Runs the whole job; writes results.json, loss_curves.png; returns the results."""
  sw = common.Stopwatch()
  workdir = common.prepare_workdir(workdir)
  check_config(config)
  _enable_compilation_cache(config, workdir)
  data_dir = config.data_dir or str(workdir / "tfds")
  tokenizer = data_lib.get_tokenizer(config.tokenizer)
  model_cfg = common.model_config(config.model, tokenizer.vocab_size, "quickstart")
  print(f"quickstart: {model_cfg.num_params():,}-parameter base model, tokenizer "
        f"{config.tokenizer!r}, tasks {list(config.tasks)}, regimes {list(config.regimes)}",
        flush=True)
  base, base_summary = pretrain(config, model_cfg, tokenizer, workdir, data_dir)
  print(f"base model: validation loss {base_summary['validation_loss']:.3f}", flush=True)
  per_task, baselines = {}, {}
  for task in config.tasks:
    per_task[task] = {}
    baselines[task] = ft.majority_baseline(task, "test", config.eval.test_items)
    for regime in config.regimes:
      res = finetune_and_eval(config, base, task, regime, tokenizer, workdir, data_dir)
      per_task[task][regime] = res
      print(f"  {task} / {regime}: accuracy {res['accuracy']:.3f} "
            f"({res['correct']}/{res['test_items']})", flush=True)
  png = plot_losses(workdir, config)
  results = {
      "job": "quickstart", "config": common.to_dict(config), "base": base_summary,
      "tasks": per_task, "baselines": baselines, "loss_curves": png.name,
      "wall_time_s": round(sw.elapsed(), 2), "jax": jax.__version__,
      "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
  }
  common.write_json_atomic(workdir / "results.json", results)
  print(format_table(results))
  print(f"results: {workdir / 'results.json'}; curves: {png}")
  return results
