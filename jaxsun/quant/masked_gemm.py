"""Masked GEMMs: training with every matmul's inputs in a simulated ExMy format.

"To FP8 and Back Again" (papers.md §8) relates reduced precision to training stability
by simulating narrower floats inside higher precision and applying them to GEMM inputs
("masked GEMMs"): *exponent masking* clamps values to the range of the narrower exponent,
*mantissa masking* zeroes low mantissa bits (truncation). Here each GEMM operand has its
own format, forward and backward:

    forward    y  = A(x) @ W(w)
    backward   dx = G(dy) @ W(w)^T,   dw = A(x)^T @ G(dy)

with A, W, G the `activation`, `weight` and `grad` formats (`jaxsun.quant.float_sim`:
exponent clamped with saturation, subnormals, mantissa rounded to nearest-even as
`lax.reduce_precision` does, or truncated as the paper's bit mask does). Values are
always clipped to +-max before rounding (a raw cast of 500.0 to float8_e4m3fn is NaN).

Scaling (`scale`): "none" masks the values as they are (the paper's masking); "current"
scales each operand per tensor so its absmax maps to the format's max (FP8 inference and
current-scaling training recipes); "delayed" takes each operand's per-tensor scale from
an amax history of earlier steps (TransformerEngine's recipe: `Fp8Meta` state in each
`MaskedLinear`, overwritten by the training step, as `jaxsun.nn.fp8_linear` does).

    cfg = MaskedGemm.parse("e8m3")                     # every operand E8M3, nearest
    cfg = MaskedGemm.parse("fp8_delayed")              # E4M3 fwd / E5M2 bwd, delayed
    cfg = MaskedGemm.parse("e5m7", attention=True)     # + attention's two products
    y = masked_dot(x, w, cfg)                          # custom VJP: both passes masked
    apply(model, cfg)                                  # projections -> MaskedLinear

Recipes (`RECIPES`): "fp8" (E4M3 activations and weights, E5M2 gradients, current
scaling), "fp8_delayed" (the same with delayed scaling) and "fp8_gaudi2" (E4M3 with Gaudi
2's +-240 range). The layers are FP8's (`jaxsun.nn.fp8_linear.FP8_LAYERS`: attention and
MLP projections); with `attention=True` the score (q k^T) and value (p v) products are
masked too, both operands in the activation format (current scaling when the recipe
scales: attention has no per-layer state here), which runs attention on its einsum path.
Embeddings and the LM head stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun.nn import layers
from jaxsun.nn.attention import Attention
from jaxsun.nn.fp8_linear import FP8_LAYERS, Fp8Meta
from jaxsun.quant import float_sim
from jaxsun.quant.float_sim import FloatFormat

MASKED_LAYERS = FP8_LAYERS
SCALINGS = ("none", "current", "delayed")
HISTORY = 16  # amax history length of delayed scaling (as `jaxsun.nn.fp8_linear`)
_NAMED = {"e4m3": float_sim.E4M3, "e4m3_gaudi2": float_sim.E4M3_IEEE,
          "e5m2": float_sim.E5M2, "bf16": float_sim.BF16}
# name -> (activation, weight, grad, scale)
RECIPES = {
    "fp8": (float_sim.E4M3, float_sim.E4M3, float_sim.E5M2, "current"),
    "fp8_delayed": (float_sim.E4M3, float_sim.E4M3, float_sim.E5M2, "delayed"),
    "fp8_gaudi2": (float_sim.E4M3_IEEE, float_sim.E4M3_IEEE, float_sim.E5M2, "current"),
}


def parse_format(name: str | FloatFormat | None, *, field: str = "format"
                 ) -> FloatFormat | None:
  """A `FloatFormat` from "e8m3" / "E4M7" / "e4m3" (OCP, max 448) / "e4m3_gaudi2" (max
  240) / "e5m2" / "bf16"; "fp32" / "none" / None: no masking."""
  if name is None or isinstance(name, FloatFormat):
    return name
  if not isinstance(name, str):
    raise ValueError(f"{field}={name!r} must be a format name such as 'e8m3'")
  key = name.lower()
  if key in ("fp32", "none", "f32"):
    return None
  if key in _NAMED:
    return _NAMED[key]
  m = re.fullmatch(r"e(\d)m(\d{1,2})", key)
  if m is None:
    raise ValueError(f"{field}={name!r} is not a format: use 'eXmY' (e.g. 'e8m3'), "
                     f"{', '.join(repr(k) for k in _NAMED)} or 'fp32'")
  try:
    return FloatFormat(int(m.group(1)), int(m.group(2)))
  except ValueError as e:
    raise ValueError(f"{field}={name!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class MaskedGemm:
  """Formats of a masked GEMM's operands (None: exact float32) and how they are scaled.

  Attributes:
    activation: format of the layer input x (forward and the weight gradient).
    weight: format of the kernel w (forward and the input gradient).
    grad: format of the output gradient dy (both backward GEMMs).
    rounding: "nearest" (ties to even, `lax.reduce_precision`) or "truncate" (mantissa
      bit mask, the paper's masking).
    scale: "none" (mask the values as they are: exponent clamping), "current" (per-tensor
      absmax scaling to the format's max) or "delayed" (per-tensor scales from an amax
      history of `history` earlier steps; `MaskedLinear` keeps the state).
    attention: also mask attention's q k^T and p v products (operands in `activation`,
      their output gradients in `grad`).
    history: amax history length for "delayed".
  """
  activation: FloatFormat | None = None
  weight: FloatFormat | None = None
  grad: FloatFormat | None = None
  rounding: str = "nearest"
  scale: str = "none"
  attention: bool = False
  history: int = HISTORY

  def __post_init__(self):
    for f in ("activation", "weight", "grad"):
      v = getattr(self, f)
      if v is not None and not isinstance(v, FloatFormat):
        raise ValueError(f"MaskedGemm.{f}={v!r} must be a FloatFormat or None "
                         "(MaskedGemm.parse takes names)")
    if self.rounding not in float_sim.ROUNDINGS:
      raise ValueError(f"MaskedGemm.rounding={self.rounding!r} is not one of "
                       f"{float_sim.ROUNDINGS}")
    if self.scale not in SCALINGS:
      raise ValueError(f"MaskedGemm.scale={self.scale!r} is not one of {SCALINGS}")
    if not isinstance(self.attention, bool):
      raise ValueError(f"MaskedGemm.attention={self.attention!r} must be a bool")
    if isinstance(self.history, bool) or not isinstance(self.history, int) or \
        self.history < 1:
      raise ValueError(f"MaskedGemm.history={self.history!r} must be an integer >= 1")

  @classmethod
  def parse(cls, name: str, *, activation: str | None = None, weight: str | None = None,
            grad: str | None = None, rounding: str = "nearest", scale: str | None = None,
            attention: bool = False, history: int = HISTORY) -> MaskedGemm:
    """Every operand in format `name` (or the recipe `name`, see `RECIPES`), unless
    `activation` / `weight` / `grad` / `scale` say otherwise; e.g. parse("e4m3",
    grad="e5m2", scale="current") is the "fp8" recipe."""
    if isinstance(name, str) and name.lower() in RECIPES:
      a, w, g, s = RECIPES[name.lower()]
    else:
      a = w = g = parse_format(name, field="format")
      s = "none"
    pick = lambda v, f, base: base if v is None else parse_format(v, field=f)
    return cls(activation=pick(activation, "activation", a),
               weight=pick(weight, "weight", w), grad=pick(grad, "grad", g),
               rounding=rounding, scale=s if scale is None else scale,
               attention=attention, history=history)

  @property
  def name(self) -> str:
    fmts = [f.name if f is not None else "F32" for f in (self.activation, self.weight,
                                                         self.grad)]
    if self.activation == float_sim.E4M3_IEEE:
      fmts[0] = fmts[1] = "E4M3g2"
    core = fmts[0] if len(set(fmts)) == 1 else "/".join(fmts)
    return core + ("-trunc" if self.rounding == "truncate" else "") + \
        ("" if self.scale == "none" else f"-{self.scale}") + \
        ("+attn" if self.attention else "")

  @property
  def is_identity(self) -> bool:
    return self.activation is None and self.weight is None and self.grad is None

  def einsum(self, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """f32 `einsum(spec, A(a), A(b))` whose VJP masks the output gradient with G: how
    attention's two products run when `attention` is set (`jaxsun.nn.attention`)."""
    return masked_einsum(spec, a, b, self)


