"""Everything jaxsun takes from qwix (google/qwix), in one place.

qwix is pinned (`qwix==0.1.8` in pyproject.toml and constraints.txt) because two of the
pieces used here are not in its public API: `HowToQuantize` (how GPTQ and AWQ are told
the grid) lives in `qwix._src.core.qarray`, and GPTQ / AWQ's per-weight functions live in
`qwix.contrib.*_core`. A qwix upgrade should only need this file changed.

Layouts: jaxsun kernels are `W: f[in, out]` (y = x @ W), grouped along `in`; qwix's
contrib algorithms take `W: f[out, in]`. The conversions live here too.

    to_qarray(codes, scale, zero, scheme)   a jaxsun uniform weight as a qwix QArray
    qdot(x, w)                               x @ w for QArray operands (qwix.dot_general)
    quantize_static(x, scale, bits)          per-tensor static activations as a QArray
    gptq(w, x, scheme) / awq(w, x, scheme)   qwix's GPTQ and AWQ, as baselines
    smoothquant_scales(x, w, alpha)          SmoothQuant's migration scales
"""

from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import qwix
from qwix._src.core import qarray as _qarray  # private: HowToQuantize (pinned qwix)
from qwix.contrib import awq_core, gptq_core, smooth_quant

from jaxsun.quant.ptq.quantizers import UniformScheme

QArray = qwix.QArray
QWIX_VERSION = qwix.__version__


def storage_dtype(bits: int):
  """qwix's native storage type for `bits`-bit codes: int4 up to 4 bits, else int8."""
  return jnp.int4 if bits <= 4 else jnp.int8


def _shift(scheme: UniformScheme) -> int:
  """Offset from jaxsun's unsigned asymmetric codes [0, 2^b - 1] to qwix's signed ones."""
  return 0 if scheme.symmetric else 2 ** (scheme.bits - 1)


def to_qarray(codes: jax.Array, scale: jax.Array, zero: jax.Array,
              scheme: UniformScheme) -> QArray:
  """A jaxsun uniform weight `scale * (codes - zero)` as a qwix `QArray`, exactly.

  Args:
    codes: [in, out] integer codes (uint8 asymmetric / int8 symmetric, as
      `jaxsun.quant.ptq.quantizers.quantize` returns).
    scale: f32[in // g, out].
    zero: f32[in // g, out], integer-valued (zeros when symmetric).
    scheme: the grid.

  Returns:
    QArray(qvalue int4/int8[in, out], scale f32[in // g, out], zero_point or None); its
    `qwix.dequantize` equals `quantizers.dequantize(codes, scale, zero, scheme)`.
  """
  dtype = storage_dtype(scheme.bits)
  shift = _shift(scheme)
  q = (codes.astype(jnp.int32) - shift).astype(dtype)
  zp = None if scheme.symmetric else (zero.astype(jnp.int32) - shift).astype(dtype)
  return QArray(q, scale.astype(jnp.float32), zp)


def qdot(x: jax.Array | QArray, w: QArray, out_dtype=jnp.float32) -> jax.Array:
  """[..., in] @ QArray[in, out] through `qwix.dot_general`.

  With a float `x` qwix dequantizes `w` and runs a float dot; with an int8 QArray `x`
  and a symmetric int8 `w` it is an int8 x int8 -> int32 dot (W8A8).
  """
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  return qwix.dot_general(x, w, dims, preferred_element_type=out_dtype)


def quantize_static(x: jax.Array, scale: jax.Array, bits: int = 8) -> QArray:
  """Symmetric per-tensor activations with a calibrated `scale` (W8A8), as a QArray."""
  qmax = 2 ** (bits - 1) - 1
  q = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -qmax - 1, qmax).astype(jnp.int8)
  return QArray(q, jnp.broadcast_to(scale.astype(jnp.float32), (1,) * x.ndim))


def _how(scheme: UniformScheme, d_in: int) -> _qarray.HowToQuantize:
  """qwix's grid for a jaxsun scheme on a transposed weight f[out, in]."""
  if not scheme.symmetric and scheme.bits not in (4, 8):
    raise ValueError(f"UniformScheme(bits={scheme.bits}, symmetric=False): qwix's GPTQ / "
                     f"AWQ support asymmetric grids only at 4 and 8 bits; use "
                     f"symmetric=True for {scheme.bits} bits")
  qtype = storage_dtype(scheme.bits) if scheme.bits in (4, 8) else f"int{scheme.bits}"
  g = scheme.group(d_in)
  return _qarray.HowToQuantize(
      qtype=qtype, channelwise_axes=(0,), tiled_axes={} if g == d_in else {1: g},
      calibration_method="absmax" if scheme.symmetric else "minmax")


