"""UniQuanF: a learnable weight quantizer unifying uniform (UQ) and binary-coding (BCQ)
quantization (Park et al., ACL 2025; papers.md §5), as pure jnp functions.

Layout as in `quantizers.py`: a kernel `W: f32[in, out]` (y = x @ W); "per row" in the
paper is per output column here, and groups are `g` consecutive input rows of a column,
so per-group arrays are `f32[in // g, out]` (`g = in` per channel). With n = bits and
c = (2^n - 1) / 2 the quantizer is D(M(T(w))):

    T: w~ = w / exp(δ1 + δ2 + δ3) + z          δ1 = log s, δ2 per weight, δ3 per group
    M: u  = w~ - shift - c;  q = L[idx],  L = sorted { Σ_i α_i β_i : β ∈ {±1}^n }
    D: Ŵ  = (q + shift + c - z) · exp(δ1)

    cfg = UniQuanFConfig(bits=4, group_size=128)
    params, state = uniquanf_init(w, cfg)               # unified init + alternating refine
    w_hat, state = uniquanf_quant(w, params, state, cfg, step)   # inside a jitted step
    packed = uniquanf_export(w, params, state, cfg)     # a plain bcq.BCQWeight

The mapping picks `idx` (the rank of the level in ascending order): "direct" = nearest
level; "local" = best of idx_prev + {-1, 0, +1}; "periodic" = nearest, recomputed only on
steps with step % period == 0 (else idx_prev is reused); "lpmapping" = local + periodic.
Levels are sorted every call, so neighbouring ranks are neighbouring levels whatever α
does during training (the official code indexes the unsorted Cartesian table, which is
only ordered while α stays "binary-ordered").

Rounding uses the straight-through estimator: the forward value is q, the backward has
dq/dw~ = 1 and q = Σ_i α_i β_i differentiable in α. Gradient filtering blocks both paths
for a weight whose |u - q| exceeds min_i |α_i| (as the official `bcq_round_ste`).

Unification theorem: Ŵ = Σ_i (s α_i) β_i + s (shift + c - z), i.e. an ordinary BCQ weight
with scales s·α_i and one offset per group, so `uniquanf_export` is exact and free.

Differences from the official PyTorch code (github.com/snudm-starlab/UniQuanF):
* `shift` is a trainable parameter (label "b"); the official `bcq_shift` stays at its
  initial value. Freeze it with a zero learning rate if the official behaviour is wanted.
* The min-max grid does not force 0 into the range and keeps z as a float (as the
  official code); it equals `quantizers.py`'s RTN grid only where z is an integer.
* The refinement reuses `bcq.bcq_alternating`, whose least-squares step solves α and the
  offset jointly (the official code solves α, then sets shift to the mean residual) and
  whose codes are greedy above 4 bits; the final codes are always the nearest level.
* No clipping-ratio grid search (the official G = 1 default is plain min-max).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsun.quant.ptq import bcq as bq
from jaxsun.quant.ptq.quantizers import _MIN_SCALE, _check_weight, _expand

MAPPINGS = ("direct", "local", "periodic", "lpmapping")


class UniQuanFParams(NamedTuple):
  """UniQuanF's trainable parameters.

  Attributes:
    log_s: δ1 f32[in // g, out], log of the uniform scale s (init: asymmetric min-max).
    d2: δ2 f32[in, out], per-weight log divisor (init 0).
    d3: δ3 f32[in // g, out], per-group log divisor (init 0).
    alpha: f32[bits, in // g, out], BCQ scales in the centred, s-normalised domain.
    shift: f32[in // g, out], BCQ offset in that domain.
  """

  log_s: jax.Array
  d2: jax.Array
  d3: jax.Array
  alpha: jax.Array
  shift: jax.Array


class UniQuanFState(NamedTuple):
  """Non-trained quantizer state.

  Attributes:
    zero: f32[in // g, out], float zero point z = -min / s (not rounded).
    idx: i32[in, out], each weight's level rank (ascending) from the last mapping.
  """

  zero: jax.Array
  idx: jax.Array


@dataclasses.dataclass(frozen=True)
class UniQuanFConfig:
  """Static UniQuanF settings (defaults: the official `run.sh`, papers.md §5.3).

  Attributes:
    bits: binary codes per weight, in [1, 8].
    group_size: input rows per group within a column; None = per output channel. Must
      divide the input dimension (checked when applied).
    mapping: "direct" | "local" | "periodic" | "lpmapping".
    period: p, the remapping period of "periodic" / "lpmapping" (>= 1).
    alternating_rounds: T, alternating-update rounds of the unified initialisation.
    grad_filter: block gradients of weights farther than min|α| from their level.
  """

  bits: int = 4
  group_size: int | None = None
  mapping: str = "lpmapping"
  period: int = 2
  alternating_rounds: int = 15
  grad_filter: bool = True

  def __post_init__(self):
    def is_int(v):
      return isinstance(v, (int, np.integer)) and not isinstance(v, bool)
    if not is_int(self.bits) or not 1 <= self.bits <= 8:
      raise ValueError(f"UniQuanFConfig.bits={self.bits!r} must be an int in [1, 8]")
    if self.group_size is not None and (not is_int(self.group_size) or self.group_size < 1):
      raise ValueError(
          f"UniQuanFConfig.group_size={self.group_size!r} must be None or a positive int")
    if self.mapping not in MAPPINGS:
      raise ValueError(f"UniQuanFConfig.mapping={self.mapping!r} must be one of {MAPPINGS}")
    if not is_int(self.period) or self.period < 1:
      raise ValueError(f"UniQuanFConfig.period={self.period!r} must be a positive int")
    if not is_int(self.alternating_rounds) or self.alternating_rounds < 0:
      raise ValueError(f"UniQuanFConfig.alternating_rounds={self.alternating_rounds!r} "
                       "must be an int >= 0")
    if not isinstance(self.grad_filter, bool):
      raise ValueError(f"UniQuanFConfig.grad_filter={self.grad_filter!r} must be a bool")

  @property
  def centre(self) -> float:
    """c = (2^n - 1) / 2: the middle of the unsigned n-bit range."""
    return (2**self.bits - 1) / 2

  def group(self, d_in: int) -> int:
    """Rows per group for an input dimension `d_in`; raises if it does not divide."""
    g = d_in if self.group_size is None else self.group_size
    if d_in % g:
      raise ValueError(
          f"UniQuanFConfig.group_size={g} must divide the input dimension in={d_in}")
    return g


# --- levels and mappings ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sign_table(bits: int) -> np.ndarray:
  """f32[2^bits, bits]: every β ∈ {-1, +1}^bits (Cartesian order)."""
  return np.asarray(list(itertools.product((-1.0, 1.0), repeat=bits)), np.float32)


def _sorted_levels(alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Levels f32[L, G, out] ascending and their rows i32[L, G, out] in `_sign_table`."""
  table = jnp.asarray(_sign_table(alpha.shape[0]))  # f32[L, bits]
  raw = jnp.einsum("li,igo->lgo", table, alpha, precision=bq.HIGHEST)  # f32[L, G, out]
  order = jnp.argsort(raw, axis=0)  # i32[L, G, out]
  return jnp.take_along_axis(raw, order, axis=0), order


def levels(alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The 2^bits BCQ levels of each group, ascending, with their binary codes.

  Args:
    alpha: f32[bits, in // g, out] scales.

  Returns:
    (lv, codes): lv f32[2^bits, in // g, out] sorted ascending along axis 0, and
    codes i8[2^bits, bits, in // g, out] in {-1, +1} with lv[k] = Σ_i alpha[i] codes[k, i].
  """
  lv, order = _sorted_levels(alpha)
  codes = jnp.asarray(_sign_table(alpha.shape[0]))[order]  # f32[L, G, out, bits]
  return lv, jnp.moveaxis(codes, -1, 1).astype(jnp.int8)


def _per_weight(tab: jax.Array, idx: jax.Array) -> jax.Array:
  """tab[idx[r, o], r // g, o]: per-group table f[L, G, out] gathered at idx i32[in, out]."""
  n_groups, d_out = tab.shape[1:]
  ig = idx.reshape(n_groups, -1, d_out)  # i32[G, g, out]
  return jnp.take_along_axis(jnp.moveaxis(tab, 0, 1), ig, axis=1).reshape(idx.shape)


def _nearest(u: jax.Array, lv: jax.Array) -> jax.Array:
  """Direct mapping: rank i32[in, out] of the level nearest to u f32[in, out].

  Binary search over the midpoints of the sorted levels (log2(L) passes, no L-times
  larger intermediate, so 8 bits stays cheap); a tie goes to the lower level, as argmin.
  """
  n_groups, d_out = lv.shape[1:]
  mids = jnp.moveaxis((lv[1:] + lv[:-1]) / 2, 0, -1)  # f32[G, out, L - 1]
  ug = jnp.swapaxes(u.reshape(n_groups, -1, d_out), 1, 2)  # f32[G, out, g]
  search = jax.vmap(jax.vmap(functools.partial(jnp.searchsorted, side="left")))
  idx = search(mids, ug).astype(jnp.int32)  # i32[G, out, g]: midpoints strictly below u
  return jnp.swapaxes(idx, 1, 2).reshape(u.shape)


def _local(u: jax.Array, lv: jax.Array, idx_prev: jax.Array) -> jax.Array:
  """Local mapping: the best of idx_prev + {-1, 0, +1} (clipped); ties to the first."""
  cand = jnp.clip(idx_prev[None] + jnp.arange(-1, 2, dtype=jnp.int32)[:, None, None],
                  0, lv.shape[0] - 1)  # i32[3, in, out]
  err = jnp.abs(u[None] - jax.vmap(_per_weight, (None, 0))(lv, cand))  # f32[3, in, out]
  return jnp.take_along_axis(cand, jnp.argmin(err, axis=0)[None], axis=0)[0]


def _map(u: jax.Array, lv: jax.Array, idx_prev: jax.Array, cfg: UniQuanFConfig,
         step: jax.Array) -> jax.Array:
  """New level ranks i32[in, out] under cfg.mapping; `step` may be traced."""
  if cfg.mapping == "direct":
    return _nearest(u, lv)
  if cfg.mapping == "local":
    return _local(u, lv, idx_prev)
  if cfg.mapping == "periodic":
    fresh = _nearest
  else:
    fresh = functools.partial(_local, idx_prev=idx_prev)
  # lax.cond, not jnp.where: off-period steps skip the mapping work entirely.
  return jax.lax.cond(jnp.asarray(step, jnp.int32) % cfg.period == 0,
                      lambda: fresh(u, lv), lambda: idx_prev.astype(jnp.int32))


def _betas(order: jax.Array, idx: jax.Array, bits: int) -> jax.Array:
  """Binary codes f32[bits, in, out] of the levels of rank idx i32[in, out]."""
  rows = _per_weight(order, idx)  # i32[in, out], rows of the sign table
  return jnp.moveaxis(jnp.asarray(_sign_table(bits))[rows], -1, 0)


def _transform(w: jax.Array, params: UniQuanFParams, zero: jax.Array,
               g: int) -> jax.Array:
  """T: w~ = w / exp(δ1 + δ2 + δ3) + z, f32[in, out]."""
  log_div = _expand(params.log_s + params.d3, g) + params.d2  # f32[in, out]
  return w.astype(jnp.float32) / jnp.exp(log_div) + _expand(zero, g)


# --- init, forward, export --------------------------------------------------------------


def uniquanf_init(w: jax.Array, cfg: UniQuanFConfig,
                  refine: bool = True) -> tuple[UniQuanFParams, UniQuanFState]:
  """Unified initialisation: the uniform min-max grid, then (optionally) BCQ refinement.

  With alpha = [2^(n-2), ..., 2^-1] and shift = 0 the levels are ±1/2, ..., ±c, so the
  quantizer reproduces the asymmetric uniform grid s · (round(w / s + z) - z) exactly.
  `refine` then fits BCQ to the centred weights x = w / s + z - c with
  `bcq.bcq_alternating` (greedy residual binarisation, T rounds of least-squares
  alpha and shift given codes / nearest-level codes given scales), sorts |alpha|
  descending, re-maps every weight to its nearest level, and keeps, per group, whichever
  of the uniform start and the refined fit has the smaller squared error.

  Args:
    w: f32[in, out] kernel.
    cfg: settings (bits, group_size, alternating_rounds are used here).
    refine: False = the pure uniform start.

  Returns:
    (params, state) with state.idx the direct (nearest-level) mapping at `params`.
  """
  _check_weight(w)
  rounds = cfg.alternating_rounds if refine else None
  return _init(w, cfg.bits, cfg.group(w.shape[0]), rounds)


@functools.partial(jax.jit, static_argnames=("bits", "g", "rounds"))
def _init(w: jax.Array, bits: int, g: int,
          rounds: int | None) -> tuple[UniQuanFParams, UniQuanFState]:
  """`uniquanf_init` on the fields it uses (rounds None = no refinement), so that
  configs differing only in mapping / period / grad_filter share one compilation."""
  d_in, d_out = w.shape
  centre = (2**bits - 1) / 2
  wg = w.astype(jnp.float32).reshape(d_in // g, g, d_out)  # f32[G, g, out]
  lo, hi = jnp.min(wg, axis=1), jnp.max(wg, axis=1)  # f32[G, out]
  scale = jnp.maximum((hi - lo) / (2**bits - 1), _MIN_SCALE)
  zero = -lo / scale  # f32[G, out], float: w~ spans exactly [0, 2^n - 1]
  alpha = jnp.broadcast_to(
      (2.0 ** (bits - 2 - jnp.arange(bits, dtype=jnp.float32)))[:, None, None],
      (bits, d_in // g, d_out))  # f32[bits, G, out]
  params = UniQuanFParams(
      log_s=jnp.log(scale), d2=jnp.zeros((d_in, d_out), jnp.float32),
      d3=jnp.zeros_like(scale), alpha=alpha, shift=jnp.zeros_like(scale))
  x = _transform(w, params, zero, g) - centre  # f32[in, out], centred domain

  def fitted(p):
    """`p` as a BCQWeight over x with nearest-level codes."""
    lv, order = _sorted_levels(p.alpha)
    idx = _nearest(x - _expand(p.shift, g), lv)
    b = _betas(order, idx, bits).astype(jnp.int8)  # i8[bits, in, out]
    return bq.BCQWeight(b=b, alpha=p.alpha, offset=p.shift)

  if rounds is not None:
    fit = bq.bcq_alternating(x, bits, g, iters=rounds)
    # Sign flips and permutations of alpha leave the level set unchanged.
    cand = params._replace(alpha=-jnp.sort(-jnp.abs(fit.alpha), axis=0), shift=fit.offset)
    # pylint: disable-next=protected-access
    best = bq._keep_better(x.reshape(wg.shape), fitted(params), fitted(cand))
    params = params._replace(alpha=best.alpha, shift=best.offset)
  idx = _nearest(x - _expand(params.shift, g), _sorted_levels(params.alpha)[0])
  return params, UniQuanFState(zero=zero, idx=idx)


@functools.partial(jax.jit, static_argnames=("cfg",))
def uniquanf_quant(w: jax.Array, params: UniQuanFParams, state: UniQuanFState,
                   cfg: UniQuanFConfig,
                   step: jax.Array | int) -> tuple[jax.Array, UniQuanFState]:
  """UniQuanF fake-quantized weight (differentiable in `params` through the STE).

  Args:
    w: f32[in, out] kernel.
    params: trainable parameters.
    state: zero point and the previous step's level ranks.
    cfg: settings.
    step: i32 scalar, may be traced: "periodic" / "lpmapping" remap only when
      step % cfg.period == 0.

  Returns:
    (w_hat f32[in, out], new_state) with new_state.idx the ranks used for w_hat.
  """
  _check_weight(w)
  g, c = cfg.group(w.shape[0]), cfg.centre
  sg = jax.lax.stop_gradient
  wt = _transform(w, params, state.zero, g)  # f32[in, out], w~
  shift = _expand(params.shift, g)  # f32[in, out]
  u = wt - shift - c
  lv, order = _sorted_levels(params.alpha)  # f32[L, G, out], i32[L, G, out]
  idx = _map(sg(u), sg(lv), state.idx, cfg, step)  # i32[in, out]
  alpha = jnp.repeat(params.alpha, g, axis=1)  # f32[bits, in, out]
  # f32[in, out], differentiable in α
  q = jnp.sum(alpha * _betas(order, idx, cfg.bits), axis=0)
  if cfg.grad_filter:
    thres = _expand(jnp.min(jnp.abs(params.alpha), axis=0), g)  # f32[in, out]
    keep = jnp.abs(sg(u - q)) <= thres
    q, wt = jnp.where(keep, q, sg(q)), jnp.where(keep, wt, sg(wt))
  # Forward value q; backward dq/dw~ = 1 (the STE term is exactly 0 in the forward).
  w_int = q + shift + c + (wt - sg(wt))
  w_hat = (w_int - _expand(state.zero, g)) * _expand(jnp.exp(params.log_s), g)
  return w_hat, state._replace(idx=idx)


@functools.partial(jax.jit, static_argnames=("cfg", "use_state_idx"))
def uniquanf_export(w: jax.Array, params: UniQuanFParams, state: UniQuanFState,
                    cfg: UniQuanFConfig, use_state_idx: bool = False) -> bq.BCQWeight:
  """The trained quantizer as an ordinary BCQ weight (the unification theorem).

  alpha'_i = s · alpha_i and offset = s · (shift + c - z). By default the codes are the
  direct (nearest-level) mapping at the final params, because state.idx may be stale
  under "periodic" / "lpmapping"; the export then equals `uniquanf_quant`'s forward with
  cfg.mapping="direct". `use_state_idx=True` keeps state.idx instead (reproducing the
  last training forward exactly).

  Args:
    w: f32[in, out] kernel (the original weight the params were trained for).
    params, state: the trained quantizer.
    cfg: settings.
    use_state_idx: take codes from state.idx rather than remapping.

  Returns:
    A `bcq.BCQWeight` (b i8[bits, in, out], alpha f32[bits, in // g, out],
    offset f32[in // g, out]).
  """
  _check_weight(w)
  g = cfg.group(w.shape[0])
  lv, order = _sorted_levels(params.alpha)
  if use_state_idx:
    idx = state.idx
  else:
    u = _transform(w, params, state.zero, g) - _expand(params.shift, g) - cfg.centre
    idx = _nearest(u, lv)
  s = jnp.exp(params.log_s)  # f32[G, out]
  b = _betas(order, idx, cfg.bits).astype(jnp.int8)  # i8[bits, in, out]
  return bq.BCQWeight(b=b, alpha=s[None] * params.alpha,
                      offset=s * (params.shift + cfg.centre - state.zero))


def num_params(params: UniQuanFParams) -> int:
  """Trainable scalars: in·out + (bits + 3)·(in/g)·out."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def param_labels(params: UniQuanFParams) -> UniQuanFParams:
  """optax.multi_transform labels: "u" for δ1, δ2, δ3 (official u_lr 5e-3), "b" for
  alpha and shift (b_lr 5e-4)."""
  del params  # the labels depend only on the structure
  return UniQuanFParams(log_s="u", d2="u", d3="u", alpha="b", shift="b")