def _round(x: jax.Array, fmt: FloatFormat, rounding: str, s=None) -> jax.Array:
  """`fmt`'s grid for x / s (clipped to +-max first), times s."""
  if s is None:
    return float_sim.simulate(jnp.clip(x, -fmt.max, fmt.max), fmt, rounding=rounding)
  return float_sim.simulate(jnp.clip(x / s, -fmt.max, fmt.max), fmt,
                            rounding=rounding) * s


def current_scale(x: jax.Array, fmt: FloatFormat) -> jax.Array:
  """f32[] per-tensor scale mapping absmax(x) to `fmt.max` (1 for an all-zero tensor)."""
  s = jnp.max(jnp.abs(x.astype(jnp.float32))) / fmt.max
  return jnp.where(jnp.isfinite(s) & (s > 0), s, 1.0)


def mask(x: jax.Array, fmt: FloatFormat | None, *, rounding: str = "nearest",
         scale: str = "none") -> jax.Array:
  """f32 `x` on `fmt`'s grid (None: unchanged); `scale="current"` scales per tensor to
  the format's max first (values are clipped to +-max before rounding either way)."""
  if scale not in ("none", "current"):
    raise ValueError(f"mask scale={scale!r} must be 'none' or 'current' (delayed scales "
                     "live in MaskedLinear)")
  x = x.astype(jnp.float32)
  if fmt is None:
    return x
  return _round(x, fmt, rounding, current_scale(x, fmt) if scale == "current" else None)


