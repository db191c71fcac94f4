"""FP8 formats and scaling: per-tensor, per-row, per-column, per-token and block scales;
current scaling and delayed scaling (amax history).

    fmt = FP8_FORMATS["e4m3"]                        # OCP E4M3, max 448
    q, s = quantize(x, fmt, block=(1, 128))           # 1x128 activation tiles
    x_hat = dequantize(q, s)                          # f32, x_hat ~= x

A scale maps a block's largest magnitude onto the format's max: `s = amax * 2**margin /
max`, `q = clip(x / s, -max, max).astype(fp8)`. Blocks are given as (rows, cols) of a
2-D operand and must divide it: `(M, K)` is one scale per tensor, `(1, K)` per row (per
token of an activation `[tokens, K]`), `(K, 1)` per column (per output channel of a
weight `[K, N]`), `(1, 128)` and `(128, 128)` the DeepSeek-V3-style tiles. `block_for`
turns the names ("tensor", "row", "column", "block128") into blocks for an operand.

Delayed scaling (TransformerEngine / flax `fp8_ops`): the scale used at step t comes
from the amax history of earlier steps; `DelayedScaling.update` appends this step's
amax and recomputes the scale. Under gradient accumulation the micro-batches' amaxes
are **combined with max** (`combine_amax`), never summed: one step's history entry is
the largest magnitude seen during that step.

The "e4m3_g2" format is E4M3 with the +-240 range of Intel Gaudi 2 (a configurable
clip: `Fp8Format(..., max=...)`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class Fp8Format:
  """An 8-bit float storage dtype and the largest magnitude quantization may use.

  Attributes:
    name: label.
    dtype: the storage dtype (float8_e4m3fn or float8_e5m2).
    max: clip magnitude; at most the dtype's largest finite value (240 gives Gaudi 2's
      E4M3 range inside OCP E4M3 storage).
  """

  name: str
  dtype: jnp.dtype
  max: float

  def __post_init__(self):
    limit = float(jnp.finfo(self.dtype).max)
    if not 0 < self.max <= limit:
      raise ValueError(f"Fp8Format.max={self.max} must be in (0, {limit}] for {self.dtype}")


FP8_FORMATS = {
    "e4m3": Fp8Format("e4m3", jnp.dtype(jnp.float8_e4m3fn), 448.0),
    "e5m2": Fp8Format("e5m2", jnp.dtype(jnp.float8_e5m2), 57344.0),
    "e4m3_g2": Fp8Format("e4m3_g2", jnp.dtype(jnp.float8_e4m3fn), 240.0),
}
GRANULARITIES = ("tensor", "row", "column", "block128")


def get_format(name: str | Fp8Format) -> Fp8Format:
  if isinstance(name, Fp8Format):
    return name
  if name not in FP8_FORMATS:
    raise ValueError(f"unknown FP8 format {name!r}; available: {sorted(FP8_FORMATS)}")
  return FP8_FORMATS[name]


def block_for(granularity: str, shape: tuple[int, int], *, operand: str = "lhs"
              ) -> tuple[int, int]:
  """The block of a named granularity for a 2-D operand.

  Args:
    granularity: "tensor", "row" (lhs: per token/row), "column" (rhs: per output
      channel), or "block128" (lhs: 1x128 tiles; rhs: 128x128 blocks).
    shape: the operand's (rows, cols).
    operand: "lhs" (activations [M, K]) or "rhs" (weights [K, N]).
  """
  rows, cols = shape
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
  if operand not in ("lhs", "rhs"):
    raise ValueError(f"operand={operand!r} must be 'lhs' or 'rhs'")
  if granularity == "tensor":
    return rows, cols
  if granularity == "row":
    return 1, cols
  if granularity == "column":
    return rows, 1
  return (1, 128) if operand == "lhs" else (128, 128)


def _blocked(x: jax.Array, block: tuple[int, int]) -> jax.Array:
  if x.ndim != 2:
    raise ValueError(f"quantize takes a 2-D operand, got shape {x.shape}")
  (m, k), (a, b) = x.shape, block
  if a < 1 or b < 1 or m % a or k % b:
    raise ValueError(f"block={block} must divide the operand's shape {x.shape}")
  return x.reshape(m // a, a, k // b, b)


def amax(x: jax.Array, block: tuple[int, int]) -> jax.Array:
  """f32[M/a, K/b]: the largest magnitude of each block."""
  return jnp.max(jnp.abs(_blocked(x.astype(jnp.float32), block)), axis=(1, 3))


def scale_from_amax(a: jax.Array, fmt: Fp8Format, margin: int = 0) -> jax.Array:
  """`a * 2**margin / max`, with 1 where a block is all zero (or non-finite)."""
  s = a * (2.0 ** margin) / fmt.max
  return jnp.where(jnp.isfinite(s) & (s > 0), s, 1.0).astype(jnp.float32)


def expand(s: jax.Array, block: tuple[int, int]) -> jax.Array:
  """Repeats per-block values to the operand's shape."""
  return jnp.repeat(jnp.repeat(s, block[0], axis=0), block[1], axis=1)


