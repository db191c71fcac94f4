"""Helpers shared by the kernel packages."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl


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