def _dot(a, b):
  return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)


def _stateless(cfg: MaskedGemm) -> str:
  return "current" if cfg.scale == "delayed" else cfg.scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked_dot(x, w, cfg):
  return _fwd(x, w, cfg)[0]


def _fwd(x, w, cfg):
  m = lambda v, f: mask(v, f, rounding=cfg.rounding, scale=_stateless(cfg))
  xq, wq = m(x, cfg.activation), m(w, cfg.weight)  # f32[M, K], f32[K, N]
  return _dot(xq, wq), (xq, wq)


def _bwd(cfg, res, g):
  xq, wq = res
  gq = mask(g, cfg.grad, rounding=cfg.rounding, scale=_stateless(cfg))  # f32[M, N]
  return _dot(gq, wq.T), _dot(xq.T, gq)


_masked_dot.defvjp(_fwd, _bwd)


def masked_dot(x: jax.Array, w: jax.Array, cfg: MaskedGemm) -> jax.Array:
  """f32[M, N] = A(x) @ W(w) for x f[M, K], w f[K, N]; the VJP masks dy with G.

  Stateless: `scale="delayed"` needs the amax histories of a `MaskedLinear`
  (`masked_dot_delayed`); called directly it scales like "current". The cotangents are
  computed in float32 (and cast to the primal dtypes by JAX).
  """
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"masked_dot needs x [M, K] and w [K, N], got {x.shape} and "
                     f"{w.shape}")
  if not isinstance(cfg, MaskedGemm):
    raise ValueError(f"cfg={cfg!r} must be a MaskedGemm")
  return _masked_dot(x, w, cfg)


# -- delayed scaling -------------------------------------------------------------------

def next_delayed(history: jax.Array, scale: jax.Array, step_amax: jax.Array,
                 fmt: FloatFormat | None) -> tuple[jax.Array, jax.Array]:
  """(history, scale) after a step: this step's amax is prepended to the history
  (newest first) and the next scale maps the history's max to `fmt.max`; a zero or
  non-finite history keeps the previous scale."""
  history = jnp.roll(history, 1).at[0].set(step_amax.astype(jnp.float32))
  if fmt is None:
    return history, scale
  new = jnp.max(history) / fmt.max
  return history, jnp.where(jnp.isfinite(new) & (new > 0), new, scale).astype(jnp.float32)


def _amax(v):
  return jnp.max(jnp.abs(v)).astype(jnp.float32)


