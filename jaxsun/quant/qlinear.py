"""Quantized drop-in replacements for `jaxsun.nn.layers.Linear` (y = x @ W, W f[in, out]).

    SimLinear   float kernel, fake-quantized activations / K-V outputs: what block
                reconstruction trains through, and a fake-quant model's layer
    IntLinear   integer weight stored as a qwix QArray (RTN, GPTQ, AWQ, SmoothQuant,
                FlexRound, LRQ exports); W8A8 runs qwix's int8 x int8 dot
    BCQLinear   binary-coding weight (UniQuanF, alternating BCQ, or any uniform weight
                converted exactly), run by the BCQ / LUT-GEMM kernel

All take any leading shape ([..., in]); activations are quantized per token (dynamic) or
per tensor (static, a calibrated `ActScale`), with a straight-through estimator so that
reconstruction can train through them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun.quant.ptq import bcq as bcq_lib
from jaxsun.quant.ptq import quantizers
from jaxsun.quant.schemes import ActQuant, IntScheme


def _qwix():
  """`jaxsun.quant.qwix_adapter`, imported on first use: FP8 and codebook layers (and the
  GPU machines, which lack qwix) never need it."""
  from jaxsun.quant import qwix_adapter  # pylint: disable=g-import-not-at-top
  return qwix_adapter


class Codes(nnx.Variable):
  """Integer codes of a quantized layer (not trained by gradient descent)."""


class ActScale(nnx.Variable):
  """A calibrated per-tensor activation scale (static activation quantization)."""


def _ste(x: jax.Array, q: jax.Array) -> jax.Array:
  return x + jax.lax.stop_gradient(q - x)


def fake_quant_act(x: jax.Array, aq: ActQuant, scale: jax.Array | None = None) -> jax.Array:
  """Quantize-dequantize activations f[..., d] (straight-through gradient).

  Args:
    x: activations.
    aq: the activation grid.
    scale: the calibrated per-tensor scale when `aq.static` (required then).

  Returns:
    f32 array of x's shape on the grid.
  """
  x32 = x.astype(jnp.float32)
  axes = (x.ndim - 1,) if aq.granularity == "token" else tuple(range(x.ndim))
  if aq.symmetric:
    qmax = 2 ** (aq.bits - 1) - 1
    if aq.static:
      if scale is None:
        raise ValueError("static activation quantization needs a calibrated scale")
      s = scale.astype(jnp.float32)
    else:
      s = jnp.max(jnp.abs(x32), axis=axes, keepdims=True) / qmax
    s = jax.lax.stop_gradient(jnp.maximum(s, 1e-8))
    return _ste(x32, s * jnp.clip(jnp.round(x32 / s), -qmax - 1, qmax))
  qmax = 2**aq.bits - 1
  lo = jnp.min(x32, axis=axes, keepdims=True)
  hi = jnp.max(x32, axis=axes, keepdims=True)
  s = jax.lax.stop_gradient(jnp.maximum((hi - lo) / qmax, 1e-8))
  z = jax.lax.stop_gradient(jnp.round(-lo / s))
  return _ste(x32, s * (jnp.clip(jnp.round(x32 / s) + z, 0, qmax) - z))


def static_scale(x: jax.Array, aq: ActQuant) -> jax.Array:
  """The per-tensor absmax scale f32[] of calibration activations for a static `aq`."""
  return jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32))) / (2 ** (aq.bits - 1) - 1),
                     1e-8)


class _ActMixin:
  """Input / output activation quantization shared by the quantized layers."""

  def _init_act(self, act: ActQuant | None, kv: ActQuant | None, act_scale):
    self.act, self.kv = act, kv
    if act is not None and act.static:
      if act_scale is None:
        raise ValueError("act.static=True needs act_scale (calibrate with static_scale)")
      self.act_scale = ActScale(jnp.asarray(act_scale, jnp.float32))

  def _quant_in(self, x):
    if self.act is None:
      return x
    scale = self.act_scale[...] if self.act.static else None
    return fake_quant_act(x, self.act, scale)

  def _quant_out(self, y):
    return y if self.kv is None else fake_quant_act(y, self.kv)


class SimLinear(_ActMixin, nnx.Module):
  """A float kernel behind fake-quantized inputs (and outputs, for K/V projections).

  Args:
    kernel: f[in, out] weight (already fake-quantized, or float during reconstruction).
    dtype: compute dtype.
    act, kv: input / output activation quantization (None: float).
    act_scale: the calibrated scale when `act.static`.
  """

  def __init__(self, kernel: jax.Array, *, dtype=jnp.float32, act: ActQuant | None = None,
               kv: ActQuant | None = None, act_scale=None):
    self.kernel = nnx.Param(jnp.asarray(kernel, jnp.float32))
    self.in_features, self.out_features = self.kernel.shape
    self.dtype = jnp.dtype(dtype)
    self._init_act(act, kv, act_scale)

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., in] -> [..., out]
    out_dtype = self.dtype if out_dtype is None else out_dtype
    x = self._quant_in(x)
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                preferred_element_type=jnp.float32)
    return self._quant_out(y).astype(out_dtype)


class IntLinear(_ActMixin, nnx.Module):
  """An integer weight `scale * (codes - zero)` stored as a qwix QArray.

  Args:
    codes, scale, zero: the weight in `jaxsun.quant.ptq.quantizers` conventions
      (codes [in, out], scale and zero f32[in // g, out]).
    scheme: its `IntScheme` (grid, activation and K/V quantization).
    dtype: compute dtype.
    act_scale: the calibrated scale for static activations.
    in_scale: optional f32[in] divisor of the inputs (AWQ, SmoothQuant): y = (x / s) @ W.
    kv: output quantization (the scheme's `kv` for K/V projections, else None).
  """

  def __init__(self, codes, scale, zero, scheme: IntScheme, *, dtype=jnp.float32,
               act_scale=None, in_scale=None, kv: ActQuant | None = None):
    qa = _qwix().to_qarray(jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(zero),
                                scheme.weight)
    self.qvalue = Codes(qa.qvalue)
    self.scale = nnx.Param(qa.scale)
    self.zero_point = None if qa.zero_point is None else Codes(qa.zero_point)
    self.in_scale = None if in_scale is None else nnx.Param(jnp.asarray(in_scale, jnp.float32))
    self.in_features, self.out_features = self.qvalue.shape
    self.weight_scheme = scheme.weight
    self.dtype = jnp.dtype(dtype)
    self._init_act(scheme.act, kv, act_scale)

  @property
  def qarray(self):
    """The weight as a qwix `QArray`."""
    zp = None if self.zero_point is None else self.zero_point[...]
    return _qwix().QArray(self.qvalue[...], self.scale[...], zp)

  def dequantized(self) -> jax.Array:
    """f32[in, out] weight."""
    import qwix  # pylint: disable=g-import-not-at-top
    return qwix.dequantize(self.qarray)

  def _int8_path(self) -> bool:
    a, w = self.act, self.weight_scheme
    return (a is not None and a.static and a.symmetric and a.bits == 8 and w.bits == 8
            and w.symmetric and w.group_size is None)

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., in] -> [..., out]
    out_dtype = self.dtype if out_dtype is None else out_dtype
    if self.in_scale is not None:
      x = x.astype(jnp.float32) / self.in_scale[...]
    if self._int8_path():  # W8A8: int8 x int8 -> int32 (qwix.dot_general's fast path)
      qx = _qwix().quantize_static(x, self.act_scale[...])
      y = _qwix().qdot(qx, self.qarray)
    else:
      y = _qwix().qdot(self._quant_in(x).astype(jnp.float32), self.qarray)
    return self._quant_out(y).astype(out_dtype)


class BCQLinear(_ActMixin, nnx.Module):
  """A binary-coding weight `sum_i alpha_i b_i + offset` (per group and column).

  Args:
    weight: a `jaxsun.quant.ptq.bcq.BCQWeight`.
    dtype: compute dtype.
    act, kv, act_scale: activation quantization as in `SimLinear`.
    in_scale: optional f32[in] input divisor (a converted AWQ / SmoothQuant weight).
    backend: "reference" (the jnp bit-plane matmul) or a `pallas_kernels.bcq_gemm`
      backend ("auto" picks per platform and shape; the reference where in or the group
      size is not a multiple of 32, which the kernels' packing needs).
  """

  def __init__(self, weight: bcq_lib.BCQWeight, *, dtype=jnp.float32,
               act: ActQuant | None = None, kv: ActQuant | None = None, act_scale=None,
               in_scale=None, backend: str = "auto"):
    self.b = Codes(jnp.asarray(weight.b, jnp.int8))
    self.alpha = nnx.Param(jnp.asarray(weight.alpha, jnp.float32))
    self.offset = nnx.Param(jnp.asarray(weight.offset, jnp.float32))
    self.in_scale = None if in_scale is None else nnx.Param(jnp.asarray(in_scale, jnp.float32))
    _, self.in_features, self.out_features = self.b.shape
    self.dtype = jnp.dtype(dtype)
    self.backend = backend
    self._init_act(act, kv, act_scale)

  @property
  def weight(self) -> bcq_lib.BCQWeight:
    return bcq_lib.BCQWeight(self.b[...], self.alpha[...], self.offset[...])

  def dequantized(self) -> jax.Array:
    return bcq_lib.dequantize(self.weight)

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., in] -> [..., out]
    out_dtype = self.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    if self.in_scale is not None:
      x = x.astype(jnp.float32) / self.in_scale[...]
    x2 = self._quant_in(x).astype(jnp.float32).reshape(-1, self.in_features)
    y = bcq_matmul(x2, self.weight, backend=self.backend)
    return self._quant_out(y.reshape(*lead, self.out_features)).astype(out_dtype)


def bcq_matmul(x: jax.Array, w: bcq_lib.BCQWeight, backend: str = "auto") -> jax.Array:
  """f32[M, N] = x @ W_hat for a BCQ weight, by the reference or the Pallas kernel."""
  from pallas_kernels import bcq_gemm  # pylint: disable=g-import-not-at-top
  k = w.b.shape[1]
  # The kernels pack 32 codes per word and keep a word inside one group.
  packable = k % 32 == 0 and w.group_size % 32 == 0
  if backend == "reference" or (backend == "auto" and not packable):
    return bcq_lib.bcq_matmul_reference(x, w)
  return bcq_gemm.bcq_matmul(x, bcq_gemm.pack(w.b, w.alpha, w.offset), backend=backend)


def uniform_to_bcq_linear(layer: IntLinear, backend: str = "auto") -> BCQLinear:
  """The exact BCQ form of an integer layer (UniQuanF's unification theorem)."""
  ws = layer.weight_scheme
  shift = 0 if ws.symmetric else 2 ** (ws.bits - 1)
  codes = layer.qvalue[...].astype(jnp.int32) + shift
  zero = (jnp.zeros_like(layer.scale[...]) if layer.zero_point is None
          else layer.zero_point[...].astype(jnp.float32) + shift)
  if ws.symmetric:  # codes in [-2^(b-1), 2^(b-1)): shift to unsigned, zero by the same
    codes, zero = codes + 2 ** (ws.bits - 1), zero + 2 ** (ws.bits - 1)
  w = bcq_lib.uniform_to_bcq(codes, layer.scale[...], zero, ws.bits,
                             ws.group(layer.in_features))
  act_scale = getattr(layer, "act_scale", None)
  return BCQLinear(w, dtype=layer.dtype, act=layer.act, kv=layer.kv,
                   act_scale=None if act_scale is None else act_scale[...],
                   in_scale=None if layer.in_scale is None else layer.in_scale[...],
                   backend=backend)


def int_linear_from_weight(w: jax.Array, scheme: IntScheme, **kw) -> IntLinear:
  """RTN-quantized `IntLinear` of a float kernel f[in, out] (a convenience for tests)."""
  scale, zero = quantizers.rtn_params(w, scheme.weight)
  codes = quantizers.quantize(w, scale, zero, scheme.weight)
  return IntLinear(codes, scale, zero, scheme, **kw)
