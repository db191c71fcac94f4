"""`Fp8Linear`: a drop-in `Linear` whose matmuls run on FP8 operands.

Two scaling modes (`ModelConfig.fp8`):

* "delayed" (training, TransformerEngine-style): activations and weights are quantized to
  E4M3 and the output gradient to E5M2, each with a per-tensor scale taken from an amax
  history of earlier steps. The histories and scales are `Fp8Meta` variables; their
  "gradient" is their next value (the overwrite-with-gradient convention of flax's
  `fp8_ops`), which `jaxsun.train.Trainer` writes back instead of optimizing, combining
  micro-batches with max under gradient accumulation.
* "current" (inference): per-token activation scales and per-output-channel weight scales
  computed from the tensors themselves, multiplied by `pallas_kernels.fp8_matmul`
  (its Hopper / Triton kernels on GPU, XLA's f8 `dot_general` elsewhere).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun.nn import layers
from jaxsun.nn.step_state import StepState
from jaxsun.quant import fp8
from pallas_kernels.fp8_matmul import fp8_matmul

FP8_MODES = ("none", "delayed", "current")
# The layers `ModelConfig.fp8` runs in FP8: every projection of attention and the MLP.
FP8_LAYERS = r"(.*/)?(attn|mlp)/.+"
HISTORY = 16
_E4M3 = fp8.FP8_FORMATS["e4m3"]
_E5M2 = fp8.FP8_FORMATS["e5m2"]


class Fp8Meta(StepState):
  """FP8 scaling state (amax history, scale): overwritten with its gradient, not trained."""

  combine = "max"  # micro-batches' amax histories combine with max


def _q(x: jax.Array, scale: jax.Array, fmt: fp8.Fp8Format) -> jax.Array:
  return jnp.clip(x.astype(jnp.float32) / scale, -fmt.max, fmt.max).astype(fmt.dtype)


def _next(history: jax.Array, scale: jax.Array, amax: jax.Array, fmt: fp8.Fp8Format):
  state = fp8.DelayedScaling(history, scale).update(amax, fmt)
  return state.history, state.scale


@jax.custom_vjp
def fp8_dot_delayed(x, w, x_hist, x_scale, w_hist, w_scale, g_hist, g_scale):
  """f32[M, N] = x @ w through E4M3 operands with delayed per-tensor scales.

  The cotangents of the six scaling arrays are their updated values (see the module
  docstring); x: f[M, K], w: f[K, N].
  """
  return _fwd(x, w, x_hist, x_scale, w_hist, w_scale, g_hist, g_scale)[0]


def _fwd(x, w, x_hist, x_scale, w_hist, w_scale, g_hist, g_scale):
  qx, qw = _q(x, x_scale, _E4M3), _q(w, w_scale, _E4M3)
  y = jnp.dot(qx, qw, preferred_element_type=jnp.float32) * (x_scale * w_scale)
  new_x = _next(x_hist, x_scale, jnp.max(jnp.abs(x)).astype(jnp.float32), _E4M3)
  new_w = _next(w_hist, w_scale, jnp.max(jnp.abs(w)).astype(jnp.float32), _E4M3)
  # Empty arrays carry the primal dtypes to the backward pass (residuals must be arrays).
  dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return y, (qx, qw, x_scale, w_scale, new_x, new_w, g_hist, g_scale, dtypes)


def _bwd(res, g):
  qx, qw, x_scale, w_scale, new_x, new_w, g_hist, g_scale, (x_like, w_like) = res
  x_dtype, w_dtype = x_like.dtype, w_like.dtype
  qg = _q(g, g_scale, _E5M2)
  dx = jnp.dot(qg, qw.T, preferred_element_type=jnp.float32) * (g_scale * w_scale)
  dw = jnp.dot(qx.T, qg, preferred_element_type=jnp.float32) * (x_scale * g_scale)
  new_g = _next(g_hist, g_scale, jnp.max(jnp.abs(g)).astype(jnp.float32), _E5M2)
  return (dx.astype(x_dtype), dw.astype(w_dtype), *new_x, *new_w, *new_g)


fp8_dot_delayed.defvjp(_fwd, _bwd)


def fp8_dot_current(x: jax.Array, w: jax.Array, out_dtype=jnp.float32) -> jax.Array:
  """x @ w with per-row (token) and per-column (channel) E4M3 current scaling."""
  qx, sx = fp8.quantize(x, _E4M3, block=(1, x.shape[1]))
  qw, sw = fp8.quantize(w, _E4M3, block=(w.shape[0], 1))
  return fp8_matmul(qx, sx, qw, sw, out_dtype=out_dtype)


class Fp8Linear(nnx.Module):
  """y = x @ W (no bias) with FP8 matmuls; W is f[in, out] as in `Linear`.

  Args:
    in_features, out_features, axes, std, param_dtype, dtype, rngs: as `Linear`.
    mode: "delayed" (training; Fp8Meta state) or "current" (inference).
    history: amax history length for delayed scaling.
  """

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *,
               std: float, param_dtype, dtype, rngs: nnx.Rngs, mode: str = "delayed",
               history: int = HISTORY):
    if mode not in ("delayed", "current"):
      raise ValueError(f"Fp8Linear mode={mode!r} must be 'delayed' or 'current'")
    self.in_features, self.out_features = in_features, out_features
    self.dtype = jnp.dtype(dtype)
    self.mode = mode
    self.kernel = layers.param(rngs, (in_features, out_features), axes, dtype=param_dtype,
                               std=std)
    for name in ("x", "w", "g"):
      setattr(self, f"{name}_history", Fp8Meta(jnp.zeros((history,), jnp.float32)))
      setattr(self, f"{name}_scale", Fp8Meta(jnp.ones((), jnp.float32)))

  @classmethod
  def from_linear(cls, linear: layers.Linear, *, mode: str = "delayed",
                  history: int = HISTORY) -> Fp8Linear:
    """An `Fp8Linear` sharing `linear`'s kernel variable (how the quantization rules
    build it: `jaxsun.quant.api`)."""
    d_in, d_out = linear.kernel.shape
    layer = nnx.eval_shape(lambda: cls(d_in, d_out, (None, None), std=1.0,
                                       param_dtype=linear.kernel.dtype, dtype=linear.dtype,
                                       rngs=nnx.Rngs(0), mode=mode, history=history))
    layer.kernel = linear.kernel
    for name in ("x", "w", "g"):
      setattr(layer, f"{name}_history", Fp8Meta(jnp.zeros((history,), jnp.float32)))
      setattr(layer, f"{name}_scale", Fp8Meta(jnp.ones((), jnp.float32)))
    return layer

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., in] -> [..., out]
    out_dtype = self.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, self.in_features)
    w = self.kernel[...]
    if self.mode == "current":
      y = fp8_dot_current(x2, w)
    else:
      y = fp8_dot_delayed(x2, w, self.x_history[...], self.x_scale[...],
                          self.w_history[...], self.w_scale[...], self.g_history[...],
                          self.g_scale[...])
    return y.reshape(*lead, self.out_features).astype(out_dtype)


def apply(module: nnx.Module, mode: str) -> nnx.Module:
  """Swaps every attention / MLP `Linear` under `module` for an `Fp8Linear`, in place.

  `ModelConfig.fp8` builds its blocks this way: the FP8 rule of `jaxsun.quant.api`
  (path `(.*/)?(attn|mlp)/.+`, `Fp8Scheme(mode)`), kept here so that FP8 models need
  nothing beyond jax and flax. The kernels are shared, not copied.
  """
  if mode not in FP8_MODES:
    raise ValueError(f"fp8 mode {mode!r} is not one of {FP8_MODES}")
  if mode == "none":
    return module
  return layers.swap_linears(module, FP8_LAYERS,
                             lambda m: Fp8Linear.from_linear(m, mode=mode))