def _mask_with(v, fmt, rounding, s):
  v = v.astype(jnp.float32)
  return v if fmt is None else _round(v, fmt, rounding, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def masked_dot_delayed(x: jax.Array, w: jax.Array, meta: tuple, cfg: MaskedGemm
                       ) -> jax.Array:
  """f32[M, N] = A(x / sx) sx @ W(w / sw) sw with delayed per-tensor scales.

  Args:
    x: f[M, K]; w: f[K, N].
    meta: (x_history f32[H], x_scale f32[], w_history, w_scale, g_history, g_scale);
      their cotangents are their next values (the `StepState` convention).
    cfg: the `MaskedGemm` (formats, rounding).
  """
  return _fwd_delayed(x, w, meta, cfg)[0]


def _fwd_delayed(x, w, meta, cfg):
  x_hist, x_scale, w_hist, w_scale, g_hist, g_scale = meta
  xq = _mask_with(x, cfg.activation, cfg.rounding, x_scale)  # f32[M, K]
  wq = _mask_with(w, cfg.weight, cfg.rounding, w_scale)      # f32[K, N]
  new_x = next_delayed(x_hist, x_scale, _amax(x), cfg.activation)
  new_w = next_delayed(w_hist, w_scale, _amax(w), cfg.weight)
  return _dot(xq, wq), (xq, wq, new_x, new_w, g_hist, g_scale)


def _bwd_delayed(cfg, res, g):
  xq, wq, new_x, new_w, g_hist, g_scale = res
  gq = _mask_with(g, cfg.grad, cfg.rounding, g_scale)  # f32[M, N]
  new_g = next_delayed(g_hist, g_scale, _amax(g), cfg.grad)
  return _dot(gq, wq.T), _dot(xq.T, gq), (*new_x, *new_w, *new_g)


masked_dot_delayed.defvjp(_fwd_delayed, _bwd_delayed)


# -- attention products ----------------------------------------------------------------

def _einsum(spec, a, b):
  return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _masked_einsum(spec, a, b, cfg):
  return _fwd_einsum(spec, a, b, cfg)[0]


def _fwd_einsum(spec, a, b, cfg):
  m = lambda v: mask(v, cfg.activation, rounding=cfg.rounding, scale=_stateless(cfg))
  aq, bq = m(a), m(b)
  return _einsum(spec, aq, bq), (aq, bq)


def _bwd_einsum(spec, cfg, res, g):
  aq, bq = res
  gq = mask(g, cfg.grad, rounding=cfg.rounding, scale=_stateless(cfg))
  _, vjp = jax.vjp(lambda u, v: _einsum(spec, u, v), aq, bq)
  return vjp(gq)


_masked_einsum.defvjp(_fwd_einsum, _bwd_einsum)


def masked_einsum(spec: str, a: jax.Array, b: jax.Array, cfg: MaskedGemm) -> jax.Array:
  """f32 einsum of two operands both in `cfg.activation` (attention's products: neither
  is a weight); the VJP masks the output gradient with `cfg.grad` and computes both
  operand gradients from the masked operands."""
  if not isinstance(cfg, MaskedGemm):
    raise ValueError(f"cfg={cfg!r} must be a MaskedGemm")
  return _masked_einsum(spec, a, b, cfg)


# -- layers ----------------------------------------------------------------------------

class MaskedLinear(nnx.Module):
  """y = A(x) @ W(w) with masked GEMMs forward and backward; W is f[in, out] as `Linear`.

  With `cfg.scale == "delayed"` it keeps the amax histories and scales of x, w and dy
  as `Fp8Meta` state (overwritten by each training step, like `Fp8Linear`'s).
  """

  def __init__(self, linear: layers.Linear, cfg: MaskedGemm):
    self.in_features, self.out_features = linear.in_features, linear.out_features
    self.dtype = linear.dtype
    self.kernel = linear.kernel  # shared, not copied
    self.cfg = cfg
    if cfg.scale == "delayed":
      for name in ("x", "w", "g"):
        setattr(self, f"{name}_history", Fp8Meta(jnp.zeros((cfg.history,), jnp.float32)))
        setattr(self, f"{name}_scale", Fp8Meta(jnp.ones((), jnp.float32)))

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., in] -> [..., out]
    out_dtype = self.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    x2, w = x.reshape(-1, self.in_features), self.kernel[...]
    if self.cfg.scale == "delayed":
      meta = tuple(getattr(self, f"{n}_{k}")[...] for n in ("x", "w", "g")
                   for k in ("history", "scale"))
      y = masked_dot_delayed(x2, w, meta, self.cfg)
    else:
      y = masked_dot(x2, w, self.cfg)
    return y.reshape(*lead, self.out_features).astype(out_dtype)


def apply(module: nnx.Module, cfg: MaskedGemm, layers_regex: str = MASKED_LAYERS
          ) -> nnx.Module:
  """Swaps every `Linear` under `module` whose path matches `layers_regex` (default: the
  attention and MLP projections) for a `MaskedLinear`, in place; kernels are shared.
  With `cfg.attention`, every attention module's score and value products are masked
  too (`Attention.gemm`)."""
  if not isinstance(cfg, MaskedGemm):
    raise ValueError(f"cfg={cfg!r} must be a MaskedGemm")
  if cfg.is_identity:
    return module
  if cfg.attention:
    for _, m in nnx.iter_modules(module):
      if isinstance(m, Attention):
        m.gemm = cfg
  return layers.swap_linears(module, layers_regex, lambda m: MaskedLinear(m, cfg))
