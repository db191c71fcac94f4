"""AQLM-style codebook quantization of a linear layer, minimising its output error.

For a weight `W: [K, N]` and calibration inputs `X: [T, K]`, find codebooks, codes and
scales (`pallas_kernels.psumbook_gemm` format) minimising

    || X W - X W_hat ||^2  =  sum_n (w_n - w_hat_n)^T H (w_n - w_hat_n),   H = X^T X

1. **Scales**: the RMS of each group of g inputs of each output column.
2. **k-means initialisation** of the codebooks on the scaled v-long weight chunks
   (residual k-means for m > 1 additive codebooks), codes = nearest centroids.
3. Alternate, for `iterations` rounds:
   * **beam-search code updates**: one sweep over the input chunks; for each chunk and
     output, the m codes are searched codebook by codebook keeping the `beam` best
     partial choices, scored exactly with H (the change of the output error when this
     chunk's codes change, the rest held fixed), and never accepted if worse;
   * **Adam updates** of codebooks and scales (codes fixed) on the same objective.

`quantize_linear` returns the `QuantizedWeight` and the relative output error after
initialisation and after each round (it falls). `rtn_quantize` is round-to-nearest
scalar quantization at the same bits (b-bit symmetric levels, one scale per g inputs)
for comparison.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pallas_kernels.psumbook_gemm import (CodebookFormat, QuantizedWeight,
                                          dequantize_reference)

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
  """Settings of `quantize_linear`.

  Attributes:
    kmeans_iterations: Lloyd iterations of the codebook initialisation.
    iterations: rounds of (code sweep, Adam steps).
    beam: partial code combinations kept per chunk when m > 1.
    adam_steps: Adam steps on codebooks and scales per round.
    learning_rate: Adam learning rate (relative to the weights' scale: see below).
    damping: added to H's diagonal, as a fraction of its mean diagonal (keeps H
      positive definite when calibration inputs are few or correlated).
    seed: k-means initial centroids.
  """

  kmeans_iterations: int = 20
  iterations: int = 4
  beam: int = 4
  adam_steps: int = 50
  learning_rate: float = 1e-3
  damping: float = 1e-4
  seed: int = 0

  def __post_init__(self):
    for name in ("kmeans_iterations", "iterations", "beam", "adam_steps"):
      if getattr(self, name) < 0 or (name == "beam" and self.beam < 1):
        raise ValueError(f"QuantizerConfig.{name}={getattr(self, name)} is out of range")


def hessian(x: jax.Array, damping: float = 1e-4) -> jax.Array:
  """f32[K, K] = X^T X / T + damping * mean(diag) * I, from inputs f[..., K]."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  h = jnp.dot(x.T, x, precision=HIGHEST) / x.shape[0]
  return h + damping * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)


def output_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
  """Relative output error sum_n d_n^T H d_n / sum_n w_n^T H w_n (d = w - w_hat)."""
  d = (w - w_hat).astype(jnp.float32)
  num = jnp.sum(d * jnp.dot(h, d, precision=HIGHEST))
  den = jnp.sum(w * jnp.dot(h, w.astype(jnp.float32), precision=HIGHEST))
  return num / den


