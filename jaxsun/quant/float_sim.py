"""Low-bit floating point simulated inside float32: any ExMy format.

    FloatFormat(exponent_bits=4, mantissa_bits=3, max_value=448.0)   # OCP E4M3 ("fn")
    simulate(x, FloatFormat(8, 3))                                    # E8M3: bf16 range
    simulate(x, fmt, rounding="truncate")                             # mantissa masking

A value is rounded to the format's grid: exponent clamped to the format's range
(subnormals below the smallest normal, or flushed to zero), mantissa rounded to nearest
(ties to even) or truncated toward zero (the "mantissa masking" of reduced-precision
training studies), and magnitudes above `max_value` saturated (or sent to inf). The
result is float32 holding exactly representable values, so it can feed any matmul: the
reduced-precision training-stability study applies it to matmul inputs
(`simulated_matmul`). Where a format coincides with an ml_dtypes type (E4M3 with max 448
= float8_e4m3fn, E5M2 = float8_e5m2, E8M7 = bfloat16) the values are identical; tests
check that on every representable value. One exception: XLA treats float32 denormals as
zero, so magnitudes below float32's smallest normal (1.2e-38; only E8 formats reach
there) come out as 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ROUNDINGS = ("nearest", "truncate")


@dataclasses.dataclass(frozen=True)
class FloatFormat:
  """A binary floating-point format with `exponent_bits` and `mantissa_bits`.

  Attributes:
    exponent_bits: 1..8 (the result is computed in float32).
    mantissa_bits: 0..23 explicit fraction bits.
    max_value: largest finite magnitude; default IEEE-style (the all-ones exponent is
      reserved), e.g. 240 for E4M3 and 57344 for E5M2. OCP E4M3 ("fn") uses 448.
    subnormals: gradual underflow below the smallest normal (else flush to zero).
    saturate: clamp overflow to +-max_value (else +-inf).
  """

  exponent_bits: int
  mantissa_bits: int
  max_value: float | None = None
  subnormals: bool = True
  saturate: bool = True

  def __post_init__(self):
    if not 1 <= self.exponent_bits <= 8:
      raise ValueError(f"FloatFormat.exponent_bits={self.exponent_bits} must be in [1, 8]")
    if not 0 <= self.mantissa_bits <= 23:
      raise ValueError(f"FloatFormat.mantissa_bits={self.mantissa_bits} must be in [0, 23]")
    if self.max_value is not None and not 0 < self.max_value <= self.ieee_max * 2:
      raise ValueError(f"FloatFormat.max_value={self.max_value} is out of range for "
                       f"E{self.exponent_bits}M{self.mantissa_bits}")

  @property
  def name(self) -> str:
    return f"E{self.exponent_bits}M{self.mantissa_bits}"

  @property
  def bias(self) -> int:
    return 2 ** (self.exponent_bits - 1) - 1

  @property
  def min_exponent(self) -> int:
    """Exponent of the smallest normal number."""
    return 1 - self.bias

  @property
  def ieee_max(self) -> float:
    emax = 2 ** self.exponent_bits - 2 - self.bias
    return float((2 - 2.0 ** -self.mantissa_bits) * 2.0 ** emax)

  @property
  def max(self) -> float:
    return self.ieee_max if self.max_value is None else float(self.max_value)

  @property
  def smallest_normal(self) -> float:
    return float(2.0 ** self.min_exponent)

  @property
  def smallest_subnormal(self) -> float:
    return float(2.0 ** (self.min_exponent - self.mantissa_bits))


E4M3 = FloatFormat(4, 3, max_value=448.0)  # OCP E4M3 = float8_e4m3fn
E4M3_IEEE = FloatFormat(4, 3)              # max 240, the E4M3 range of Gaudi 2
E5M2 = FloatFormat(5, 2)                   # = float8_e5m2 (max 57344)
BF16 = FloatFormat(8, 7, max_value=float(jnp.finfo(jnp.bfloat16).max))


def simulate(x: jax.Array, fmt: FloatFormat, *, rounding: str = "nearest") -> jax.Array:
  """f32 values of `x` rounded to `fmt` (see the module docstring). NaN stays NaN."""
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding={rounding!r} is not one of {ROUNDINGS}")
  x = jnp.asarray(x, jnp.float32)
  ax = jnp.abs(x)
  # Exponent of |x| (floor(log2)), clamped at the smallest normal: below it the grid
  # spacing stays that of the subnormals.
  _, e = jnp.frexp(ax)
  e = jnp.maximum(e - 1, fmt.min_exponent)
  # Where the grid spacing would be a float32 denormal (E8 formats near the bottom of
  # their range), work 2**64 higher: XLA treats denormals as zero.
  shift = jnp.where(e - fmt.mantissa_bits < -126, 64, 0)
  spacing = jnp.ldexp(jnp.ones_like(ax), e + shift - fmt.mantissa_bits)
  scaled = jnp.ldexp(ax, shift) / spacing  # exact: powers of two
  q = (jnp.round(scaled) if rounding == "nearest" else jnp.trunc(scaled)) * spacing
  q = jnp.ldexp(q, -shift)  # results below float32's normal range flush to 0
  if not fmt.subnormals:
    q = jnp.where(q < fmt.smallest_normal, 0.0, q)
  if fmt.saturate:
    q = jnp.minimum(q, fmt.max)
  else:
    # Round-to-nearest overflows only past the midpoint to the next (absent) value.
    limit = fmt.max + (0.5 * 2.0 ** (jnp.floor(jnp.log2(fmt.max)) - fmt.mantissa_bits)
                       if rounding == "nearest" else 0.0)
    q = jnp.where(ax >= limit, jnp.inf, jnp.minimum(q, fmt.max))
  return jnp.where(jnp.isnan(x), x, jnp.sign(x) * q)


def simulated_matmul(a: jax.Array, b: jax.Array, fmt: FloatFormat | None, *,
                     rounding: str = "nearest", scale: bool = True) -> jax.Array:
  """`a @ b` with both inputs rounded to `fmt` first (None: exact float32).

  With `scale`, each operand is first scaled per tensor so its largest magnitude maps to
  the format's max (and unscaled after), as FP8 recipes do; without, values are clamped
  to the format's range as they are (exponent masking).
  """
  if fmt is None:
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)

  def q(x):
    if not scale:
      return simulate(x, fmt, rounding=rounding), 1.0
    s = jnp.max(jnp.abs(x)) / fmt.max
    s = jnp.where(jnp.isfinite(s) & (s > 0), s, 1.0)
    # Clip: x / s can round just past max (or overflow when max is near float32's).
    return simulate(jnp.clip(x / s, -fmt.max, fmt.max), fmt, rounding=rounding), s

  qa, sa = q(a)
  qb, sb = q(b)
  return jnp.dot(qa, qb, precision=jax.lax.Precision.HIGHEST) * (sa * sb)
