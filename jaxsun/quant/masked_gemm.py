"""Masked GEMMs: training with every projection's matmul inputs in a simulated ExMy format.

"To FP8 and Back Again" (papers.md §8) relates reduced precision to training stability
by simulating narrower floats inside higher precision and applying them to GEMM inputs
("masked GEMMs"): *exponent masking* clamps values to the range of the narrower exponent,
*mantissa masking* zeroes low mantissa bits (truncation). Here each GEMM operand has its
own format, forward and backward:

    forward    y  = A(x) @ W(w)
    backward   dx = G(dy) @ W(w)^T,   dw = A(x)^T @ G(dy)

with A, W, G the `activation`, `weight` and `grad` formats (`jaxsun.quant.float_sim`:
exponent clamped with saturation, subnormals, mantissa rounded to nearest-even as
`lax.reduce_precision` does, or truncated as the paper's bit mask does). `scale=True`
first scales each operand per tensor so its absmax maps to the format's max (as FP8
recipes do); the default `False` is the paper's masking of the values as they are.

    cfg = MaskedGemm.parse("e8m3")               # every operand E8M3, nearest
    cfg = MaskedGemm(activation=E4M3, weight=E4M3, grad=E5M2, scale=True)
    y = masked_dot(x, w, cfg)                      # custom VJP: both passes masked
    apply(model, cfg)                              # attention / MLP Linears -> MaskedLinear

The same layer set as FP8 (`jaxsun.nn.fp8_linear.FP8_LAYERS`); embeddings, the LM head
and the attention score / value products stay float32.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun.nn import layers
from jaxsun.nn.fp8_linear import FP8_LAYERS
from jaxsun.quant import float_sim
from jaxsun.quant.float_sim import FloatFormat

MASKED_LAYERS = FP8_LAYERS
_NAMED = {"e4m3": float_sim.E4M3, "e4m3_gaudi2": float_sim.E4M3_IEEE,
          "e5m2": float_sim.E5M2, "bf16": float_sim.BF16}


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
  """Formats of a masked GEMM's operands (None: exact float32).

  Attributes:
    activation: format of the layer input x (forward and the weight gradient).
    weight: format of the kernel w (forward and the input gradient).
    grad: format of the output gradient dy (both backward GEMMs).
    rounding: "nearest" (ties to even, `lax.reduce_precision`) or "truncate" (mantissa
      bit mask, the paper's masking).
    scale: per-tensor absmax scaling to the format's max before rounding (FP8 recipes);
      False masks the values as they are (exponent clamping).
  """
  activation: FloatFormat | None = None
  weight: FloatFormat | None = None
  grad: FloatFormat | None = None
  rounding: str = "nearest"
  scale: bool = False

  def __post_init__(self):
    for f in ("activation", "weight", "grad"):
      v = getattr(self, f)
      if v is not None and not isinstance(v, FloatFormat):
        raise ValueError(f"MaskedGemm.{f}={v!r} must be a FloatFormat or None "
                         "(MaskedGemm.parse takes names)")
    if self.rounding not in float_sim.ROUNDINGS:
      raise ValueError(f"MaskedGemm.rounding={self.rounding!r} is not one of "
                       f"{float_sim.ROUNDINGS}")
    if not isinstance(self.scale, bool):
      raise ValueError(f"MaskedGemm.scale={self.scale!r} must be a bool")

  @classmethod
  def parse(cls, name: str, *, activation: str | None = None, weight: str | None = None,
            grad: str | None = None, rounding: str = "nearest", scale: bool = False
            ) -> MaskedGemm:
    """Every operand in format `name`, unless `activation` / `weight` / `grad` name
    another; e.g. parse("e4m3", grad="e5m2", scale=True) is the FP8 recipe."""
    base = parse_format(name, field="format")
    pick = lambda v, f: base if v is None else parse_format(v, field=f)
    return cls(activation=pick(activation, "activation"), weight=pick(weight, "weight"),
               grad=pick(grad, "grad"), rounding=rounding, scale=scale)

  @property
  def name(self) -> str:
    fmts = [f.name if f is not None else "F32" for f in (self.activation, self.weight,
                                                         self.grad)]
    core = fmts[0] if len(set(fmts)) == 1 else "/".join(fmts)
    return core + ("-trunc" if self.rounding == "truncate" else "") + \
        ("-scaled" if self.scale else "")

  @property
  def is_identity(self) -> bool:
    return self.activation is None and self.weight is None and self.grad is None


def mask(x: jax.Array, fmt: FloatFormat | None, *, rounding: str = "nearest",
         scale: bool = False) -> jax.Array:
  """f32 `x` on `fmt`'s grid (None: unchanged). With `scale`, per-tensor absmax scaling
  to the format's max first (values are clipped to +-max before rounding either way)."""
  x = x.astype(jnp.float32)
  if fmt is None:
    return x
  if not scale:
    return float_sim.simulate(jnp.clip(x, -fmt.max, fmt.max), fmt, rounding=rounding)
  s = jnp.max(jnp.abs(x)) / fmt.max
  s = jnp.where(jnp.isfinite(s) & (s > 0), s, 1.0)
  return float_sim.simulate(jnp.clip(x / s, -fmt.max, fmt.max), fmt, rounding=rounding) * s


def _dot(a, b):
  return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _masked_dot(x, w, cfg):
  return _fwd(x, w, cfg)[0]


def _fwd(x, w, cfg):
  m = lambda v, f: mask(v, f, rounding=cfg.rounding, scale=cfg.scale)
  xq, wq = m(x, cfg.activation), m(w, cfg.weight)  # f32[M, K], f32[K, N]
  return _dot(xq, wq), (xq, wq)


def _bwd(cfg, res, g):
  xq, wq = res
  gq = mask(g, cfg.grad, rounding=cfg.rounding, scale=cfg.scale)  # f32[M, N]
  return _dot(gq, wq.T), _dot(xq.T, gq)


_masked_dot.defvjp(_fwd, _bwd)


def masked_dot(x: jax.Array, w: jax.Array, cfg: MaskedGemm) -> jax.Array:
  """f32[M, N] = A(x) @ W(w) for x f[M, K], w f[K, N]; the VJP masks dy with G.

  The cotangents are computed in float32 (and cast to the primal dtypes by JAX).
  """
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"masked_dot needs x [M, K] and w [K, N], got {x.shape} and "
                     f"{w.shape}")
  if not isinstance(cfg, MaskedGemm):
    raise ValueError(f"cfg={cfg!r} must be a MaskedGemm")
  return _masked_dot(x, w, cfg)


class MaskedLinear(nnx.Module):
  """y = A(x) @ W(w) with masked GEMMs forward and backward; W is f[in, out] as `Linear`."""

  def __init__(self, linear: layers.Linear, cfg: MaskedGemm):
    self.in_features, self.out_features = linear.in_features, linear.out_features
    self.dtype = linear.dtype
    self.kernel = linear.kernel  # shared, not copied
    self.cfg = cfg

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., in] -> [..., out]
    out_dtype = self.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    y = masked_dot(x.reshape(-1, self.in_features), self.kernel[...], self.cfg)
    return y.reshape(*lead, self.out_features).astype(out_dtype)


def apply(module: nnx.Module, cfg: MaskedGemm, layers_regex: str = MASKED_LAYERS
          ) -> nnx.Module:
  """Swaps every `Linear` under `module` whose path matches `layers_regex` (default: the
  attention and MLP projections) for a `MaskedLinear`, in place; kernels are shared."""
  if not isinstance(cfg, MaskedGemm):
    raise ValueError(f"cfg={cfg!r} must be a MaskedGemm")
  if cfg.is_identity:
    return module
  return layers.swap_linears(module, layers_regex, lambda m: MaskedLinear(m, cfg))
