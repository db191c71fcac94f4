"""The fine-tuning study: SUN / PrefillShare / full / LoRA forms, tasks x regimes x seeds.

    python -m experiments.launch --config=configs/finetune_split.py:tiny --workdir=/tmp/fs

1. A base model: pretrained here (`jaxsun.jobs.lm.pretrain`, the corpus mixed with the
   tasks' train text) or restored from `config.base.checkpoint`.
2. **Learning-rate selection on validation.** For every task and trained regime, each
   learning rate of `config.lr_grid[regime]` fine-tunes a task model (first seed, same
   steps for every regime); the one with the best validation exact match (then the
   lower validation answer loss) is kept. Test items are never used to choose.
3. **Seeds.** Every (task, regime) is fine-tuned with its chosen learning rate for each
   of `config.seeds` (the first seed's run is the selection run, resumed from its
   checkpoint) and scored on the test split: exact match by greedy generation through
   the split, and the teacher-forced answer-token loss.
4. **Report.** Mean ± std over seeds per task and regime, each regime's exact match
   relative to full fine-tuning (mean ± std of the per-seed ratio), the constant-answer
   baseline, as `results.json`, `table.md` and `finetune_split.png`.

Every run logs and checkpoints under the workdir; a rerun resumes and reuses finished
runs. The pieces are functions, so a notebook can run one cell of the grid.
"""

from __future__ import annotations

import math
import os
import pathlib

import jax
import numpy as np

import jaxsun
from jaxsun import data as data_lib
from jaxsun import lora
from jaxsun.jobs import common
from jaxsun.jobs import finetune as ft
from jaxsun.jobs import lm
from jaxsun.data.local_tasks import task_name
from jaxsun.train.checkpoints import Checkpointer
from jaxsun.train.trainer import TrainConfig, Trainer


# ----------------------------------------------------------------------------- config


def resolve_tasks(config) -> list:
  """The tasks: committed task names, and `config.data.files` entries as `LocalTask`s."""
  out = []
  files = common.to_dict(config.data.files) if "files" in config.data else {}
  for name in config.tasks:
    if name in data_lib.PAPER_TASKS:
      path = files.get(name, "")
      if not path:
        raise ValueError(f"config.tasks has the paper task {name!r} but "
                         f"config.data.files.{name} is empty; give the path of your copy")
      out.append(data_lib.paper_task(name, path, config_key=f"config.data.files.{name}"))
    elif name in data_lib.TASKS:
      out.append(name)
    else:
      raise ValueError(f"config.tasks: unknown task {name!r}; available: "
                       f"{list(data_lib.TASKS)} or paper tasks {list(data_lib.PAPER_TASKS)}")
  return out


