"""Training runs the jobs are made of: pretrain a base LM, fine-tune it in a regime.

A **regime** names how a task model is made from the base model:

    regime        trees                        trainability          last prompt token by
    full          tied (one tree)              both                  (one tree)
    prefill       untied, decode tree shared   prefill (SUN)         prefill tree
    decode        untied, prefill tree shared  decode (PrefillShare) decode tree
    none          the base model               -                     (one tree)
    full_lora     as full, LoRA adapters on the tree; only the adapters train
    prefill_lora  as prefill, adapters on the prefill tree (SUN with LoRA)
    decode_lora   as decode, adapters on the decode tree (PrefillShare with LoRA)

In the decode regimes the decode tree runs the last prompt token, so the task model (not
the shared base) picks the first answer token. LoRA regimes share the base arrays of
their adapted tree with the base model (`jaxsun.lora`): a task model costs its adapters.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Callable, Iterator

import jax

import jaxsun
from jaxsun import lora
from jaxsun.jobs import common
from jaxsun.train.checkpoints import Checkpointer
from jaxsun.train.metrics import create_default_writer
from jaxsun.train.trainer import TrainConfig, Trainer

# regime -> (trainability, tree that runs the last prompt token, tree with adapters)
REGIMES = {
    "full": ("both", "prefill", None),
    "prefill": ("prefill", "prefill", None),
    "decode": ("decode", "decode", None),
    "none": ("none", "prefill", None),
    "full_lora": ("both", "prefill", "both"),
    "prefill_lora": ("prefill", "prefill", "prefill"),
    "decode_lora": ("decode", "decode", "decode"),
}


def check_regime(regime: str, what: str = "regime") -> None:
  if regime not in REGIMES:
    raise ValueError(f"unknown {what} {regime!r}; available: {list(REGIMES)}")


def regime_split(base: jaxsun.SplitModel, regime: str,
                 lora_cfg: lora.LoRAConfig | None = None, key: jax.Array | None = None
                 ) -> tuple[jaxsun.SplitModel, str]:
  """(the task model to train, its trainability) for `regime` (see the module docstring).

  Args:
    base: the base model (tied).
    regime: a name of `REGIMES`.
    lora_cfg: the adapters of the `*_lora` regimes (default `LoRAConfig()`).
    key: PRNG key of the adapters' initialisation (default `jax.random.key(0)`).
  """
  check_regime(regime)
  trainability, last, adapted = REGIMES[regime]
  split = base.replace(last_prompt_token=last)
  if trainability in ("prefill", "decode"):
    split = split.untie()
  if adapted is not None:
    split = lora.add_adapters(split, adapted, lora_cfg or lora.LoRAConfig(),
                              jax.random.key(0) if key is None else key)
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
