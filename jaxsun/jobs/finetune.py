"""Training runs the jobs are made of: pretrain a base LM, fine-tune it in a regime.

A **regime** names how a task model is made from the base model:

    regime    trees                       trainability   last prompt token by
    full      tied (one tree)             both           (one tree)
    prefill   untied, decode tree shared  prefill (SUN)  prefill tree
    decode    untied, prefill tree shared decode (PrefillShare)  decode tree
    none      the base model              -              (one tree)

In the decode regime the decode tree runs the last prompt token, so the task model (not
the shared base) picks the first answer token.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Callable, Iterator

import jax

import jaxsun
from jaxsun.jobs import common
from jaxsun.train.checkpoints import Checkpointer
from jaxsun.train.metrics import create_default_writer
from jaxsun.train.trainer import TrainConfig, Trainer

REGIMES = {
    "full": ("both", "prefill"),
    "prefill": ("prefill", "prefill"),
    "decode": ("decode", "decode"),
    "none": ("none", "prefill"),
}


def regime_split(base: jaxsun.SplitModel, regime: str) -> tuple[jaxsun.SplitModel, str]:
  """(the task model to train, its trainability) for `regime` (see the module docstring)."""
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}; available: {sorted(REGIMES)}")
  trainability, last = REGIMES[regime]
  split = base.replace(last_prompt_token=last)
  if trainability in ("prefill", "decode"):
    split = split.untie()
  return split, trainability


def _check_run_identity(directory: pathlib.Path, identity: dict) -> None:
  """Refuses to resume checkpoints written by a different configuration."""
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / "run.json"
  if path.exists():
    old = json.loads(path.read_text())
    if old != identity:
      diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
      raise ValueError(f"{directory} holds checkpoints of a different run (differs in "
                       f"{diff}); use a new --workdir or delete that directory")
  else:
    common.write_json_atomic(path, identity)


def train_run(split: jaxsun.SplitModel, train_cfg: TrainConfig, batches: Iterator, *,
              workdir: pathlib.Path, name: str, identity: dict,
              eval_batches: Callable[[], Iterator] | None = None,
              keep_checkpoints: int = 1, async_checkpoints: bool = True):
  """Trains with metrics under `workdir/logs/name` and checkpoints under
  `workdir/checkpoints/name`, resuming from them. Returns (trainer, history)."""
  ckpt_dir = workdir / "checkpoints" / name
  _check_run_identity(ckpt_dir, identity)
  trainer = Trainer(split, train_cfg)
  with create_default_writer(workdir / "logs" / name) as writer, Checkpointer(
      ckpt_dir / "steps", keep=keep_checkpoints, async_save=async_checkpoints) as ckpt:
    history = trainer.fit(batches, writer=writer, checkpointer=ckpt,
                          eval_batches=eval_batches, label=name)
  return trainer, history


def limited(make: Callable[[], Iterator], n: int) -> Callable[[], Iterator]:
  """A factory of iterators cut to their first `n` items."""
  return lambda: itertools.islice(make(), n)


def same_arrays(a, b) -> bool:
  """Whether two trees are bitwise equal (used to show that shared trees stay frozen)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(bool((x == y).all()) for x, y in zip(la, lb))