def check_config(config) -> dict:
  """Validates the whole config before any work; returns the resolved pieces.

  Returns:
    {"tasks", "tokenizer", "model", "lora", "runs": fine-tuning runs the study will do}.

  Raises:
    ValueError / FileNotFoundError naming the key (missing data, tokenizer or base
    checkpoint files included).
  """
  if not config.tasks:
    raise ValueError("config.tasks is empty")
  if not config.seeds:
    raise ValueError("config.seeds is empty")
  if "full" not in config.regimes:
    raise ValueError("config.regimes must include 'full' (the reference of the ratios)")
  for r in config.regimes:
    ft.check_regime(r, "regime in config.regimes")
    if r != "none":
      grid = config.lr_grid.get(r, ())
      if not grid or not all(float(x) > 0 for x in grid):
        raise ValueError(f"config.lr_grid.{r} must be a non-empty tuple of positive "
                         f"learning rates, got {grid!r}")
  for t in config.pretrain.text_tasks:
    if t not in data_lib.TASKS:
      raise ValueError(f"config.pretrain.text_tasks: unknown task {t!r}; available: "
                       f"{list(data_lib.TASKS)}")
  if not config.tokenizer:
    raise ValueError("config.tokenizer is empty; give a tokenizer name or "
                     "file:<path to tokenizer.json> (the base model's)")
  if config.get("variant") == "paper" and not config.base.checkpoint:
    raise ValueError("config.base.checkpoint is empty: :paper fine-tunes a pretrained "
                     "base (Llama-3.1-8B shapes), it does not pretrain one; give the "
                     "directory of a Hugging Face checkpoint (config.json + *.safetensors, "
                     "e.g. Meta-Llama-3.1-8B) or of a jaxsun pretraining checkpoint")
  if config.base.checkpoint and not pathlib.Path(config.base.checkpoint).is_dir():
    raise FileNotFoundError(f"config.base.checkpoint={config.base.checkpoint!r} is not a "
                            "directory (a Hugging Face checkpoint with config.json, or a "
                            "jaxsun pretraining checkpoint directory)")
  tasks = resolve_tasks(config)
  for t in tasks:
    if not isinstance(t, str):
      t.load("train")  # a missing file fails here, naming its config key
  tokenizer = data_lib.get_tokenizer(config.tokenizer)
  model_cfg = common.model_config(config.model, tokenizer.vocab_size, "finetune_split")
  try:
    lora_cfg = lora.LoRAConfig(**common.to_dict(config.finetune.lora))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.finetune.lora: {e}") from None
  trained = [r for r in config.regimes if r != "none"]
  n_grid = sum(len(config.lr_grid[r]) for r in trained)
  runs = len(tasks) * (n_grid + len(trained) * (len(config.seeds) - 1))
  mesh_shape = tuple(int(config.mesh[a]) for a in ("data", "fsdp", "tensor"))
  if min(mesh_shape) < 1:
    raise ValueError(f"config.mesh={config.mesh.to_dict()} needs positive sizes")
  memory = {r: memory_estimate(config, model_cfg, lora_cfg, r, mesh_shape) for r in trained}
  for regime, est in memory.items():
    try:
      est.check(config.device_memory_gb)
    except ValueError as e:
      raise ValueError(f"config.device_memory_gb={config.device_memory_gb:g} with "
                       f"config.mesh={mesh_shape}: regime {regime!r}: {e}") from None
  return {"tasks": tasks, "tokenizer": tokenizer, "model": model_cfg, "lora": lora_cfg,
          "runs": runs, "memory": memory, "mesh_shape": mesh_shape}


def memory_estimate(config, model_cfg, lora_cfg, regime: str, mesh_shape):
  """`jaxsun.train.memory` estimate of one fine-tuning run of `regime`."""
  from jaxsun.train import memory  # pylint: disable=g-import-not-at-top
  trainability = ft.REGIMES[regime][0]
  trainable = None
  if regime.endswith("_lora"):  # adapters on every projection: an upper bound
    c = model_cfg
    per_layer = (2 * (c.d_model + c.q_dim) + 2 * (c.d_model + c.kv_dim)
                 + 3 * (c.d_model + c.d_ff))
    trainable = lora_cfg.rank * per_layer * c.n_layers
  return memory.estimate_memory(
      model_cfg, trainability=trainability, untied=trainability in ("prefill", "decode"),
      batch_size=config.finetune.batch_size,
      seq_len=config.finetune.seq_len or model_cfg.max_len, mesh_shape=mesh_shape,
      trainable_params=trainable)


def expected_cost(config) -> dict:
  """Fine-tuning runs, optimizer steps and training FLOPs the study will spend."""
  parts = check_config(config)
  steps = parts["runs"] * config.finetune.steps
  tokens = steps * config.finetune.batch_size * (config.finetune.seq_len or
                                                 config.model.max_len)
  return {"finetune_runs": parts["runs"], "finetune_steps": steps,
          "finetune_tokens_upper_bound": tokens,
          "finetune_flops_upper_bound": tokens * parts["model"].flops_per_token(
              config.finetune.seq_len or config.model.max_len),
          "model_params": parts["model"].num_params(),
          "mesh": parts["mesh_shape"],
          "memory_per_device_gib": {r: round(e.total / 2**30, 2)
                                    for r, e in parts["memory"].items()}}


