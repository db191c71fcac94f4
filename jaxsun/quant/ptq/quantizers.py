"""Uniform weight quantizers for post-training quantization: RTN, FlexRound and LRQ.

Pure jnp functions over a linear kernel `W: f32[in, out]` (jaxsun's `Linear.kernel`,
y = x @ W). Scales are per output channel (column) or per group of `group_size` input
rows within a column, so a scale array is `f32[in // g, out]` (`g = in` per channel).

    scheme = UniformScheme(bits=4, group_size=128, symmetric=False)
    scale, zero = rtn_params(w, scheme)                 # f32[in // g, out] each
    w_hat = fake_quant(w, scale, zero, scheme)          # f32[in, out]
    q = quantize(w, scale, zero, scheme)                # uint8[in, out] codes
    dequantize(q, scale, zero, scheme) == w_hat         # bitwise

FlexRound (ICML 2023) and LRQ (NAACL 2025) learn *which level* each weight rounds to by
dividing it by a learnable per-weight factor before rounding (papers.md §6.1):

    FlexRound: W_hat = s1 · clamp(round(W / (s1 · exp(S2 + s3 [+ s4])))), S2 f32[in, out]
    LRQ:       W_hat = s1 · clamp(round(W / (s1 · exp(A·B + r + c))))
               A f32[in, rank], B f32[rank, out], r per output, c per input channel

Reconstruction multiplies by s1 only, so the deployed weight is an ordinary RTN-format
weight (codes + s1 + zero). s1 is learned as a log-ratio to the RTN scale and the zero
point stays at its RTN value (as in the reference code), so with every parameter at zero
the output equals `fake_quant(w, *rtn_params(w, scheme), scheme)` bitwise. Rounding uses
the straight-through estimator so gradients reach every parameter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Floor on a scale so an all-zero group does not divide by zero.
_MIN_SCALE = 1e-8


@dataclasses.dataclass(frozen=True)
class UniformScheme:
  """A uniform integer grid for a weight.

  Attributes:
    bits: code width, in [2, 8].
    group_size: input rows sharing one scale within a column; None = one scale per output
      channel. Must divide the input dimension (checked when applied).
    symmetric: True = absmax scale, zero 0, codes in [-2^(b-1), 2^(b-1) - 1];
      False = min/max scale and zero point, codes in [0, 2^b - 1].
  """

  bits: int = 4
  group_size: int | None = None
  symmetric: bool = False

  def __post_init__(self):
    if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
      raise ValueError(f"UniformScheme.bits={self.bits!r} must be an int in [2, 8]")
    if self.group_size is not None and (
        not isinstance(self.group_size, int) or self.group_size < 1):
      raise ValueError(
          f"UniformScheme.group_size={self.group_size!r} must be None or a positive int")

  @property
  def qmin(self) -> int:
    return -(2 ** (self.bits - 1)) if self.symmetric else 0

  @property
  def qmax(self) -> int:
    return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

  @property
  def code_dtype(self) -> jnp.dtype:
    return jnp.dtype(jnp.int8 if self.symmetric else jnp.uint8)

  def group(self, d_in: int) -> int:
    """Rows per scale for an input dimension `d_in`; raises if it does not divide."""
    g = d_in if self.group_size is None else self.group_size
    if d_in % g:
      raise ValueError(
          f"UniformScheme.group_size={g} must divide the input dimension in={d_in}")
    return g


def _check_weight(w: jax.Array) -> None:
  if w.ndim != 2:
    raise ValueError(f"w must be a 2-D kernel f32[in, out], got shape {w.shape}")


def _expand(a: jax.Array, g: int) -> jax.Array:
  """f32[in // g, out] -> f32[in, out]: each group's value repeated over its rows."""
  return jnp.repeat(a, g, axis=0)


def rtn_params(w: jax.Array, scheme: UniformScheme) -> tuple[jax.Array, jax.Array]:
  """Round-to-nearest grid: min/max (asymmetric) or absmax (symmetric) per group.

  Args:
    w: f32[in, out] kernel.
    scheme: the grid.

  Returns:
    (scale, zero), each f32[in // g, out]; zero is an integer-valued float (0 when
    symmetric) so that w ~= scale * (code - zero).
  """
  _check_weight(w)
  d_in, d_out = w.shape
  g = scheme.group(d_in)
  wg = w.astype(jnp.float32).reshape(d_in // g, g, d_out)  # f32[in // g, g, out]
  if scheme.symmetric:
    scale = jnp.max(jnp.abs(wg), axis=1) / scheme.qmax  # f32[in // g, out]
    return jnp.maximum(scale, _MIN_SCALE), jnp.zeros_like(scale)
  # Range includes 0 so that an exact zero weight stays exactly representable.
  lo = jnp.minimum(jnp.min(wg, axis=1), 0.0)  # f32[in // g, out]
  hi = jnp.maximum(jnp.max(wg, axis=1), 0.0)
  scale = jnp.maximum((hi - lo) / scheme.qmax, _MIN_SCALE)
  zero = jnp.round(-lo / scale)  # f32[in // g, out], in [0, qmax]
  return scale, zero


def _codes(x: jax.Array, zero: jax.Array, scheme: UniformScheme,
           ste: bool = False) -> jax.Array:
  """Integer-valued float codes clamp(round(x) + zero); x, zero f32[in, out]."""
  r = jnp.round(x)
  if ste:
    r = x + jax.lax.stop_gradient(r - x)
  return jnp.clip(r + zero, scheme.qmin, scheme.qmax)


def fake_quant(w: jax.Array, scale: jax.Array, zero: jax.Array,
               scheme: UniformScheme) -> jax.Array:
  """RTN quantize-dequantize: scale * (clamp(round(w / scale) + zero) - zero).

  Args:
    w: f32[in, out] kernel.
    scale, zero: f32[in // g, out] from `rtn_params` (or any grid of that shape).
    scheme: the grid.

  Returns:
    f32[in, out] weight on the grid.
  """
  _check_weight(w)
  g = scheme.group(w.shape[0])
  s, z = _expand(scale, g), _expand(zero, g)  # f32[in, out]
  return s * (_codes(w / s, z, scheme) - z)


def quantize(w: jax.Array, scale: jax.Array, zero: jax.Array,
             scheme: UniformScheme) -> jax.Array:
  """Integer codes of `w`: uint8[in, out] in [0, 2^b - 1], or int8 when symmetric."""
  _check_weight(w)
  g = scheme.group(w.shape[0])
  return _codes(w / _expand(scale, g), _expand(zero, g), scheme).astype(scheme.code_dtype)


def dequantize(q: jax.Array, scale: jax.Array, zero: jax.Array,
               scheme: UniformScheme) -> jax.Array:
  """f32[in, out] weight scale * (q - zero) from codes q[in, out]."""
  g = scheme.group(q.shape[0])
  s, z = _expand(scale, g), _expand(zero, g)
  return s * (q.astype(jnp.float32) - z)


# --- FlexRound --------------------------------------------------------------------------


class FlexRoundParams(NamedTuple):
  """FlexRound's learnable parameters (all zero at init = RTN).

  Attributes:
    log_s1: f32[in // g, out], log(s1 / s_rtn): the learned grid scale.
    s2: f32[in, out], element-wise log divisor.
    s3: f32[1, out], per-output-channel log divisor.
    s4: f32[in, 1] per-input-channel log divisor, or None (the reference LRQ code's
      FlexRound has no s4; the FlexRound paper's linear layers do).
  """

  log_s1: jax.Array
  s2: jax.Array
  s3: jax.Array
  s4: jax.Array | None


def flexround_init(w: jax.Array, scheme: UniformScheme,
                   input_scale: bool = False) -> FlexRoundParams:
  """Zero parameters, so `flexround_quant` starts exactly at RTN.

  Args:
    w: f32[in, out] kernel.
    scheme: the grid.
    input_scale: also learn s4, one log divisor per input channel.
  """
  _check_weight(w)
  d_in, d_out = w.shape
  g = scheme.group(d_in)
  return FlexRoundParams(
      log_s1=jnp.zeros((d_in // g, d_out), jnp.float32),
      s2=jnp.zeros((d_in, d_out), jnp.float32),
      s3=jnp.zeros((1, d_out), jnp.float32),
      s4=jnp.zeros((d_in, 1), jnp.float32) if input_scale else None)


def _learned_round(w: jax.Array, log_s1: jax.Array, log_div: jax.Array,
                   scheme: UniformScheme) -> jax.Array:
  """s1 · (clamp(round(w / (s1 · exp(log_div))) + z) − z) with STE rounding.

  s1 = s_rtn · exp(log_s1); z is RTN's zero point, fixed. With log_s1 = log_div = 0 the
  factors are exactly 1.0, which is what makes init bitwise equal to `fake_quant`.
  """
  _check_weight(w)
  g = scheme.group(w.shape[0])
  # The RTN grid is a constant of w; only the learnable parameters receive gradients.
  scale, zero = jax.lax.stop_gradient(rtn_params(w, scheme))
  s1 = _expand(scale * jnp.exp(log_s1), g)  # f32[in, out]
  z = _expand(zero, g)
  x = w / (s1 * jnp.exp(log_div))  # f32[in, out]
  return s1 * (_codes(x, z, scheme, ste=True) - z)


def _learned_codes(w: jax.Array, log_s1: jax.Array, log_div: jax.Array,
                   scheme: UniformScheme) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The integer weight `_learned_round` computes: (codes[in, out], scale, zero).

  `dequantize(codes, scale, zero)` equals `_learned_round`'s value: the per-weight
  divisor only picks the level; the stored scale is s1 (FlexRound / LRQ deploy as RTN).
  """
  _check_weight(w)
  g = scheme.group(w.shape[0])
  scale, zero = rtn_params(w, scheme)
  s1 = scale * jnp.exp(log_s1)  # f32[in // g, out]
  x = w / (_expand(s1, g) * jnp.exp(log_div))
  codes = _codes(x, _expand(zero, g), scheme).astype(scheme.code_dtype)
  return codes, s1, zero


def _flexround_div(params: FlexRoundParams) -> jax.Array:
  log_div = params.s2 + params.s3  # f32[in, out]
  return log_div if params.s4 is None else log_div + params.s4


def flexround_quant(w: jax.Array, params: FlexRoundParams,
                    scheme: UniformScheme) -> jax.Array:
  """FlexRound fake-quantized weight f32[in, out] (differentiable in `params`)."""
  return _learned_round(w, params.log_s1, _flexround_div(params), scheme)


def flexround_export(w: jax.Array, params: FlexRoundParams, scheme: UniformScheme
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(codes, scale, zero) of the FlexRound weight, for an integer layer."""
  return _learned_codes(w, params.log_s1, _flexround_div(params), scheme)


# --- LRQ --------------------------------------------------------------------------------


class LRQParams(NamedTuple):
  """LRQ's learnable parameters; the low-rank term A @ B replaces FlexRound's S2.

  Attributes:
    log_s1: f32[in // g, out], log(s1 / s_rtn).
    a: f32[in, rank], Kaiming-uniform at init (the paper's U, transposed).
    b: f32[rank, out], zero at init (the paper's L, transposed), so A @ B = 0.
    r: f32[1, out], per-output-channel log divisor.
    c: f32[in, 1], per-input-channel log divisor.
  """

  log_s1: jax.Array
  a: jax.Array
  b: jax.Array
  r: jax.Array
  c: jax.Array


def lrq_init(w: jax.Array, scheme: UniformScheme, rank: int,
             key: jax.Array) -> LRQParams:
  """LRQ parameters that start exactly at RTN.

  Args:
    w: f32[in, out] kernel.
    scheme: the grid.
    rank: rank of the low-rank term (the paper uses 1024, or 2048 when both dimensions
      are >= 8192).
    key: PRNG key for the random factor.
  """
  _check_weight(w)
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank={rank!r} must be a positive int")
  d_in, d_out = w.shape
  g = scheme.group(d_in)
  # torch's kaiming_uniform_(a=sqrt(5)) on the paper's U f[rank, in]: bound 1/sqrt(in).
  bound = 1.0 / math.sqrt(d_in)
  return LRQParams(
      log_s1=jnp.zeros((d_in // g, d_out), jnp.float32),
      a=jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound),
      b=jnp.zeros((rank, d_out), jnp.float32),
      r=jnp.zeros((1, d_out), jnp.float32),
      c=jnp.zeros((d_in, 1), jnp.float32))


def _lrq_div(params: LRQParams) -> jax.Array:
  return params.a @ params.b + params.r + params.c  # f32[in, out]


def lrq_quant(w: jax.Array, params: LRQParams, scheme: UniformScheme) -> jax.Array:
  """LRQ fake-quantized weight f32[in, out] (differentiable in `params`)."""
  return _learned_round(w, params.log_s1, _lrq_div(params), scheme)


def lrq_export(w: jax.Array, params: LRQParams, scheme: UniformScheme
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(codes, scale, zero) of the LRQ weight, for an integer layer."""
  return _learned_codes(w, params.log_s1, _lrq_div(params), scheme)


def num_params(params: FlexRoundParams | LRQParams) -> int:
  """Learnable scalars: FlexRound in·out + out [+ in] + (in/g)·out;
  LRQ rank·(in + out) + in + out + (in/g)·out."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
