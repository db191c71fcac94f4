r"""Generate demo: pretrain, split, fine-tune the prefill tree only (SUN), generate.

    python -m experiments.generate_demo --workdir=/tmp/jaxsun_demo \
        [--config=configs/generate_demo.py[:smoke]] [--config.pretrain_steps=400]

The logic is in `run(config, workdir)`, importable from notebooks and tests.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

import jax
import numpy as np
import optax
from flax import nnx

import jaxsun
from jaxsun.data import synthetic


def _train(split, trainability, steps, sample, tx, log_every, label):
  step_fn = jaxsun.make_train_step(tx, trainability)
  opt_state = jaxsun.make_optimizer(tx, split, trainability).init(split)
  losses, t0, n_tok = [], None, 0
  for i in range(steps):
    tokens, boundary, mask = sample()
    split, opt_state, loss = step_fn(split, opt_state, tokens, boundary, mask)
    if i == 0:
      loss.block_until_ready()
      t0 = time.perf_counter()  # throughput excludes the compiling first step
    else:
      n_tok += tokens.size
    losses.append(float(loss))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      dt = time.perf_counter() - t0
      print(f"  [{label}] step {i + 1:4d}/{steps}  loss {losses[-1]:.4f}  "
            f"{n_tok / max(dt, 1e-9):,.0f} tokens/s", flush=True)
  return split, losses


def exact_match(split, task: synthetic.SymbolTask, name: str, n: int,
                rng: np.random.Generator) -> float:
  """Greedy generation through the split; a hit is an exactly right answer + EOS."""
  tokens, boundary, answers = task.examples(rng, n, name)
  out = jaxsun.generate(split, tokens[:, :int(boundary.max())], boundary,
                        max_new_tokens=task.max_symbols + 1, eos_id=synthetic.EOS,
                        pad_id=synthetic.PAD)
  gen = np.asarray(out.tokens)
  hits = [gen[i, :len(a)].tolist() == a for i, a in enumerate(answers)]
  return float(np.mean(hits))


def _write_json_atomic(path: pathlib.Path, obj) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def run(config, workdir: str | os.PathLike) -> dict:
  """Runs the demo and writes `results.json` into `workdir`; returns the results."""
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=workdir)
    probe.close()
  except OSError as e:
    raise ValueError(f"workdir {str(workdir)!r} cannot be written: {e}") from None
  t_start = time.perf_counter()
  task = synthetic.SymbolTask(n_symbols=config.n_symbols, max_symbols=config.max_symbols)
  cfg = jaxsun.ModelConfig(name="demo", vocab_size=task.vocab_size,
                           **{**config.model.to_dict(),
                              "max_len": max(config.model.max_len, task.seq_len)})
  print(f"model: {cfg.num_params():,} parameters ({cfg})")
  rng = np.random.default_rng(config.seed)
  tx = optax.adamw(config.learning_rate)

  def sampler(names):
    def sample():
      tok, bnd, _ = task.examples(rng, config.batch_size, names[int(rng.integers(len(names)))])
      return tok, bnd, task.loss_mask(tok, bnd)
    return sample

  base = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(config.seed)))
  print("pretraining the base model (tied trees, trainability='both') on copy + reverse")
  base, base_losses = _train(base, "both", config.pretrain_steps,
                             sampler(["copy", "reverse"]), tx, config.log_every, "base")
  eval_rng = lambda: np.random.default_rng(config.seed + 1)  # same items for every model
  acc = {"base": {t: exact_match(base, task, t, config.eval_examples, eval_rng())
                  for t in synthetic.TASKS}}

  print("SUN: fine-tuning only the prefill tree on reverse; the decode tree stays shared")
  sun, sun_losses = _train(base.untie(), "prefill", config.finetune_steps,
                           sampler(["reverse"]), tx, config.log_every, "sun")
  acc["sun_prefill_only"] = {t: exact_match(sun, task, t, config.eval_examples, eval_rng())
                             for t in synthetic.TASKS}
  frozen = all(bool((a == b).all()) for a, b in
               zip(jax.tree.leaves(base.prefill), jax.tree.leaves(sun.decode)))

  results = {
      "model": cfg.name, "num_params": cfg.num_params(),
      "exact_match": acc, "eval_examples": config.eval_examples,
      "final_loss": {"base": base_losses[-1], "sun_prefill_only": sun_losses[-1]},
      "decode_tree_bitwise_frozen": frozen,
      "wall_time_s": round(time.perf_counter() - t_start, 2),
      "jax": jax.__version__, "backend": jax.default_backend(),
  }
  _write_json_atomic(workdir / "results.json", results)
  print(f"\n{'model':<18}{'copy':>8}{'reverse':>9}")
  for name, a in acc.items():
    print(f"{name:<18}{a['copy']:>8.3f}{a['reverse']:>9.3f}")
  print(f"decode tree bitwise frozen: {frozen}; wall time {results['wall_time_s']} s; "
        f"results in {workdir / 'results.json'}")
  return results


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
      "config", str(pathlib.Path(__file__).parents[1] / "configs" / "generate_demo.py"),
      "configs/generate_demo.py[:smoke]", lock_config=True)
  flags.DEFINE_string("workdir", None, "where results.json is written")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