# ----------------------------------------------------------------------------- pieces


def base_model(config, parts, workdir: pathlib.Path, data_dir) -> tuple[jaxsun.SplitModel, dict]:
  """The base (tied) model: restored from `config.base.checkpoint`, else pretrained."""
  model_cfg, tokenizer = parts["model"], parts["tokenizer"]
  if config.base.checkpoint and (pathlib.Path(config.base.checkpoint) / "config.json").exists():
    from jaxsun import interop  # pylint: disable=g-import-not-at-top
    split = interop.load_hf(config.base.checkpoint, param_dtype=model_cfg.param_dtype,
                            compute_dtype=model_cfg.compute_dtype)
    if split.cfg.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"config.base.checkpoint={config.base.checkpoint!r} has "
                       f"vocab_size={split.cfg.vocab_size} < config.tokenizer's "
                       f"{tokenizer.vocab_size}")
    return split, {"checkpoint": config.base.checkpoint, "format": "huggingface",
                   "num_params": split.cfg.num_params()}
  if config.base.checkpoint:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    template = jaxsun.SplitModel.from_model(jaxsun.Decoder(model_cfg, rngs=nnx.Rngs(0)))
    trainer = Trainer(template, TrainConfig(steps=1, trainability="both"))
    with Checkpointer(config.base.checkpoint, keep=1, async_save=False) as ckpt:
      if trainer.restore(ckpt) is None:
        raise FileNotFoundError(f"config.base.checkpoint={config.base.checkpoint!r} holds "
                                "no checkpoint")
    return trainer.split, {"checkpoint": config.base.checkpoint, "step": trainer.step,
                           "num_params": model_cfg.num_params()}
  pc = config.pretrain
  names = list(pc.text_tasks)
  sources = [pc.corpus] + names
  w = pc.task_text_weight if names else 0.0
  weights = [1.0 - w] + [w / max(1, len(names))] * len(names)
  return lm.pretrain(pc, model_cfg, tokenizer, workdir, data_dir, sources=sources,
                     weights=weights, eval_source=pc.corpus, seed=config.base.seed,
                     identity={"model": common.to_dict(config.model),
                               "tokenizer": config.tokenizer, "tasks": names})


def run_cell(config, parts, base, task, regime: str, lr: float | None, seed: int,
             eval_split: str, workdir: pathlib.Path, data_dir) -> dict:
  """One task model of the grid: fine-tune (or resume a finished run) and evaluate."""
  fc, ec = config.finetune, config.eval
  tokenizer = parts["tokenizer"]
  tname = task_name(task)
  seq_len = ft.task_seq_len(task, tokenizer, fc.seq_len)
  name = f"finetune/{tname}/{regime}/lr{lr:g}/seed{seed}" if lr else f"base/{tname}"
  identity = {"finetune": {k: v for k, v in common.to_dict(fc).items()},
              "task": tname, "regime": regime, "learning_rate": lr, "seed": seed,
              "model": common.to_dict(config.model), "tokenizer": config.tokenizer,
              "base": common.to_dict(config.base), "pretrain": common.to_dict(config.pretrain)}
  split, summary = ft.fit_task_model(
      base, task, regime, tokenizer, steps=fc.steps, batch_size=fc.batch_size,
      seq_len=seq_len, optimizer=ft.with_learning_rate(fc.optimizer, lr or 1.0),
      lora_cfg=parts["lora"], seed=seed, workdir=workdir, name=name, identity=identity,
      data_dir=data_dir, log_every=fc.log_every, mesh=parts.get("mesh"),
      device_memory_gb=config.device_memory_gb)
  items = ec.validation_items if eval_split == "validation" else ec.test_items
  ev = ft.evaluate_task_model(split, task, tokenizer, split_name=eval_split, items=items,
                              loss_items=items, batch_size=ec.batch_size, seq_len=seq_len,
                              data_dir=data_dir)
  summary.update({f"{eval_split}_accuracy": ev["accuracy"], f"{eval_split}_loss": ev["loss"],
                  f"{eval_split}_items": ev["items"], "examples": ev["examples"],
                  "learning_rate": lr, "seq_len": seq_len})
  return summary


def choose_learning_rate(trials: dict[float, dict]) -> float:
  """The learning rate with the best validation exact match, then the lower loss."""
  return max(trials, key=lambda lr: (trials[lr]["validation_accuracy"],
                                     -trials[lr]["validation_loss"]))


def mean_std(xs) -> dict:
  xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
  if not xs:
    return {"mean": float("nan"), "std": float("nan"), "n": 0}
  return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1
          else 0.0, "n": len(xs)}


def aggregate(per_seed: dict, regimes) -> dict:
  """{task: {regime: accuracy, loss, ratio_to_full (mean ± std over seeds)}}."""
  out = {}
  for task, by_regime in per_seed.items():
    out[task] = {}
    full = by_regime["full"]
    for r in regimes:
      runs = by_regime[r]
      acc = [x["test_accuracy"] for x in runs]
      ratios = [a / f["test_accuracy"] if f["test_accuracy"] else float("nan")
                for a, f in zip(acc, full)]
      out[task][r] = {"accuracy": mean_std(acc),
                      "loss": mean_std([x["test_loss"] for x in runs]),
                      "ratio_to_full": mean_std(ratios),
                      "learning_rate": runs[0]["learning_rate"]}
  return out


def format_table(results: dict) -> str:
  """A markdown table: task, regime, lr, exact match, ratio to full, answer loss."""
  lines = ["| task | regime | lr (chosen on validation) | exact match (test) | / full | "
           "answer loss (test) |", "|---|---|---|---|---|---|"]
  for task, by_regime in results["summary"].items():
    base = results["baselines"][task]
    lines.append(f"| {task} | constant answer {base['answer']!r} | - | "
                 f"{base['accuracy']:.3f} | | |")
    for r, s in by_regime.items():
      a, q, l = s["accuracy"], s["ratio_to_full"], s["loss"]
      lr = "-" if s["learning_rate"] is None else f"{s['learning_rate']:g}"
      lines.append(f"| {task} | {r} | {lr} | {a['mean']:.3f} ± {a['std']:.3f} | "
                   f"{q['mean']:.2f} ± {q['std']:.2f} | {l['mean']:.3f} ± {l['std']:.3f} |")
  n = len(results["config"]["seeds"])
  lines.append(f"\nmean ± std over {n} seeds (fine-tuning seeds; one base model)")
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> pathlib.Path:
  """Grouped bars: exact match and answer loss per task and regime, std error bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  summary = results["summary"]
  tasks = list(summary)
  regimes = list(next(iter(summary.values())))
  fig, axes = plt.subplots(1, 2, figsize=(6 + 1.6 * len(tasks) * 2, 4.2))
  width = 0.8 / len(regimes)
  x = np.arange(len(tasks))
  for ax, key, title in ((axes[0], "accuracy", "exact match (test)"),
                         (axes[1], "loss", "answer-token loss (test)")):
    for i, r in enumerate(regimes):
      m = [summary[t][r][key]["mean"] for t in tasks]
      s = [summary[t][r][key]["std"] for t in tasks]
      ax.bar(x + (i - (len(regimes) - 1) / 2) * width, m, width, yerr=s, capsize=2, label=r)
    if key == "accuracy":
      for j, t in enumerate(tasks):
        ax.hlines(results["baselines"][t]["accuracy"], j - 0.4, j + 0.4, colors="k",
                  linestyles="dotted", label="constant answer" if j == 0 else None)
    ax.set_xticks(x, tasks)
    ax.set_title(title)
  axes[0].set_ylim(0, 1.05)
  axes[0].legend(fontsize=7, ncol=2)
  n = len(results["config"]["seeds"])
  fig.suptitle(f"fine-tuning regimes, mean ± std over {n} seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------- the job


def run(config, workdir: str | os.PathLike) -> dict:
  """Runs the study; writes results.json, table.md and finetune_split.png."""
  sw = common.Stopwatch()
  workdir = common.prepare_workdir(workdir)
  parts = check_config(config)
  data_dir = config.data_dir or str(workdir / "tfds")
  tasks, regimes = parts["tasks"], list(config.regimes)
  print(f"finetune_split: {parts['model'].num_params():,}-parameter model, tasks "
        f"{[task_name(t) for t in tasks]}, regimes {regimes}, seeds "
        f"{list(config.seeds)}; {parts['runs']} fine-tuning runs", flush=True)
  for regime, est in parts["memory"].items():
    print(f"  {regime}: {est.report()}", flush=True)
  if math.prod(parts["mesh_shape"]) > 1:
    from jaxsun import parallel  # pylint: disable=g-import-not-at-top
    if math.prod(parts["mesh_shape"]) > jax.device_count():
      raise ValueError(f"config.mesh={parts['mesh_shape']} needs "
                       f"{math.prod(parts['mesh_shape'])} devices; {jax.device_count()} "
                       "are available")
    parts["mesh"] = parallel.make_mesh(*parts["mesh_shape"])
  base, base_summary = base_model(config, parts, workdir, data_dir)
  first_seed = config.seeds[0]
  selection, per_seed, baselines = {}, {}, {}
  for task in tasks:
    tname = task_name(task)
    baselines[tname] = ft.majority_baseline(task, "test", config.eval.test_items)
    selection[tname], per_seed[tname] = {}, {}
    for regime in regimes:
      if regime == "none":
        chosen = None
      else:
        trials = {}
        for lr in config.lr_grid[regime]:
          trials[float(lr)] = run_cell(config, parts, base, task, regime, float(lr),
                                       first_seed, "validation", workdir, data_dir)
          print(f"  [select] {tname} / {regime} lr {lr:g}: validation accuracy "
                f"{trials[float(lr)]['validation_accuracy']:.3f}, loss "
                f"{trials[float(lr)]['validation_loss']:.3f}", flush=True)
        chosen = choose_learning_rate(trials)
        selection[tname][regime] = {"chosen": chosen, "trials": {
            f"{lr:g}": {k: t[k] for k in ("validation_accuracy", "validation_loss",
                                          "final_train_loss")} for lr, t in trials.items()}}
      runs = []
      for seed in (config.seeds if regime != "none" else config.seeds[:1]):
        res = run_cell(config, parts, base, task, regime, chosen, seed, "test", workdir,
                       data_dir)
        runs.append(res)
        print(f"  {tname} / {regime} seed {seed}: test accuracy {res['test_accuracy']:.3f}, "
              f"loss {res['test_loss']:.3f}", flush=True)
      if regime == "none":  # the base model has no seed: the same numbers for each
        runs = runs * len(config.seeds)
      per_seed[tname][regime] = runs
  results = {"job": "finetune_split", "config": common.to_dict(config), "base": base_summary,
             "baselines": baselines, "lr_selection": selection, "per_seed": per_seed,
             "summary": aggregate(per_seed, regimes), "wall_time_s": round(sw.elapsed(), 2),
             "jax": jax.__version__, "backend": jax.default_backend(),
             "devices": [str(d) for d in jax.devices()]}
  table = format_table(results)
  png = plot(results, workdir / "finetune_split.png")
  results["plot"] = png.name
  common.write_json_atomic(workdir / "results.json", results)
  tmp = workdir / "table.md.tmp"
  tmp.write_text(table + "\n")
  os.replace(tmp, workdir / "table.md")
  print(table)
  print(f"results: {workdir / 'results.json'}; plot: {png}")
  return results
