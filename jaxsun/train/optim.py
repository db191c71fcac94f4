"""Optimizer and learning-rate schedules: optax AdamW, warmup-cosine and warmup-stable-decay.

    opt = OptimizerConfig(learning_rate=3e-3, schedule="wsd", warmup_steps=20)
    tx, schedule = make_optimizer(opt, total_steps=400)

Weight decay applies to matrices only (rank >= 2, per layer: the leading layer axis of a
scanned model's stacked block does not count): decaying RMSNorm scales pulls them
toward 0, which is not the regulariser anyone means. Clipping is by the global norm of
the gradients the optimizer sees, i.e. of the trainable trees only.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with a warmup schedule and global-norm clipping.

  Attributes:
    learning_rate: peak learning rate.
    schedule: "cosine" (linear warmup, cosine decay to `end_lr_fraction * peak` at the
      last step), "wsd" (warmup-stable-decay: linear warmup, constant, then a linear
      decay over the last `decay_fraction` of the steps), or "constant" (after warmup).
    warmup_steps: linear warmup from 0 over this many steps.
    decay_fraction: for "wsd", the fraction of all steps spent decaying.
    end_lr_fraction: final learning rate as a fraction of the peak.
    b1, b2, eps: Adam moments.
    weight_decay: decoupled weight decay (AdamW) on rank >= 2 parameters.
    grad_clip_norm: clip the global gradient norm to this value (0: no clipping).
  """

  learning_rate: float = 1e-3
  schedule: str = "cosine"
  warmup_steps: int = 0
  decay_fraction: float = 0.2
  end_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimizerConfig.schedule={self.schedule!r} is not one of {SCHEDULES}")
    if not self.learning_rate > 0:
      raise ValueError(f"OptimizerConfig.learning_rate must be > 0, got {self.learning_rate}")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
    if not 0 <= self.decay_fraction <= 1:
      raise ValueError(f"OptimizerConfig.decay_fraction must be in [0, 1], got "
                       f"{self.decay_fraction}")
    if not 0 <= self.end_lr_fraction <= 1:
      raise ValueError(f"OptimizerConfig.end_lr_fraction must be in [0, 1], got "
                       f"{self.end_lr_fraction}")
    if self.weight_decay < 0 or self.grad_clip_norm < 0:
      raise ValueError("OptimizerConfig.weight_decay and grad_clip_norm must be >= 0")


def make_schedule(opt: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """The learning rate as a function of the (0-based) update step."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  peak, end = opt.learning_rate, opt.learning_rate * opt.end_lr_fraction
  warmup = min(opt.warmup_steps, total_steps)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=end)
  ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if opt.schedule == "constant":
    return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
  decay = min(int(round(opt.decay_fraction * total_steps)), total_steps - warmup)
  stable = total_steps - warmup - decay
  return optax.join_schedules(
      [ramp, optax.constant_schedule(peak), optax.linear_schedule(peak, end, max(decay, 1))],
      [warmup, warmup + stable])


def _stacked_layers(path) -> bool:
  """Whether a tree path lies in a scanned model's stacked block ("layers", then a name
  rather than a layer index): its arrays carry a leading layer axis."""
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  return any(a == "layers" and not isinstance(b, int) for a, b in zip(keys, keys[1:]))


def _decay_mask(params):
  # The rank of one layer's array: a scanned model decays what the unrolled one does.
  return jax.tree_util.tree_map_with_path(
      lambda path, x: getattr(x, "ndim", 0) - _stacked_layers(path) >= 2, params)


def make_optimizer(opt: OptimizerConfig, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(AdamW with clipping and the schedule, the schedule)."""
  schedule = make_schedule(opt, total_steps)
  parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule
