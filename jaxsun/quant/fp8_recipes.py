"""FP8 inference recipes: scale granularity x E4M3 range x accumulation, simulated in jnp.

    recipe = Fp8Recipe("block128", "e4m3_g2", acc_mantissa_bits=14, promote_every=4)
    y = recipe_dot(x, w, recipe)             # f32[M, N] ~= x @ w through FP8 operands
    fp8_model = apply_recipe(model, recipe)  # a copy: attention / MLP Linears run the recipe

The FP8 inference paper (papers.md §7) argues that FP8 is not one format but a family
of recipes that differ across accelerators: how scales are shared, which E4M3 range the
hardware has (OCP's +-448, Gaudi 2's +-240) and how the tensor cores accumulate. This
module makes each choice a field, so a study can sweep them on one model.

Granularities (activations x: [M, K] (M tokens), weights w: [K, N]), in the scale
shapes of `pallas_kernels.fp8_matmul`:

    "tensor"      sa f32[1, 1]        sb f32[1, 1]
    "row"         sa f32[M, 1]        sb f32[1, 1]        per token
    "channel"     sa f32[1, 1]        sb f32[1, N]        per output channel
    "rowchannel"  sa f32[M, 1]        sb f32[1, N]        `Fp8Linear`'s "current" recipe
    "block128"    sa f32[M, K/128]    sb f32[K/128, N/128] 1x128 tiles, 128x128 blocks

Block scales need K and N to be multiples of 128; other shapes are padded with zeros
(a zero adds nothing to a block's amax or to a K sum, as the kernels pad), so a 64-wide
layer has one 64x64 "block". Scales are current (this call's own amax), applied to the
activations of one forward call (all rows of the batch) and to the weights in the compute
dtype (a BF16 model's weights, as a served checkpoint would hold them).

Accumulation (`fp8_dot_sim`, the jnp twin of `fp8_matmul_pallas`'s model): K runs in
steps of `step_k` (32: one Hopper FP8 wgmma); each step's float32 product (block scales:
multiplied by its blocks' scales) is added to an inner accumulator that keeps only
`acc_mantissa_bits` mantissa bits (truncation after every add; Hopper's is reported at
about 14), and the inner accumulator is promoted (added to a float32 total and cleared)
every `promote_every` steps (None: once, at the end of K; DeepSeek-V3 promotes every 128
K elements, `promote_every=4` at `step_k=32`). `acc_mantissa_bits=None` accumulates in
float32 (the reference: dequantize, multiply at HIGHEST precision).

`Fp8Recipe`'s fields have no `Fp8Scheme` counterpart (`jaxsun.quant.api` takes a mode,
"current" or "delayed"), so `apply_recipe` swaps layers with `jaxsun.nn.layers.swap_linears`
(the way `Fp8Linear`s are put into a model) rather than through a quantization rule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxsun.nn import layers
from jaxsun.quant import fp8
from pallas_kernels.fp8_matmul import kernel as fm

GRANULARITIES = ("tensor", "row", "channel", "rowchannel", "block128")
# granularity -> (activation block name, weight block name) of `fp8.block_for`.
_BLOCKS = {"tensor": ("tensor", "tensor"), "row": ("row", "tensor"),
           "channel": ("tensor", "column"), "rowchannel": ("row", "column"),
           "block128": ("block128", "block128")}
FP8_LAYERS = r"(.*/)?(attn|mlp)/.+"  # every attention and MLP projection (as `Fp8Linear`)
SCALE_BLOCK = fm.SCALE_BLOCK
HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
  """One FP8 inference recipe (see the module docstring).

  Attributes:
    granularity: one of `GRANULARITIES`.
    fmt: an `fp8.FP8_FORMATS` name: "e4m3" (OCP, +-448), "e4m3_g2" (Gaudi 2, +-240),
      "e5m2".
    acc_mantissa_bits: mantissa bits of the inner accumulator (None: float32).
    promote_every: K steps per promotion to float32 (None: all of K in one inner sum).
      Ignored when `acc_mantissa_bits` is None.
    step_k: K elements per accumulation step (a divisor of 128 for block scales).
  """

  granularity: str = "rowchannel"
  fmt: str = "e4m3"
  acc_mantissa_bits: int | None = None
  promote_every: int | None = None
  step_k: int = 32

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"Fp8Recipe.granularity={self.granularity!r} is not one of "
                       f"{GRANULARITIES}")
    fp8.get_format(self.fmt)
    bits = self.acc_mantissa_bits
    if bits is not None and (not isinstance(bits, int) or not 1 <= bits <= 23):
      raise ValueError(f"Fp8Recipe.acc_mantissa_bits={bits!r} must be None or an int in "
                       "[1, 23]")
    p = self.promote_every
    if p is not None and (not isinstance(p, int) or p < 1):
      raise ValueError(f"Fp8Recipe.promote_every={p!r} must be None or an int >= 1")
    if not isinstance(self.step_k, int) or self.step_k < 1:
      raise ValueError(f"Fp8Recipe.step_k={self.step_k!r} must be a positive int")
    if self.granularity == "block128" and SCALE_BLOCK % self.step_k:
      raise ValueError(f"Fp8Recipe.step_k={self.step_k} must divide {SCALE_BLOCK} for "
                       "block scales (a step must not straddle two scale blocks)")

  @property
  def accumulation(self) -> str:
    """"f32", "promote<n>" or "promoteK" (one inner sum over all of K)."""
    if self.acc_mantissa_bits is None:
      return "f32"
    return "promoteK" if self.promote_every is None else f"promote{self.promote_every}"

  @property
  def label(self) -> str:
    acc = self.accumulation
    if acc != "f32":
      acc = f"{acc}@{self.acc_mantissa_bits}b/{self.step_k}"
    return f"{self.granularity}:{self.fmt}:{acc}"


def parse_accumulation(name: str, *, mantissa_bits: int, step_k: int = 32) -> dict:
  """Fp8Recipe fields of an accumulation name: "f32", "promote<n>" (n >= 1), "promoteK"."""
  if name == "f32":
    return dict(acc_mantissa_bits=None, promote_every=None, step_k=step_k)
  if name == "promoteK":
    return dict(acc_mantissa_bits=mantissa_bits, promote_every=None, step_k=step_k)
  if name.startswith("promote") and name[len("promote"):].isdigit() \
      and int(name[len("promote"):]) >= 1:
    return dict(acc_mantissa_bits=mantissa_bits, promote_every=int(name[len("promote"):]),
                step_k=step_k)
  raise ValueError(f"accumulation {name!r} must be 'f32', 'promote<n>' (n >= 1) or "
                   "'promoteK'")


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def quantize_operands(x: jax.Array, w: jax.Array, granularity: str,
                      fmt: str | fp8.Fp8Format):
  """(qa f8[M, K'], sa, qb f8[K', N'], sb) of x: f[M, K] and w: f[K, N].

  Scales as in `pallas_kernels.fp8_matmul` (module docstring). Block scales pad K and N
  to multiples of 128 (K' and N'; the caller slices the product to [:, :N]).
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity={granularity!r} is not one of {GRANULARITIES}")
  fmt = fp8.get_format(fmt)
  (m, k), n = x.shape, w.shape[1]
  if w.shape[0] != k:
    raise ValueError(f"x is [M, K] = {x.shape} but w is {w.shape}, not [K, N]")
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  if granularity == "block128":
    kp, np_ = _round_up(k, SCALE_BLOCK), _round_up(n, SCALE_BLOCK)
    x = jnp.pad(x, ((0, 0), (0, kp - k)))  # f32[M, K']
    w = jnp.pad(w, ((0, kp - k), (0, np_ - n)))  # f32[K', N']
  act, wgt = _BLOCKS[granularity]
  qa, sa = fp8.quantize(x, fmt, block=fp8.block_for(act, x.shape, operand="lhs"))
  qb, sb = fp8.quantize(w, fmt, block=fp8.block_for(wgt, w.shape, operand="rhs"))
  return qa, sa, qb, sb


def _truncate(x: jax.Array, bits: int | None) -> jax.Array:
  """float32 values with `bits` mantissa bits kept (truncation toward zero)."""
  if bits is None or bits >= 23:
    return x
  mask = jnp.uint32((0xFFFFFFFF << (23 - bits)) & 0xFFFFFFFF)
  return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.uint32) & mask,
                                  jnp.float32)


def fp8_dot_sim(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array, *,
                acc_mantissa_bits: int | None = None, promote_every: int | None = None,
                step_k: int = 32) -> jax.Array:
  """f32[M, N] = (qa * sa) @ (qb * sb) with the accumulation model (module docstring).

  The same operands, scales and accumulation as `fm.fp8_matmul_pallas(qa, sa, qb, sb,
  tiles=Tiles(block_k=step_k), promote_every=..., acc_mantissa_bits=...)` (a test
  compares them): tensor and row/column scales multiply the float32 total once (they
  factor out of the K sum), block scales each step's product.

  Args:
    qa: f8[M, K]; qb: f8[K, N].
    sa, sb: scales whose shapes select tensor / row-column / block scaling.
    acc_mantissa_bits: inner accumulator mantissa bits (None: float32, no steps).
    promote_every: steps per promotion (None: all steps in one inner sum).
    step_k: K elements per step; K is zero-padded to a multiple of it.
  """
  mode = fm.scale_mode(qa, sa, qb, sb)
  if acc_mantissa_bits is None:
    return fm.fp8_matmul_reference(qa, sa, qb, sb)
  (m, k), n = qa.shape, qb.shape[1]
  if mode == "block" and SCALE_BLOCK % step_k:
    raise ValueError(f"step_k={step_k} must divide {SCALE_BLOCK} for block scales")
  n_steps = _round_up(k, step_k) // step_k
  promote = n_steps if promote_every is None else promote_every
  a = jnp.pad(qa.astype(jnp.float32), ((0, 0), (0, n_steps * step_k - k)))
  b = jnp.pad(qb.astype(jnp.float32), ((0, n_steps * step_k - k), (0, 0)))
  a = a.reshape(m, n_steps, step_k).transpose(1, 0, 2)  # f32[S, M, step]
  b = b.reshape(n_steps, step_k, n)  # f32[S, step, N]
  if mode == "block":  # each step lies in one 128-wide K block: its scales
    blk = jnp.arange(n_steps) * step_k // SCALE_BLOCK
    sa_s = sa.astype(jnp.float32).T[blk][:, :, None]  # f32[S, M, 1]
    sb_s = jnp.repeat(sb.astype(jnp.float32)[blk], SCALE_BLOCK, axis=1)[:, None, :]
  else:  # f32[S, 1, 1]: unused
    sa_s = sb_s = jnp.ones((n_steps, 1, 1), jnp.float32)

  def step(carry, xs):
    part, total = carry  # f32[M, N] each
    i, a_i, b_i, sa_i, sb_i = xs
    p = jnp.dot(a_i, b_i, precision=HIGHEST, preferred_element_type=jnp.float32)
    if mode == "block":
      p = p * sa_i * sb_i
    part = _truncate(part + p, acc_mantissa_bits)
    done = ((i + 1) % promote == 0) | (i == n_steps - 1)
    total = jnp.where(done, total + part, total)
    return (jnp.where(done, 0.0, part), total), None

  zeros = jnp.zeros((m, n), jnp.float32)
  (_, total), _ = lax.scan(step, (zeros, zeros), (jnp.arange(n_steps), a, b, sa_s, sb_s))
  if mode != "block":
    total = total * sa.astype(jnp.float32) * sb.astype(jnp.float32)
  return total


def recipe_dot(x: jax.Array, w: jax.Array, recipe: Fp8Recipe) -> jax.Array:
  """f32[M, N] ~= x @ w: both operands quantized by `recipe`, multiplied by its model."""
  n = w.shape[1]
  qa, sa, qb, sb = quantize_operands(x, w, recipe.granularity, recipe.fmt)
  y = fp8_dot_sim(qa, sa, qb, sb, acc_mantissa_bits=recipe.acc_mantissa_bits,
                  promote_every=recipe.promote_every, step_k=recipe.step_k)
  return y[:, :n]


class Fp8RecipeLinear(nnx.Module):
  """y = x @ W through `recipe_dot`; shares the `Linear`'s kernel variable (no copy).

  The weights are cast to the layer's compute dtype before they are quantized, and the
  output is returned in it (a BF16 model with FP8 GEMMs).
  """

  def __init__(self, linear: layers.Linear, recipe: Fp8Recipe):
    self.in_features, self.out_features = linear.in_features, linear.out_features
    self.dtype = linear.dtype
    self.recipe = recipe
    self.kernel = linear.kernel

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., in] -> [..., out]
    out_dtype = self.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    w = self.kernel[...].astype(self.dtype)
    y = recipe_dot(x.reshape(-1, self.in_features).astype(self.dtype), w, self.recipe)
    return y.reshape(*lead, self.out_features).astype(out_dtype)


def with_compute_dtype(model, dtype: str):
  """A copy of a `jaxsun.Decoder` computing in `dtype` (same parameters, same storage)."""
  from jaxsun.nn.decoder import Decoder  # pylint: disable=g-import-not-at-top
  cfg = model.cfg.replace(compute_dtype=str(jnp.dtype(dtype)))
  new = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  nnx.update(new, nnx.state(model))  # the same (immutable) arrays: no copy
  return new


def apply_recipe(model: nnx.Module, recipe: Fp8Recipe, regex: str = FP8_LAYERS):
  """A copy of `model` whose `Linear`s matching `regex` (default: every attention and
  MLP projection) run `recipe`; the embedding and LM head stay in the compute dtype.
  A scanned `Decoder` is unstacked first (the copy has the unrolled layout)."""
  if not isinstance(recipe, Fp8Recipe):
    raise ValueError(f"recipe must be an Fp8Recipe, got {type(recipe).__name__}")
  if getattr(getattr(model, "cfg", None), "scan_layers", False):
    from jaxsun.nn import decoder  # pylint: disable=g-import-not-at-top
    model = decoder.unstack_layers(model)
  out = nnx.clone(model)
  n_before = sum(type(m) is layers.Linear for _, m in nnx.iter_modules(out))
  layers.swap_linears(out, regex, lambda lin: Fp8RecipeLinear(lin, recipe))
  n_after = sum(type(m) is layers.Linear for _, m in nnx.iter_modules(out))
  if n_after == n_before:
    raise ValueError(f"no Linear layer's path matches regex={regex!r}")
  return out
