"""`Population`: several seeds of one training run, stepped together under `jax.vmap`.

Stability studies need many short runs that differ only in their seed. Running them one
after another leaves a small model's matmuls too thin to keep a device (or a 2-core CPU)
busy and compiles every run again; `Population` stacks S `Trainer` states on a leading
axis and runs **the Trainer's own step** (`Trainer._step_impl`, the one training path)
under `vmap`, so the update is bit-for-bit what `Trainer.train_step` would do per seed
(tested) and one compilation serves all seeds.

    pop = Population(lambda seed: SplitModel.from_model(Decoder(cfg, rngs=nnx.Rngs(seed))),
                     TrainConfig(steps=500), seeds=(0, 1, 2))
    metrics = pop.train_step(batches)      # batches: {"tokens": i32[S, B, T], ...}
    metrics["loss"]                         # f32[S], one per seed
    pop.map(lambda split: loss(split))      # any function of each seed's model, vmapped

Each seed's `TrainConfig.seed` (the trainer's PRNG) is its own seed; the model's
initialisation is whatever `make_split(seed)` builds. Frozen trees (those
`TrainConfig.trainability` does not train) are shared: taken from the first seed's split,
so they must not depend on the seed. One device, no mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsun.split import SplitModel, combine
from jaxsun.train.trainer import BATCH_KEYS, TrainConfig, Trainer, batch_window


class Population:
  """S runs of one `TrainConfig` that differ in their seed, trained in lockstep.

  Args:
    make_split: seed -> the `SplitModel` that seed starts from.
    config: the `TrainConfig` of every run (its `seed` is replaced by each seed).
    seeds: distinct integer seeds, at least one.
  """

  def __init__(self, make_split: Callable[[int], SplitModel], config: TrainConfig,
               seeds: Sequence[int]):
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
      raise ValueError(f"seeds={seeds!r} must be distinct integers, at least one")
    if not isinstance(config, TrainConfig):
      raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.distills:
      raise ValueError("Population does not distill: TrainConfig.distill_weight must be 0")
    self.seeds = seeds
    trainers = [Trainer(make_split(int(s)), dataclasses.replace(config, seed=int(s)))
                for s in seeds]
    self._trainer = trainers[0]
    self.config = config
    self.state = jax.tree.map(lambda *xs: jnp.stack(xs), *[t.state for t in trainers])
    self._step = jax.jit(jax.vmap(self._trainer._step_impl, in_axes=(0, None, 0)),  # pylint: disable=protected-access
                         donate_argnums=0, static_argnames=("window",))
    self._mapped = {}

  @property
  def size(self) -> int:
    return len(self.seeds)

  @property
  def step(self) -> int:
    return int(self.state.step[0])

  def num_trainable_params(self) -> int:
    """Trainable parameters of one run."""
    return self._trainer.num_trainable_params()

  def _check_batch(self, batch: Mapping[str, Any]) -> dict:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
      raise ValueError(f"batch is missing {missing} (needs {BATCH_KEYS})")
    out = {k: np.asarray(batch[k]) for k in BATCH_KEYS}
    if out["tokens"].ndim != 3 or out["tokens"].shape[0] != self.size:
      raise ValueError(f"batch['tokens'] must be [S={self.size}, B, T] (one batch per "
                       f"seed), got shape {out['tokens'].shape}")
    return out

  def train_step(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One update of every run, run s on `batch[k][s]`; returns metrics as f[S] arrays."""
    host = self._check_batch(batch)
    t = host["tokens"].shape[2]
    window = batch_window(self._trainer._template, host["boundary"].reshape(-1), t)  # pylint: disable=protected-access
    self.state, metrics = self._step(self.state, self._trainer.frozen,
                                     {k: jnp.asarray(v) for k, v in host.items()},
                                     window=window)
    return {k: np.asarray(v) for k, v in metrics.items()}

  def splits(self) -> list[SplitModel]:
    """Each run's current model."""
    return [combine(self._trainer._template,  # pylint: disable=protected-access
                    jax.tree.map(lambda x, i=i: x[i], self.state.params),
                    self._trainer.frozen) for i in range(self.size)]

  def map(self, fn: Callable[..., Any], *args, in_axes: Any = None) -> Any:
    """`fn(split, *args)` for every run under one `vmap` (outputs get a leading S axis).

    Args:
      fn: a jax-traceable function of a `SplitModel` (and `args`); compiled once per
        function object.
      *args: extra arguments; shared by every run unless `in_axes` says otherwise.
      in_axes: `vmap` axes of `args` (None: all shared).
    """
    arg_axes = (None,) * len(args) if in_axes is None else tuple(in_axes)
    key = (fn, arg_axes)
    if key not in self._mapped:  # one compilation per function (pass the same object)
      template, frozen = self._trainer._template, self._trainer.frozen  # pylint: disable=protected-access
      run = lambda params, *a: fn(combine(template, params, frozen), *a)
      self._mapped[key] = jax.jit(jax.vmap(run, in_axes=(0, *arg_axes)))
    return self._mapped[key](self.state.params, *args)
