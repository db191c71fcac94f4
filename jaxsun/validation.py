"""Input checks with messages that name the offending argument.

Shape, rank and dtype are checked always (they are static under `jax.jit`); value
ranges are checked only on concrete arrays, i.e. on eager calls and at the host-side
entry points (`generate`, `split_forward` called outside `jit`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name}={value!r} must be a positive integer")


def check_int_array(name: str, x, shape: tuple[int, ...] | None = None) -> None:
  """`x` is an integer array of the given shape (None entries match anything)."""
  if not hasattr(x, "dtype") or not hasattr(x, "shape"):
    raise TypeError(f"{name} must be an integer array, got {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
  if shape is not None:
    if len(x.shape) != len(shape) or any(s is not None and s != d
                                         for s, d in zip(shape, x.shape)):
      raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def check_tokens(name: str, tokens, vocab_size: int) -> None:
  """Rank-2 integer token ids, all in [0, vocab_size) when concrete."""
  if not hasattr(tokens, "dtype"):
    raise TypeError(f"{name} must be an integer array of shape [batch, length], "
                    f"got {type(tokens).__name__}")
  if tokens.ndim != 2:
    raise ValueError(f"{name} must have rank 2 [batch, length], got shape {tuple(tokens.shape)}")
  check_int_array(name, tokens)
  if tokens.shape[0] == 0 or tokens.shape[1] == 0:
    raise ValueError(f"{name} must be non-empty, got shape {tuple(tokens.shape)}")
  if is_concrete(tokens):
    arr = np.asarray(tokens)
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi >= vocab_size:
      bad = lo if lo < 0 else hi
      raise ValueError(f"{name} contains token id {int(bad)} outside the vocabulary "
                       f"[0, {vocab_size})")


def check_lengths(name: str, lengths, batch: int, lo: int, hi: int) -> None:
  """i32[batch] with every entry in [lo, hi] when concrete."""
  check_int_array(name, lengths, (batch,))
  if is_concrete(lengths):
    arr = np.asarray(lengths)
    if arr.min() < lo or arr.max() > hi:
      raise ValueError(f"{name} must lie in [{lo}, {hi}], got values from {int(arr.min())} "
                       f"to {int(arr.max())}")
