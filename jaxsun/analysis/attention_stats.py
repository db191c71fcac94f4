"""Statistics of effective attention weights, for comparing attention variants.

Every function takes `w: f32[L, B, H, T, S]` (layers, batch, heads, queries, keys): the
*effective* weights a query mixes the values with, after everything the variant does
(softmax, the off-by-one / sink denominators, Affine-Scaled Attention's
alpha * softmax + beta). Attention is causal, so the caller's array holds 0 for every
key a query cannot see (s > t when S == T); nothing here re-applies a mask over keys.
An optional `valid: bool[B, T]` marks the real queries of a padded batch: every
average below runs over the valid queries only, so what a padded row holds never
matters.

Definitions (papers.md §2, the Affine-Scaled Attention analysis):

  * Normalised rows. Affine weights can be negative and need not sum to 1, so the
    distribution-valued measures (entropy, Jensen-Shannon divergence) use
    p[s] = |w[s]| / sum_s' |w[s']|. For a softmax row p == w, so they reduce to the
    usual definitions. A row whose |w| sums to 0 is taken as the all-zero vector
    (entropy 0), not NaN.
  * `attention_entropy`: -sum_s p log p (nats) per query; uniform attention over the
    t + 1 visible keys gives log(t + 1), one-hot attention gives 0.
  * `first_token_mass`: the raw (signed) weight on key 0, the usual "attention sink"
    position. Query 0 is left out: it sees only key 0, so its value says nothing
    about the variant (it is 1 for softmax). Key 0 is the first position of the
    array; in a left-padded batch that is a padding slot, not the first real token.
  * `query_mass`: the raw per-query total sum_s w[s]. 1 for softmax, < 1 for the
    off-by-one / sink denominators, alpha + beta (t + 1) for affine with N = "full".
  * `head_diversity`: how different the heads of a layer are, per query, averaged
    over the H (H - 1) / 2 head pairs and then over valid queries. "jsd" (default):
    the Jensen-Shannon divergence of the normalised rows, JSD(p, q) =
    H((p + q) / 2) - (H(p) + H(q)) / 2, in nats, in [0, log 2]. "cosine":
    1 - cos(w_i, w_j) of the raw signed rows (a row of zeros has cosine 0 with every
    row), in [0, 2]. Both are 0 when all heads are equal. With one head there is no
    pair: NaN.

The computations run in float32 under `jax.jit`, one layer at a time (`lax.map`), so
an array that lives on an accelerator is reduced there and peak memory is a few
copies of one layer's [B, H, T, S], not of all L layers. Results come back as NumPy
float32 arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

# Quantiles `query_mass` reports by default.
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DIVERSITY_METRICS = ("jsd", "cosine")


# --- input checks ------------------------------------------------------------------------


def _weights(w: Any) -> jax.Array:
  """f32[L, B, H, T, S] from a NumPy or JAX float array, with errors naming `w`."""
  if not hasattr(w, "shape") or not hasattr(w, "dtype"):
    w = np.asarray(w)
  if len(w.shape) != 5:
    raise ValueError("w must have shape [layers, batch, heads, queries, keys], got shape "
                     f"{tuple(w.shape)}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"w must be a float array, got dtype {w.dtype}")
  if 0 in w.shape:
    raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
  return jnp.asarray(w, jnp.float32)


def _valid(valid: Any, shape: tuple[int, ...]) -> jax.Array:
  """f32[B, T] query weights (1 = valid) for `w` of `shape`; all ones when None."""
  _, b, _, t, _ = shape
  if valid is None:
    return jnp.ones((b, t), jnp.float32)
  if not hasattr(valid, "shape") or not hasattr(valid, "dtype"):
    valid = np.asarray(valid)
  if tuple(valid.shape) != (b, t):
    raise ValueError(f"valid must have shape [batch, queries] = {(b, t)}, got "
                     f"{tuple(valid.shape)}")
  if not (jnp.issubdtype(valid.dtype, jnp.bool_) or jnp.issubdtype(valid.dtype, jnp.integer)):
    raise TypeError(f"valid must be a bool (or 0/1 integer) array, got dtype {valid.dtype}")
  q = jnp.asarray(valid) != 0
  if not bool(jnp.any(q)):
    raise ValueError("valid marks no query as valid; there is nothing to average over")
  return q.astype(jnp.float32)


# --- per-layer kernels (all under jit, mapped over the layer axis) --------------------


def _normalised(wl: jax.Array) -> jax.Array:
  """|w| / sum |w| over keys; rows of zeros stay zero."""
  a = jnp.abs(wl)
  z = jnp.sum(a, axis=-1, keepdims=True)
  return a / jnp.where(z > 0, z, 1.0)


def _entropy_rows(p: jax.Array) -> jax.Array:
  return -jnp.sum(xlogy(p, p), axis=-1)  # xlogy(0, 0) = 0: invisible keys add nothing


def _masked_mean(x: jax.Array, q: jax.Array) -> jax.Array:
  """Mean of x[..., B, T] over the valid (b, t)."""
  return jnp.einsum("...bt,bt->...", x, q) / jnp.sum(q)


@jax.jit
def _entropy(w: jax.Array, q: jax.Array) -> jax.Array:
  def layer(wl):  # f32[B, H, T, S] -> f32[H]
    ent = _entropy_rows(_normalised(wl))  # f32[B, H, T]
    return _masked_mean(jnp.swapaxes(ent, 0, 1), q)
  return jax.lax.map(layer, w)  # f32[L, H]


@jax.jit
def _first_token(w: jax.Array, q: jax.Array) -> jax.Array:
  q = q.at[:, 0].set(0.0)  # query 0 sees only key 0
  w0 = jnp.swapaxes(w[..., 0], 1, 2)  # f32[L, H, B, T]
  return _masked_mean(w0, q)  # f32[L, H]; NaN when no valid query t >= 1


@jax.jit
def _row_mass(w: jax.Array) -> jax.Array:
  return jnp.sum(w, axis=-1)  # f32[L, B, H, T]


@jax.jit
def _jsd(w: jax.Array, q: jax.Array) -> jax.Array:
  n_heads = w.shape[2]
  ii, jj = (jnp.asarray(a, jnp.int32) for a in np.triu_indices(n_heads, k=1))

  def layer(wl):  # f32[B, H, T, S] -> f32[]
    p = _normalised(wl)
    ent = _entropy_rows(p)  # f32[B, H, T]

    # One head pair at a time: the mixture (p_i + p_j) / 2 is [B, T, S] per pair, so
    # materialising all H (H - 1) / 2 of them at once would multiply memory by that.
    def pair(ij):
      i, j = ij
      pi = jax.lax.dynamic_index_in_dim(p, i, axis=1, keepdims=False)
      pj = jax.lax.dynamic_index_in_dim(p, j, axis=1, keepdims=False)
      hi = jax.lax.dynamic_index_in_dim(ent, i, axis=1, keepdims=False)
      hj = jax.lax.dynamic_index_in_dim(ent, j, axis=1, keepdims=False)
      # Rounding can make a near-zero divergence slightly negative.
      return jnp.maximum(_entropy_rows(0.5 * (pi + pj)) - 0.5 * (hi + hj), 0.0)  # [B, T]

    jsd = jax.lax.map(pair, (ii, jj))  # f32[P, B, T]
    return _masked_mean(jnp.mean(jsd, axis=0), q)  # NaN when P == 0 (one head)

  return jax.lax.map(layer, w)  # f32[L]


@jax.jit
def _cosine_diversity(w: jax.Array, q: jax.Array) -> jax.Array:
  n_heads = w.shape[2]

  def layer(wl):  # f32[B, H, T, S] -> f32[]
    norm = jnp.linalg.norm(wl, axis=-1, keepdims=True)
    u = wl / jnp.where(norm > 0, norm, 1.0)
    gram = jnp.einsum("bhts,bgts->bthg", u, u)  # f32[B, T, H, H]
    off_diag = jnp.sum(gram, axis=(-2, -1)) - jnp.trace(gram, axis1=-2, axis2=-1)
    cos = off_diag / (n_heads * (n_heads - 1))  # mean over ordered pairs i != j
    return 1.0 - _masked_mean(cos, q)

  return jax.lax.map(layer, w)  # f32[L]


# --- public API ---------------------------------------------------------------------------


def attention_entropy(w: Any, valid: Any = None) -> np.ndarray:
  """Mean entropy (nats) of the normalised |w| rows over valid queries.

  Args:
    w: f32[L, B, H, T, S] effective attention weights (0 on invisible keys).
    valid: optional bool[B, T]; False marks padding queries, which are left out.

  Returns:
    f32[L, H].
  """
  w = _weights(w)
  return np.asarray(_entropy(w, _valid(valid, w.shape)))


def first_token_mass(w: Any, valid: Any = None) -> np.ndarray:
  """Mean raw weight on key 0 over valid queries t >= 1 (query 0 is excluded).

  Args:
    w: f32[L, B, H, T, S] effective attention weights.
    valid: optional bool[B, T] query mask.

  Returns:
    f32[L, H]; NaN when no valid query has t >= 1 (e.g. T == 1).
  """
  w = _weights(w)
  return np.asarray(_first_token(w, _valid(valid, w.shape)))


@dataclasses.dataclass(frozen=True)
class QueryMass:
  """Per-query total attention mass sum_s w[..., t, s] of the valid queries.

  Attributes:
    values: f32[L, H, N], N = the number of valid (b, t) queries in row-major (b, t)
      order; the raw data for a histogram / violin plot.
    mean: f32[L], over heads and valid queries.
    std: f32[L], population standard deviation (ddof=0) over the same values.
    quantiles: f32[L, Q], linear-interpolated quantiles at `q`.
    q: the quantile levels.
  """
  values: np.ndarray
  mean: np.ndarray
  std: np.ndarray
  quantiles: np.ndarray
  q: tuple[float, ...]

  def to_dict(self) -> dict[str, Any]:
    """The summary (not `values`) as JSON-friendly lists."""
    return {"mean": _jsonable(self.mean), "std": _jsonable(self.std),
            "quantiles": {f"{level:g}": _jsonable(self.quantiles[:, i])
                          for i, level in enumerate(self.q)}}


def query_mass(w: Any, valid: Any = None, *, q: Sequence[float] = QUANTILES) -> QueryMass:
  """The per-query attention mass of the valid queries, and its per-layer summary.

  Args:
    w: f32[L, B, H, T, S] effective attention weights.
    valid: optional bool[B, T] query mask.
    q: quantile levels in [0, 1].

  Returns:
    A `QueryMass` (values f32[L, H, N]; mean, std f32[L]; quantiles f32[L, len(q)]).
  """
  w = _weights(w)
  return _query_mass(w, _valid(valid, w.shape), q)


def _query_mass(w: jax.Array, qv: jax.Array, q: Sequence[float]) -> QueryMass:
  levels = tuple(float(x) for x in q)
  if not levels or any(not 0.0 <= x <= 1.0 for x in levels):
    raise ValueError(f"q must be a non-empty sequence of levels in [0, 1], got {q!r}")
  mask = np.asarray(qv) > 0  # bool[B, T]
  mass = np.asarray(_row_mass(w))  # f32[L, B, H, T]
  values = np.transpose(mass, (0, 2, 1, 3))[:, :, mask]  # f32[L, H, N]
  flat = values.reshape(values.shape[0], -1).astype(np.float64)
  return QueryMass(
      values=values,
      mean=flat.mean(axis=1).astype(np.float32),
      std=flat.std(axis=1).astype(np.float32),
      quantiles=np.quantile(flat, levels, axis=1).T.astype(np.float32),
      q=levels)


def head_diversity(w: Any, valid: Any = None, *, metric: str = "jsd") -> np.ndarray:
  """Mean pairwise difference between the heads of each layer, over valid queries.

  Args:
    w: f32[L, B, H, T, S] effective attention weights.
    valid: optional bool[B, T] query mask.
    metric: "jsd" (Jensen-Shannon divergence of the normalised |w| rows, nats) or
      "cosine" (1 - cosine similarity of the raw rows).

  Returns:
    f32[L]; NaN when H == 1.
  """
  if metric not in DIVERSITY_METRICS:
    raise ValueError(f"metric={metric!r} is not one of {DIVERSITY_METRICS}")
  w = _weights(w)
  return _head_diversity(w, _valid(valid, w.shape), metric)


def _head_diversity(w: jax.Array, qv: jax.Array, metric: str) -> np.ndarray:
  if w.shape[2] == 1:
    return np.full((w.shape[0],), np.nan, np.float32)
  fn = _jsd if metric == "jsd" else _cosine_diversity
  return np.asarray(fn(w, qv))


def _jsonable(x: Any) -> Any:
  """Nested lists of Python floats; NaN / inf become None (JSON has no NaN)."""
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim == 0:
    v = float(arr)
    return v if math.isfinite(v) else None
  return [_jsonable(a) for a in arr]


def _mean(x: np.ndarray) -> float:
  x = np.asarray(x, np.float64)
  x = x[np.isfinite(x)]
  return float(x.mean()) if x.size else math.nan


def summarize(w: Any, valid: Any = None, *, q: Sequence[float] = QUANTILES) -> dict[str, Any]:
  """All the statistics of this module as a JSON-friendly dict.

  Args:
    w: f32[L, B, H, T, S] effective attention weights.
    valid: optional bool[B, T] query mask.
    q: quantile levels for the query-mass summary.

  Returns:
    {"shape": {layers, batch, heads, queries, keys, valid_queries},
     "entropy" / "first_token_mass": {"per_layer_head": [L][H], "per_layer": [L],
       "mean": float},
     "query_mass": {"mean": [L], "std": [L], "quantiles": {"0.05": [L], ...}},
     "head_diversity": {"jsd": [L], "cosine": [L]}}
    "per_layer" is the mean over heads, "mean" the mean over layers and heads. NaN
    (e.g. diversity with one head) is written as None.
  """
  w = _weights(w)
  qv = _valid(valid, w.shape)
  n_layers, batch, heads, queries, keys = w.shape
  out: dict[str, Any] = {"shape": {"layers": n_layers, "batch": batch, "heads": heads,
                                   "queries": queries, "keys": keys,
                                   "valid_queries": int(np.asarray(qv).sum())}}
  for name, per_head in (("entropy", np.asarray(_entropy(w, qv))),
                         ("first_token_mass", np.asarray(_first_token(w, qv)))):
    out[name] = {"per_layer_head": _jsonable(per_head),
                 "per_layer": _jsonable(per_head.astype(np.float64).mean(axis=1)),
                 "mean": _jsonable(_mean(per_head))}
  out["query_mass"] = _query_mass(w, qv, q).to_dict()
  out["head_diversity"] = {m: _jsonable(_head_diversity(w, qv, m))
                           for m in DIVERSITY_METRICS}
  return out


def attention_summary(model: Any, tokens: Any, valid: Any = None, **kwargs) -> dict[str, Any]:
  """`summarize` of a model's effective attention weights on `tokens`.

  Calls `model.attention_weights(tokens, **kwargs)`, which returns the train-mode
  (causal, no cache) effective weights f32[L, B, H, T, T] of a
  `jaxsun.nn.decoder.Decoder`.

  Args:
    model: an object with `attention_weights(tokens) -> f32[L, B, H, T, T]`.
    tokens: i32[B, T] token ids.
    valid: optional bool[B, T]; False for padding tokens (their query rows are left
      out of every average).
    **kwargs: passed on to `attention_weights`.

  Returns:
    `summarize`'s dict, plus "attention": the model's `cfg.attention` kind when it has
    one.
  """
  fn = getattr(model, "attention_weights", None)
  if not callable(fn):
    raise TypeError(f"{type(model).__name__} has no attention_weights(tokens) method")
  w = fn(tokens, **kwargs)
  b, t = np.shape(tokens)
  if len(w.shape) != 5 or tuple(w.shape[1:2]) + tuple(w.shape[3:]) != (b, t, t):
    raise ValueError(f"model.attention_weights returned shape {tuple(w.shape)}; expected "
                     f"[layers, {b}, heads, {t}, {t}] for tokens of shape {(b, t)}")
  out = summarize(w, valid)
  kind = getattr(getattr(model, "cfg", None), "attention", None)
  if kind is not None:
    out = {"attention": str(kind), **out}
  return out