def quantize_with_scale(x: jax.Array, s: jax.Array, fmt: Fp8Format,
                        block: tuple[int, int]) -> jax.Array:
  """fp8[M, K] = clip(x / s, +-max), the scales `s: f32[M/a, K/b]` given."""
  _blocked(x, block)
  if s.shape != (x.shape[0] // block[0], x.shape[1] // block[1]):
    raise ValueError(f"scale has shape {s.shape}, expected "
                     f"{(x.shape[0] // block[0], x.shape[1] // block[1])} for block {block}")
  y = x.astype(jnp.float32) / expand(s, block)
  return jnp.clip(y, -fmt.max, fmt.max).astype(fmt.dtype)


def quantize(x: jax.Array, fmt: Fp8Format | str, *, block: tuple[int, int] | None = None,
             margin: int = 0) -> tuple[jax.Array, jax.Array]:
  """Current scaling: (fp8[M, K], f32 scales[M/a, K/b]) from this tensor's own amax."""
  fmt = get_format(fmt)
  block = tuple(x.shape) if block is None else tuple(block)
  s = scale_from_amax(amax(x, block), fmt, margin)
  return quantize_with_scale(x, s, fmt, block), s


def dequantize(q: jax.Array, s: jax.Array) -> jax.Array:
  """f32 values of an fp8 operand and its block scales."""
  block = (q.shape[0] // s.shape[0], q.shape[1] // s.shape[1])
  return q.astype(jnp.float32) * expand(s, block)


def combine_amax(*amaxes: jax.Array) -> jax.Array:
  """The amax of a step made of several micro-batches: the max, never the sum."""
  out = amaxes[0]
  for a in amaxes[1:]:
    out = jnp.maximum(out, a)
  return out


@struct.dataclass
class DelayedScaling:
  """Per-tensor delayed scaling state: an amax history and the scale derived from it.

  Attributes:
    history: f32[H] amaxes of the last H steps, newest first.
    scale: f32[] the scale the next step quantizes with.
  """

  history: jax.Array
  scale: jax.Array

  @classmethod
  def create(cls, history_length: int = 16) -> DelayedScaling:
    if history_length < 1:
      raise ValueError(f"history_length={history_length} must be >= 1")
    return cls(history=jnp.zeros((history_length,), jnp.float32),
               scale=jnp.ones((), jnp.float32))

  def update(self, step_amax: jax.Array, fmt: Fp8Format | str, margin: int = 0
             ) -> DelayedScaling:
    """Appends this step's amax; the new scale covers the largest amax in the history.

    A zero or non-finite history keeps the previous scale.
    """
    fmt = get_format(fmt)
    history = jnp.roll(self.history, 1).at[0].set(jnp.asarray(step_amax, jnp.float32))
    a = jnp.max(history)
    new = a * (2.0 ** margin) / fmt.max
    scale = jnp.where(jnp.isfinite(new) & (new > 0), new, self.scale)
    return DelayedScaling(history=history, scale=scale.astype(jnp.float32))


class QuantizedOperand(NamedTuple):
  """An fp8 operand with its block scales (`dequantize(q, scale)` gives f32 values)."""

  q: jax.Array
  scale: jax.Array
