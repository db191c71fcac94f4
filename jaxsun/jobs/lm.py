"""Language-model pretraining: the `lm` job and the `pretrain` step other jobs reuse.

    python -m experiments.launch --config=configs/lm.py:tiny --workdir=/tmp/lm

Packed sequences from TFDS sources (the shipped corpus, task text, or a user's prepared
TFDS text dataset such as lm1b) mixed by weight, a tied decoder trained with
`trainability="both"`, validation loss on the corpus's validation split, a sample from
the trained model, metrics, checkpoints (a rerun resumes), `results.json` and a PNG.
"""

from __future__ import annotations

import os
import pathlib
import time

import jax
from flax import nnx

import jaxsun
from jaxsun import data as data_lib
from jaxsun.jobs import common
from jaxsun.jobs import finetune as ft
from jaxsun.nn import Decoder
from jaxsun.train import metrics as metrics_lib
from jaxsun.train.trainer import TrainConfig


def loss_series(logdir: pathlib.Path, key: str = "loss") -> list[tuple[int, float]]:
  """(step, value) pairs of `key` from a run's metrics.jsonl (the last write of a step)."""
  path = pathlib.Path(logdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return metrics_lib.scalar_series(metrics_lib.read_jsonl(path), key)


def pretrain(pc, model_cfg: jaxsun.ModelConfig, tokenizer, workdir: pathlib.Path,
             data_dir: str | None, *, sources, weights, eval_source, seed: int,
             identity: dict, name: str = "pretrain") -> tuple[jaxsun.SplitModel, dict]:
  """Trains a tied base model on packed LM batches. Returns (split, summary).

  Args:
    pc: config section with seq_len, batch_size, steps, eval_every, eval_batches,
      log_every, checkpoint_every and optimizer.
    model_cfg: the model.
    tokenizer: a `jaxsun.data` tokenizer.
    workdir: logs go to `workdir/logs/name`, checkpoints to `workdir/checkpoints/name`.
    data_dir: the TFDS data directory.
    sources, weights: `jaxsun.data.lm_batches` sources and their row fractions.
    eval_source: the source whose validation split gives the validation loss.
    seed: model init, data order and trainer PRNG.
    identity: extra fields that must match for a rerun to resume the checkpoints.
    name: the run's name under logs/ and checkpoints/.
  """
  batches = data_lib.lm_batches(list(sources), tokenizer, seq_len=pc.seq_len,
                                batch_size=pc.batch_size, seed=seed, weights=list(weights),
                                data_dir=data_dir)
  make_eval = ft.limited(lambda: data_lib.lm_batches(
      eval_source, tokenizer, seq_len=pc.seq_len, batch_size=pc.batch_size,
      split="validation", data_dir=data_dir), pc.eval_batches)
  train_cfg = TrainConfig(steps=pc.steps, trainability="both",
                          optimizer=common.optimizer_config(pc.optimizer),
                          log_every=pc.log_every, checkpoint_every=pc.checkpoint_every,
                          eval_every=pc.eval_every, seed=seed)
  base = jaxsun.SplitModel.from_model(Decoder(model_cfg, rngs=nnx.Rngs(seed)))
  identity = {**identity, name: common.to_dict(pc), "sources": [str(s) for s in sources],
              "weights": list(weights), "seed": seed}
  t0 = time.perf_counter()
  trainer, _ = ft.train_run(base, train_cfg, batches, workdir=workdir, name=name,
                            identity=identity, eval_batches=make_eval)
  ev = trainer.evaluate(make_eval())
  losses = loss_series(workdir / "logs" / name)
  summary = {"steps": pc.steps, "validation_loss": ev["loss"],
             "validation_perplexity": ev["perplexity"], "validation_tokens": ev["tokens"],
             "final_train_loss": losses[-1][1] if losses else None,
             "num_params": model_cfg.num_params(),
             "train_time_s": round(time.perf_counter() - t0, 2)}
  return trainer.split, summary


def sample(split: jaxsun.SplitModel, tokenizer, prompt: str, max_new_tokens: int,
           seed: int, temperature: float = 0.8) -> str:
  """A sampled continuation of `prompt` through the split."""
  ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  n = min(max_new_tokens, split.cfg.max_len - len(ids))
  out = jaxsun.generate(split, [ids], max_new_tokens=n, key=jax.random.key(seed),
                        sampling=jaxsun.SamplingConfig(temperature=temperature, top_p=0.95),
                        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  return tokenizer.decode([int(t) for t in out.tokens[0, :int(out.lengths[0])]])


def run(config, workdir: str | os.PathLike) -> dict:
  """The `lm` job: pretrain, evaluate, sample; writes results.json and loss_curve.png."""
  sw = common.Stopwatch()
  workdir = common.prepare_workdir(workdir)
  dc = config.data
  if len(dc.sources) != len(dc.weights):
    raise ValueError(f"config.data.sources ({len(dc.sources)}) and config.data.weights "
                     f"({len(dc.weights)}) must have the same length")
  tokenizer = data_lib.get_tokenizer(config.tokenizer)
  model_cfg = common.model_config(config.model, tokenizer.vocab_size, "lm")
  data_dir = config.data_dir or None
  print(f"lm: {model_cfg.num_params():,} parameters, tokenizer {config.tokenizer!r}, "
        f"sources {list(dc.sources)} weights {list(dc.weights)}", flush=True)
  split, summary = pretrain(config.train, model_cfg, tokenizer, workdir, data_dir,
                            sources=dc.sources, weights=dc.weights,
                            eval_source=dc.eval_source, seed=config.seed,
                            identity={"model": common.to_dict(config.model),
                                      "tokenizer": config.tokenizer})
  text = sample(split, tokenizer, config.sample_prompt, config.sample_tokens, config.seed)
  png = metrics_lib.plot_curves({"train": loss_series(workdir / "logs" / "pretrain"),
                                 "validation": loss_series(workdir / "logs" / "pretrain",
                                                           "eval_loss")},
                                workdir / "loss_curve.png", title="LM pretraining",
                                ylabel="loss", logy=True)
  results = {"job": "lm", "config": common.to_dict(config), **summary,
             "sample": {"prompt": config.sample_prompt, "continuation": text},
             "loss_curve": png.name, "wall_time_s": round(sw.elapsed(), 2),
             "jax": jax.__version__, "backend": jax.default_backend()}
  common.write_json_atomic(workdir / "results.json", results)
  print(f"validation loss {summary['validation_loss']:.3f} (perplexity "
        f"{summary['validation_perplexity']:.1f}) after {summary['steps']} steps")
  print(f"sample: {config.sample_prompt!r} -> {text!r}")
  return results
