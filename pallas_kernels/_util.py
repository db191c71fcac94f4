"""Helpers shared by the kernel packages."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def next_pow2(n: int) -> int:
  """The smallest power of two >= n (1 for n <= 1)."""
  return 1 << max(n - 1, 0).bit_length()


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def pad_to(x: jax.Array, shape: Sequence[int], value=0) -> jax.Array:
  """`x` padded at the end of each axis up to `shape` with `value` (no copy if equal).

  Entry points pad operands to their tile grid with values that leave the kept outputs
  unchanged (zero activations, zero or unit scales, valid codes) and slice the result.
  """
  if tuple(x.shape) == tuple(shape):
    return x
  if any(s < d for s, d in zip(shape, x.shape)) or len(shape) != x.ndim:
    raise ValueError(f"cannot pad shape {x.shape} to {tuple(shape)}")
  widths = [(0, s - d) for s, d in zip(shape, x.shape)]
  return jnp.pad(x, widths, constant_values=jnp.asarray(value, x.dtype))


def pallas_call(kernel, args, in_specs, out_shape, out_spec, grid, poison, interpret):
  """`pl.pallas_call(kernel, ...)(*args)`; with `poison` (a float), the output buffer
  starts filled with it (an aliased input), so a tile the kernel forgets to write shows
  up in tests instead of whatever memory held."""
  if poison is None:
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, in_specs=in_specs,
                          out_specs=out_spec, interpret=interpret)(*args)

  def poisoned(*refs):
    kernel(*refs[:-2], refs[-1])  # drop the aliased input; the kernel writes the output

  init = jnp.full(out_shape.shape, poison, out_shape.dtype)
  return pl.pallas_call(poisoned, out_shape=out_shape, grid=grid,
                        in_specs=[*in_specs, out_spec], out_specs=out_spec,
                        input_output_aliases={len(args): 0}, interpret=interpret)(
                            *args, init)
