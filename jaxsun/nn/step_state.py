"""`StepState`: non-trainable state that a training step overwrites with its gradient.

Some layers keep statistics that training updates but the optimizer must not touch: FP8
amax histories (`jaxsun.nn.fp8_linear.Fp8Meta`) and Affine-Scaled Attention's moving
average of alpha (`jaxsun.nn.attention.AlphaEMA`). The forward pass stays pure: such a
variable is read through a `jax.custom_vjp` whose backward pass returns the variable's
*next value* as its "gradient" (flax's overwrite-with-gradient convention). The trainer
(`jaxsun.train.Trainer`) writes that value back instead of optimizing it, so the state
changes in training steps only (evaluation, generation and serving never take
gradients), is checkpointed with the parameters, and works unchanged under `jax.lax.scan`
and remat. Under gradient accumulation the micro-batches' values combine by `combine`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

COMBINE = ("max", "mean")


class StepState(nnx.Variable):
  """Base class of overwrite-with-gradient state; `combine` merges micro-batches."""

  combine = "max"


@jax.custom_vjp
def read_with_update(value: jax.Array, next_value: jax.Array) -> jax.Array:
  """Returns `value`; its gradient is `next_value` (a `StepState`'s update rule).

  Args:
    value: the variable's current value, used by the forward pass.
    next_value: what a training step should store (gets a zero gradient itself).
  """
  del next_value
  return value


def _fwd(value, next_value):
  return value, next_value


def _bwd(next_value, g):
  del g
  return next_value, jnp.zeros_like(next_value)


read_with_update.defvjp(_fwd, _bwd)