def _group_scales(w: jax.Array, g: int) -> jax.Array:
  k, n = w.shape
  rms = jnp.sqrt(jnp.mean(w.reshape(k // g, g, n) ** 2, axis=1))  # f32[K/g, N]
  return jnp.maximum(rms, 1e-8)


def _kmeans(points: jax.Array, c: int, iterations: int, key: jax.Array):
  """Lloyd's k-means; returns (centroids f32[c, v], assignment i32[P])."""
  init = jax.random.choice(key, points.shape[0], (c,), replace=points.shape[0] < c)
  centroids = points[init]

  def assign(cent):
    d = (jnp.sum(points ** 2, 1)[:, None] - 2 * jnp.dot(points, cent.T, precision=HIGHEST)
         + jnp.sum(cent ** 2, 1)[None, :])
    return jnp.argmin(d, axis=1)

  def step(cent, _):
    a = assign(cent)
    onehot = jax.nn.one_hot(a, c, dtype=jnp.float32)  # f32[P, c]
    counts = onehot.sum(0)
    sums = jnp.dot(onehot.T, points, precision=HIGHEST)
    # Empty clusters keep their centroid.
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], cent), None

  centroids, _ = jax.lax.scan(step, centroids, None, length=iterations)
  return centroids, assign(centroids).astype(jnp.int32)


def _chunks(w_scaled: jax.Array, v: int) -> jax.Array:
  """f32[K, N] -> f32[K/v * N, v]: the v-long column chunks, (j, n) major."""
  k, n = w_scaled.shape
  return w_scaled.reshape(k // v, v, n).transpose(0, 2, 1).reshape(-1, v)


def initialize(w: jax.Array, fmt: CodebookFormat, cfg: QuantizerConfig) -> QuantizedWeight:
  """Scales from group RMS, codebooks by (residual) k-means, codes by nearest centroid."""
  k, n = w.shape
  fmt.check_shape(k, n)
  w = w.astype(jnp.float32)
  scales = _group_scales(w, fmt.g)
  w_scaled = w / jnp.repeat(scales, fmt.g, axis=0)
  residual = _chunks(w_scaled, fmt.v)  # f32[P, v]
  books, codes = [], []
  keys = jax.random.split(jax.random.key(cfg.seed), fmt.m)
  for c in range(fmt.m):
    cent, assign = _kmeans(residual, fmt.num_centroids, cfg.kmeans_iterations, keys[c])
    books.append(cent)
    codes.append(assign.reshape(k // fmt.v, n))
    residual = residual - cent[assign]
  code_dtype = jnp.uint8 if fmt.b <= 8 else jnp.int32
  return QuantizedWeight(jnp.stack(books), jnp.stack(codes).astype(code_dtype), scales)


@functools.partial(jax.jit, static_argnames=("fmt", "beam"))
def code_sweep(w: jax.Array, h: jax.Array, q: QuantizedWeight, *, fmt: CodebookFormat,
               beam: int) -> QuantizedWeight:
  """One pass over the input chunks, updating each chunk's m codes for every output.

  For chunk j (rows J = j*v .. j*v+v-1) with the rest fixed, the output error changes
  by  -2 d^T (H r)_J + d^T H_JJ d  when the chunk's weights change by d (r = w - w_hat),
  so all 2**b candidates of a codebook are scored at once; codebooks are searched in
  turn with a beam of partial choices, and a chunk keeps its old codes unless the best
  found is strictly better.
  """
  cb, codes, scales = q
  cb = cb.astype(jnp.float32)
  k, n = w.shape
  m, c, v = cb.shape
  s_rows = jnp.repeat(scales.astype(jnp.float32), fmt.g, axis=0)  # f32[K, N]
  w_hat = dequantize_reference(q)
  r = w.astype(jnp.float32) - w_hat  # f32[K, N]
  hr = jnp.dot(h, r, precision=HIGHEST)  # f32[K, N]
  codes = codes.astype(jnp.int32)

  def chunk(j, carry):
    codes, r, hr = carry
    rows = j * v
    h_jj = jax.lax.dynamic_slice(h, (rows, rows), (v, v))  # f32[v, v]
    g = jax.lax.dynamic_slice(hr, (rows, 0), (v, n))  # f32[v, N]
    s = jax.lax.dynamic_slice(s_rows, (rows, 0), (1, n))[0]  # f32[N]
    old = jax.lax.dynamic_slice(codes, (0, j, 0), (m, 1, n))[:, 0, :]  # i32[m, N]
    old_vec = sum(cb[i][old[i]] for i in range(m))  # f32[N, v]: the chunk's centroid sum

    def score(vec):  # f32[..., N, v] candidate centroid sums -> f32[..., N] error change
      d = (vec - old_vec) * s[:, None]
      return (-2 * jnp.einsum("...nv,vn->...n", d, g)
              + jnp.einsum("...nv,vw,...nw->...n", d, h_jj, d))

    # Beam over codebooks: partial sums of the chosen centroids, [beam, N, v].
    partial = jnp.zeros((1, n, v), jnp.float32)
    chosen = jnp.zeros((1, m, n), jnp.int32)
    for i in range(m):
      rest = sum(cb[t][old[t]] for t in range(i + 1, m)) if i + 1 < m else 0.0
      cand = partial[:, None] + cb[i][None, :, None, :] + rest  # f32[beam, C, N, v]
      sc = score(cand).reshape(-1, n)  # f32[beam*C, N]
      keep = beam if i + 1 < m else 1
      top = jnp.argsort(sc, axis=0)[:keep]  # i32[keep, N]: best (beam, code) pairs
      b_idx, code = top // c, top % c
      partial = (jnp.take_along_axis(partial, b_idx[..., None], axis=0)
                 + cb[i][code])  # f32[keep, N, v]
      chosen = jnp.take_along_axis(chosen, b_idx[:, None, :], axis=0).at[:, i, :].set(code)
    best = chosen[0]  # i32[m, N]
    better = score(partial[0]) < 0  # strictly lower output error than the old codes
    new = jnp.where(better[None, :], best, old)
    new_vec = sum(cb[i][new[i]] for i in range(m))
    d = ((new_vec - old_vec) * s[:, None]).T  # f32[v, N]: change of w_hat's rows J
    r = jax.lax.dynamic_update_slice(r, jax.lax.dynamic_slice(r, (rows, 0), (v, n)) - d,
                                     (rows, 0))
    hr = hr - jnp.dot(jax.lax.dynamic_slice(h, (0, rows), (k, v)), d, precision=HIGHEST)
    codes = jax.lax.dynamic_update_slice(codes, new[:, None, :], (0, j, 0))
    return codes, r, hr

  codes, _, _ = jax.lax.fori_loop(0, k // v, chunk, (codes, r, hr))
  return QuantizedWeight(q.codebooks, codes.astype(q.codes.dtype), q.scales)


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate"))
def adam_update(w: jax.Array, h: jax.Array, q: QuantizedWeight, *, steps: int,
                learning_rate: float) -> QuantizedWeight:
  """`steps` Adam steps on codebooks and scales (codes fixed) on the output error."""
  tx = optax.adam(learning_rate)
  params = (q.codebooks.astype(jnp.float32), q.scales.astype(jnp.float32))

  def loss(p):
    return output_error(w, dequantize_reference(QuantizedWeight(p[0], q.codes, p[1])), h)

  def step(carry, _):
    p, state = carry
    grads = jax.grad(loss)(p)
    updates, state = tx.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return QuantizedWeight(params[0].astype(q.codebooks.dtype), q.codes,
                         params[1].astype(q.scales.dtype))


def quantize_linear(w: jax.Array, x: jax.Array, fmt: CodebookFormat,
                    cfg: QuantizerConfig = QuantizerConfig()
                    ) -> tuple[QuantizedWeight, list[float]]:
  """Quantizes `w: [K, N]` for inputs `x: [..., K]`; returns (weight, error history).

  The history holds the relative output error after initialisation and after each
  round; rounds never increase it by the code sweep, and Adam's steps are kept only if
  they lower it.
  """
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"w must be [K, N], got shape {w.shape}")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"x has {x.shape[-1]} features but w has K={w.shape[0]} inputs")
  h = hessian(x, cfg.damping)
  q = initialize(w, fmt, cfg)
  err = float(output_error(w, dequantize_reference(q), h))
  history = [err]
  for _ in range(cfg.iterations):
    q = code_sweep(w, h, q, fmt=fmt, beam=cfg.beam)
    if cfg.adam_steps:
      # Adam's step size is absolute: scale it to the weights' own magnitude.
      lr = cfg.learning_rate * float(jnp.sqrt(jnp.mean(w ** 2)))
      tuned = adam_update(w, h, q, steps=cfg.adam_steps, learning_rate=lr)
      if float(output_error(w, dequantize_reference(tuned), h)) < float(
          output_error(w, dequantize_reference(q), h)):
        q = tuned
    err = float(output_error(w, dequantize_reference(q), h))
    history.append(err)
  return q, history


def rtn_quantize(w: jax.Array, bits: int, group: int) -> jax.Array:
  """Round-to-nearest symmetric scalar quantization: 2**bits levels per group of inputs.

  Levels are (i + 0.5) * step for i in [-2**(bits-1), 2**(bits-1)), with one scale per
  `group` inputs of each output (bits + 16 / group bits per weight, as the codebook
  formats count). The step is chosen per group by a small grid search on the squared
  error, a fair (not a straw-man) baseline. Returns the dequantized f32[K, N].
  """
  w = jnp.asarray(w, jnp.float32)
  k, n = w.shape
  wg = w.reshape(k // group, group, n)
  half = 2 ** (bits - 1)
  amax = jnp.max(jnp.abs(wg), axis=1, keepdims=True)

  def quant(step):
    return jnp.clip(jnp.floor(wg / step), -half, half - 1) * step + 0.5 * step

  best, best_err = None, None
  for frac in np.linspace(0.2, 1.0, 17):
    step = jnp.maximum(amax * frac / half, 1e-12)
    q = quant(step)
    e = jnp.sum((q - wg) ** 2, axis=1, keepdims=True)
    best = q if best is None else jnp.where(e < best_err, q, best)
    best_err = e if best_err is None else jnp.minimum(e, best_err)
  return best.reshape(k, n)
