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
import time

import jax

import jaxsun
from jaxsun import data as data_lib
from jaxsun.jobs import common
from jaxsun.jobs import finetune as ft
from jaxsun.jobs import lm
from jaxsun.train import metrics as metrics_lib
from jaxsun.train.trainer import TrainConfig, evaluate_loss


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
  for t in config.tasks:
    if t not in data_lib.TASKS:
      raise ValueError(f"config.tasks: unknown task {t!r}; available: {list(data_lib.TASKS)}")
  for r in config.regimes:
    if r not in ft.REGIMES:
      raise ValueError(f"config.regimes: unknown regime {r!r}; available: "
                       f"{list(ft.REGIMES)}")
  if not config.tasks:
    raise ValueError("config.tasks is empty")
  data_lib.get_tokenizer(config.tokenizer)  # unknown name -> clear error


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
  """One task model: fine-tune `base` in `regime` on `task`, then exact match on test."""
  fc, ec = config.finetune, config.eval
  split, trainability = ft.regime_split(base, regime)
  t0 = time.perf_counter()
  summary = {"trainability": trainability, "last_prompt_token": split.last_prompt_token}
  if trainability != "none":
    batches = data_lib.task_batches(task, tokenizer, seq_len=fc.seq_len,
                                    batch_size=fc.batch_size, seed=config.seed,
                                    data_dir=data_dir)
    train_cfg = TrainConfig(steps=fc.steps, trainability=trainability,
                            optimizer=common.optimizer_config(fc.optimizer),
                            log_every=fc.log_every, checkpoint_every=fc.checkpoint_every,
                            seed=config.seed)
    name = f"finetune/{task}/{regime}"
    identity = {"finetune": common.to_dict(fc), "task": task, "regime": regime,
                "base": common.to_dict(config.pretrain), "model": common.to_dict(config.model),
                "tokenizer": config.tokenizer, "seed": config.seed}
    trainer, _ = ft.train_run(split, train_cfg, batches, workdir=workdir, name=name,
                              identity=identity)
    split = trainer.split
    losses = lm.loss_series(workdir / "logs" / name)
    summary.update(final_train_loss=losses[-1][1] if losses else None,
                   trainable_params=trainer.num_trainable_params(),
                   dropped_train_examples=batches.num_dropped)
    # The shared tree must come out bitwise as it went in (it is every task's tree).
    shared = {"prefill": "decode", "decode": "prefill"}.get(trainability)
    if shared:
      summary[f"shared_{shared}_tree_unchanged"] = ft.same_arrays(
          getattr(split, shared), base.prefill)
  else:
    summary.update(final_train_loss=None, trainable_params=0)
  t1 = time.perf_counter()
  # Answer-token loss on all test items: finer-grained than exact match for tiny models.
  test = evaluate_loss(split, data_lib.task_batches(
      task, tokenizer, seq_len=fc.seq_len, batch_size=ec.batch_size, split="test",
      data_dir=data_dir))
  summary["test_loss"] = test["loss"]
  prompts, answers = data_lib.task_eval_items(task, tokenizer, split="test",
                                              limit=ec.test_items, data_dir=data_dir)
  answer_tokens = max(len(tokenizer.encode(a)) for a in answers)
  em = common.exact_match_eval(split, prompts, answers, tokenizer,
                               batch_size=ec.batch_size,
                               max_new_tokens=answer_tokens + 1,
                               exact_match=data_lib.exact_match)
  summary.update(accuracy=em["accuracy"], test_items=em["items"], correct=em["correct"],
                 examples=em["examples"], train_time_s=round(t1 - t0, 2),
                 eval_time_s=round(time.perf_counter() - t1, 2))
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
  """Two task x regime tables: exact match, then the answer-token loss on the test split."""
  tasks = results["tasks"]
  regimes = list(next(iter(tasks.values())))
  head = f"{'task':<18}" + "".join(f"{r:>10}" for r in regimes)
  lines = []
  for title, key in (("exact match on the test split (greedy generation through the "
                      "split)", "accuracy"),
                     ("answer-token loss on the whole test split (teacher forced)",
                      "test_loss")):
    lines += [title, head, "-" * len(head)]
    lines += [f"{task:<18}" + "".join(f"{by_regime[r][key]:>10.3f}" for r in regimes)
              for task, by_regime in tasks.items()]
    lines.append("")
  n = next(iter(next(iter(tasks.values())).values()))["test_items"]
  b = results["base"]
  lines.append(f"({n} exact-match items per task; base validation loss "
               f"{b['validation_loss']:.3f}; {b['num_params']:,} parameters; wall time "
               f"{results['wall_time_s']:.0f} s)")
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
  per_task = {}
  for task in config.tasks:
    per_task[task] = {}
    for regime in config.regimes:
      res = finetune_and_eval(config, base, task, regime, tokenizer, workdir, data_dir)
      per_task[task][regime] = res
      print(f"  {task} / {regime}: accuracy {res['accuracy']:.3f} "
            f"({res['correct']}/{res['test_items']})", flush=True)
  png = plot_losses(workdir, config)
  results = {
      "job": "quickstart", "config": common.to_dict(config), "base": base_summary,
      "tasks": per_task, "loss_curves": png.name,
      "wall_time_s": round(sw.elapsed(), 2), "jax": jax.__version__,
      "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
  }
  common.write_json_atomic(workdir / "results.json", results)
  print(format_table(results))
  print(f"results: {workdir / 'results.json'}; curves: {png}")
  return results