def _from_transposed(qa: QArray, scheme: UniformScheme) -> tuple[jax.Array, ...]:
  """(codes, scale, zero) in jaxsun's layout from a QArray over f[out, in]."""
  shift = _shift(scheme)
  codes = (qa.qvalue.astype(jnp.int32).T + shift).astype(scheme.code_dtype)
  scale = qa.scale.T.astype(jnp.float32)  # f32[in // g, out]
  zero = (jnp.zeros_like(scale) if qa.zero_point is None
          else qa.zero_point.astype(jnp.float32).T + shift)
  return codes, jnp.broadcast_to(scale, zero.shape), zero


def gptq_scheme(scheme: UniformScheme) -> UniformScheme:
  """The grid `gptq` actually uses: `scheme` made symmetric (see `gptq`)."""
  return dataclasses.replace(scheme, symmetric=True)


@functools.partial(jax.jit, static_argnames=("scheme", "block_size", "damping"))
def gptq(w: jax.Array, x: jax.Array, scheme: UniformScheme, *, block_size: int = 128,
         damping: float = 0.01) -> tuple[jax.Array, jax.Array, jax.Array]:
  """qwix's GPTQ on a jaxsun kernel.

  qwix 0.1.8's GPTQ handles symmetric grids only (`gptq_core.quantize_weight` evaluates
  `zero_point and ...` on an array and fails for asymmetric ones), so an asymmetric
  `scheme` is run on its symmetric twin; the returned zero is then 0.

  Args:
    w: f32[in, out] kernel.
    x: f32[n, in] calibration inputs of the layer.
    scheme: the grid.
    block_size, damping: GPTQ's block and Hessian damping (GPTQ's defaults).

  Returns:
    (codes, scale, zero) in `jaxsun.quant.ptq.quantizers` conventions.
  """
  scheme = gptq_scheme(scheme)
  h = gptq_core.compute_hessian(x.astype(jnp.float32).T)  # f32[in, in]
  # qwix 0.1.8's GPTQ allocates its code buffer with `jnp.zeros_like(W, dtype=qtype)`,
  # which rejects the synthetic "int2" / "int3" qtypes that the rest of qwix (grids,
  # rounding) supports ("TODO: support synthetic qtype" there). During this trace only,
  # its `jnp` allocates such buffers in the storage type the rounding returns (int4).
  with mock.patch.object(gptq_core, "jnp", _SyntheticQtypeNumpy()):
    qa, _ = gptq_core.quantize_weight(w.astype(jnp.float32).T, h,
                                      _how(scheme, w.shape[0]),
                                      blocksize=min(block_size, w.shape[0]),
                                      percdamp=damping)
  return _from_transposed(qa, scheme)


class _SyntheticQtypeNumpy:
  """`jax.numpy` whose `zeros_like` maps qwix's synthetic "intN" qtypes to int4 / int8."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def zeros_like(a, dtype=None, **kwargs):
    if isinstance(dtype, str) and dtype.startswith("int") and dtype[3:].isdigit():
      dtype = storage_dtype(int(dtype[3:]))
    return jnp.zeros_like(a, dtype=dtype, **kwargs)


def awq(w: jax.Array, x: jax.Array, scheme: UniformScheme, *, n_grid: int = 20
        ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
  """qwix's AWQ: per-input-channel scales s searched on activation-weighted error.

  Returns:
    ((codes, scale, zero) of `W * s[:, None]`, s f32[in]); the layer computes
    `(x / s) @ dequantize(codes, scale, zero)`.
  """
  act = awq_core.compute_act_scale(x.astype(jnp.float32), axis=0)  # f32[in]
  qa, s = awq_core.quantize_weight(w.astype(jnp.float32).T, act, _how(scheme, w.shape[0]),
                                   n_grid=n_grid)
  return _from_transposed(qa, scheme), s.reshape(-1)


def smoothquant_scales(x: jax.Array, w: jax.Array, alpha: float = 0.5) -> jax.Array:
  """SmoothQuant's per-input-channel scales s = max|x|^alpha / max|w|^(1-alpha), f32[in].

  The layer computes `(x / s) @ (s[:, None] * W)`, moving activation outliers into the
  weights before both are quantized.
  """
  act = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=0)  # f32[in]
  wmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1)  # f32[in]
  return smooth_quant.compute_scales_ratio(act, jnp.maximum(wmax, 1e-8), alpha)
