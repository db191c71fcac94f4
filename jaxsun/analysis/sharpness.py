"""Logit sharpness: a Keskar-style bounded-perturbation sharpness on the last token's logits.

"To FP8 and Back Again" (papers.md §8) proposes a loss-landscape sharpness metric for
autoregressive LMs computed on output logits; its exact definition is not published. This
module implements the definition the precision-stability study uses (issue 15):

    phi(x) = 100 * [max_{|y_i| <= eps (|x_i| + 1)} f(x + y) - f(x)] / (1 + f(x))

with x the last-token logits of a batch, f the loss of those logits (mean cross-entropy
against the next tokens), and the box the one of Keskar et al. (2017, "On large-batch
training...", their C_eps with A = I). Keskar et al. maximise with L-BFGS-B; here the
maximisation is projected sign-gradient ascent (PGD as in adversarial training):

    y_0 = 0,  y_{k+1} = clip(y_k + step_size * r * sign(grad f(x + y_k)), -r, r),
    r = eps * (|x| + 1),

keeping the best f seen (so phi never decreases with more steps). Defaults: eps = 1e-3
(Keskar's smallest radius), 10 steps, step_size = 0.25 (a quarter of the box per step).
For cross-entropy, which rises monotonically in every non-target logit and falls in the
target logit, the maximum over the box is the vertex sign(grad f(x)) and the first step
of size >= 1 reaches it exactly; the later steps matter for other losses.

    logit_sharpness(loss_fn, x, data=None, eps=..., steps=..., step_size=...)  f32[] phi
    last_token_sharpness(logits, targets, ...)                       phi of the mean CE
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

DEFAULT_EPS = 1e-3
DEFAULT_STEPS = 10
DEFAULT_STEP_SIZE = 0.25


def _check(eps, steps, step_size) -> None:
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
    raise ValueError(f"eps={eps!r} must be a positive number")
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f"steps={steps!r} must be an int >= 1")
  if not isinstance(step_size, (int, float)) or isinstance(step_size, bool) \
      or not step_size > 0:
    raise ValueError(f"step_size={step_size!r} must be a positive number")


@functools.partial(jax.jit, static_argnames=("loss_fn", "steps"))
def _sharpness(loss_fn, x, data, eps, steps, step_size):
  x = x.astype(jnp.float32)
  f = lambda z: loss_fn(z) if data is None else loss_fn(z, data)
  radius = eps * (jnp.abs(x) + 1.0)  # f32[..., V]: the box's half-widths
  f0 = f(x)
  grad = jax.grad(lambda y: f(x + y))

  def body(_, carry):
    y, best = carry
    y = jnp.clip(y + step_size * radius * jnp.sign(grad(y)), -radius, radius)
    return y, jnp.maximum(best, f(x + y))

  _, best = jax.lax.fori_loop(0, steps, body, (jnp.zeros_like(x), f0))
  return 100.0 * (best - f0) / (1.0 + f0)


def logit_sharpness(loss_fn: Callable[..., jax.Array], x: jax.Array, data=None, *,
                    eps: float = DEFAULT_EPS, steps: int = DEFAULT_STEPS,
                    step_size: float = DEFAULT_STEP_SIZE) -> jax.Array:
  """phi = 100 [max_{|y| <= eps(|x| + 1)} f(x + y) - f(x)] / (1 + f(x)), by PGD.

  Args:
    loss_fn: f(x) -> scalar, or f(x, data) when `data` is given; differentiable in x.
      It is a static argument of the jitted maximisation: pass the same function object
      (and put arrays such as targets in `data`) to reuse the compiled code.
    x: f32[..., V] the point (logits).
    data: optional pytree of arrays passed to `loss_fn` (e.g. the targets).
    eps: relative box radius, > 0.
    steps: projected sign-gradient ascent steps, >= 1.
    step_size: step as a fraction of the box half-width, > 0.

  Returns:
    f32[] phi >= 0 (0 when f is flat on the box).
  """
  _check(eps, steps, step_size)
  return _sharpness(loss_fn, jnp.asarray(x), data, float(eps), steps, float(step_size))


def mean_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """f32[] mean cross-entropy of f32[B, V] logits against i32[B] targets."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def last_token_sharpness(logits: jax.Array, targets: jax.Array, *,
                         eps: float = DEFAULT_EPS, steps: int = DEFAULT_STEPS,
                         step_size: float = DEFAULT_STEP_SIZE) -> jax.Array:
  """phi of the mean cross-entropy of the last token's logits.

  Args:
    logits: f32[B, V] the last position's logits (or f32[B, T, V]: the last position is
      taken).
    targets: i32[B] the next token of each row.
    eps, steps, step_size: see `logit_sharpness`.

  Returns:
    f32[] phi.
  """
  logits = jnp.asarray(logits)
  if logits.ndim == 3:
    logits = logits[:, -1]
  if logits.ndim != 2:
    raise ValueError(f"logits must be [B, V] or [B, T, V], got shape {logits.shape}")
  targets = jnp.asarray(targets)
  if targets.shape != logits.shape[:1]:
    raise ValueError(f"targets must have shape {logits.shape[:1]} (one per row), got "
                     f"{targets.shape}")
  return logit_sharpness(mean_cross_entropy, logits, targets.astype(jnp.int32), eps=eps,
                         steps=steps, step_size=step_size)
