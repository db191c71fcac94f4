"""Grouped-query attention with RoPE, a pluggable scoring rule and a fused path.

Registered kinds (`ModelConfig.attention`; equations in papers.md §2):

  * "softmax":      softmax(q k^T / sqrt(hd)) v.
  * "off_by_one":   e^x_i / (1 + sum_j e^x_j)                   (Miller 2023).
  * "sink":         e^x_i / (e^s_h + sum_j e^x_j), s_h a learned logit per head.
  * "gated":        softmax attention * sigmoid(X W_gate), head-specific elementwise gate.
  * "affine":       [alpha(X) softmax(q k^T / sqrt(hd)) + beta(X)] v, alpha = phi(X W_alpha)
                    per head and query, beta = (alpha_ma - alpha) / N (`AffineConfig`).
  * "affine_gated": affine, then the gate.

Every kind has two paths chosen by `ModelConfig.attention_impl`: "naive" forms its
float32 weight matrix (`Attention.weights`, the reference and what the analysis reads)
and multiplies it by V; the fused paths reuse one fused softmax op (`sdpa`: XLA's
`dot_product_attention`, cuDNN flash attention on GPU) and add exact rewrites around it:
sink and off-by-one become one extra key of value 0 and score s_h inside the same op (so
gradients stay exact); affine adds beta times a causal cumulative sum of V, which decode
keeps as a running sum in the KV cache (`state["v_sum"]`), O(1) extra work per generated token.

`Attention` owns the projections, RoPE, the KV-cache write and the mask; the rule that
turns (q, keys, values, mask) into an output lives in `Attention.attend`, which a variant
overrides. A variant may add parameters in `__init__` (e.g. a per-head gate) and
per-sequence cache state in `init_state` (e.g. a running sum of V), without any change to
the transformer block:

    @register_attention("gated_sum")
    class GatedSumAttention(Attention):
      def __init__(self, cfg, *, rngs):
        super().__init__(cfg, rngs=rngs)
        self.gate = layers.param(rngs, (cfg.n_kv_heads,), (None,), dtype=..., std=1.0)
      def init_state(self, batch, max_len):  # carried in the KV cache, per sequence
        return {"v_sum": jnp.zeros((batch, self.n_kv_heads, self.head_dim))}
      def attend(self, a):
        out, _ = super().attend(a)
        ...  # combine with a.state["v_sum"] and a.fresh_v where a.is_new
        return out, {"v_sum": new_sum}

`ModelConfig.attention` picks the class by its registered name; tests/test_attention_
variants.py holds a complete, tested example.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from jaxsun import kv_cache
from jaxsun.nn import layers
from jaxsun.nn import splash
from jaxsun.nn.step_state import StepState, read_with_update

ATTENTION_KINDS: dict[str, type[Attention]] = {}

# Masked scores are set to this finite value (not -inf) so that a row with no visible
# key (a padding query) gives a finite, ignorable output instead of NaN.
MASK_VALUE = -1e30


def register_attention(name: str) -> Callable[[type[Attention]], type[Attention]]:
  """Class decorator registering an attention variant under `name`."""

  def deco(cls):
    if name in ATTENTION_KINDS and ATTENTION_KINDS[name] is not cls:
      raise ValueError(f"attention kind {name!r} is already registered")
    ATTENTION_KINDS[name] = cls
    cls.kind = name
    return cls

  return deco


@dataclasses.dataclass(frozen=True)
class AttendInputs:
  """Everything a scoring rule may need, in one place (shapes for B, T, S, heads).

  Attributes:
    q: [B, T, Hkv, G, hd] queries after RoPE, grouped by their KV head (G = H / Hkv).
    k: [B, S, Hkv, hd] keys visible to the call (the cache after the write, or the
      fresh keys in train mode).
    v: [B, S, Hkv, hd] values, same layout.
    mask: bool[B, T, S] True where query t may attend to key s.
    x: [B, T, D] the block input (normalised), for input-dependent variants.
    positions: i32[B, T] absolute query positions.
    fresh_k: [B, T, Hkv, hd] this call's keys (after RoPE).
    fresh_v: [B, T, Hkv, hd] this call's values.
    is_new: bool[B, T] True where this call's token extends the sequence (in train mode,
      every token; with a cache, positions in [lengths, new_lengths)). A variant keeping
      running state accumulates exactly these tokens.
    state: the variant's per-sequence cache state ({} in train mode).
    structure: what the mask is, so fused ops can skip it: "causal" (train mode,
      positions `arange(T)`, no segments: the lower triangle), "decode" (one query per
      row at position p seeing slots <= p) or "general" (use `mask`).
    segment_ids: i32[B, T] train-mode segments, or None.
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  x: jax.Array
  positions: jax.Array
  fresh_k: jax.Array
  fresh_v: jax.Array
  is_new: jax.Array
  state: dict[str, jax.Array]
  structure: str = "general"
  segment_ids: jax.Array | None = None


class AlphaEMA(StepState):
  """Affine attention's moving average of alpha: updated by training steps only."""

  combine = "mean"  # micro-batches' EMA updates average


def resolve_impl(impl: str, dtype, head_dim: int, structure: str,
                 seq_len: int | None = None) -> str:
  """The backend `sdpa` uses: "naive", "xla", "cudnn" or "splash" (`ModelConfig.attention_impl`).

  "auto" takes cuDNN flash attention on a GPU for the causal training mask in 16-bit
  compute with head_dim a multiple of 8 up to 128 (what cuDNN's fused kernel takes);
  Pallas splash attention on a TPU for the causal training mask in float32 or bfloat16
  with head_dim a multiple of 128 and (when `seq_len` is given) a sequence length splash
  tiles (`splash.shape_error`; `sdpa` checks it again and falls back to XLA); and XLA's
  fused op otherwise. On a CPU, where no fused kernel exists (XLA's op also
  materialises the scores, and measured slower: experiments/benchmarks/attention.py),
  "einsum": the same grouped einsums as the naive path inside the fused path's rewrites.
  """
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "cpu":
    return "einsum"
  if (backend == "gpu" and structure == "causal"
      and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128):
    return "cudnn"
  if (backend == "tpu" and structure == "causal"
      and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16)
      and head_dim % splash.LANES == 0
      and (seq_len is None or splash.shape_error(seq_len, seq_len) is None)):
    return "splash"
  return "xla"


def sdpa(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
         structure: str = "general", positions: jax.Array | None = None,
         impl: str = "xla", sink: jax.Array | None = None) -> jax.Array:
  """Fused softmax attention, optionally with a sink logit per head in the denominator.

  The sink is an exact rewrite that keeps every gradient inside the fused op: one extra
  key with value 0 whose score is s_h for query head h (an extra channel: q gets
  s_h * sqrt(hd), the sink key 1, real keys 0), placed first so that the causal
  triangle stays a triangle (with a dummy first query, dropped). The tempting
  out * sigmoid(lse - s) with the log-sum-exp `dot_product_attention` returns is exact
  in the forward pass but its VJP ignores the log-sum-exp's cotangent, so gradients
  would be wrong (tests/test_attention_kinds.py checks gradients against the naive path).

  Args:
    q: [B, T, Hkv, G, hd] queries.
    k: [B, S, Hkv, hd] keys.
    v: [B, S, Hkv, hd] values.
    mask: bool[B, T, S] visibility (ignored for structure "causal" and "decode").
    structure: "causal", "decode" or "general" (`AttendInputs.structure`).
    positions: i32[B, T] query positions (structure "decode": row b sees slots
      <= positions[b, 0]).
    impl: "xla" or "cudnn" (`jax.nn.dot_product_attention`'s implementation), "einsum"
      (grouped einsums that materialise float32 scores: a CPU has no fused kernel), or
      "splash" (`jaxsun.nn.splash`, TPU: the causal structure with lengths splash tiles,
      the sink as splash's native sink logit; every other call falls back to "xla").
    sink: f32[Hkv, G] sink logits (0: off-by-one), or None (plain softmax).

  Returns:
    [B, T, Hkv, G, hd] in q's dtype.
  """
  if impl == "splash":
    if structure == "causal" and splash.shape_error(q.shape[1], k.shape[1]) is None:
      return splash.splash_attention(q, k, v, sink=sink)
    impl = "xla"  # decode, explicit masks, lengths splash's blocks do not tile
  b, t, hkv, g, hd = q.shape
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  if impl == "einsum":  # XLA on a CPU: grouped einsums, no kernel to call
    if structure == "causal":
      mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, k.shape[1]), bool)), (b, t, k.shape[1]))
    elif structure == "decode":
      mask = jnp.arange(k.shape[1])[None, None, :] <= positions[:, :, None]
    probs = (softmax_probs(q, k, mask) if sink is None
             else sink_probs(q, k, mask, sink))  # f32[B, Hkv, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(q.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
  scale = 1.0 / float(hd) ** 0.5
  if sink is not None:
    extra = 8 if impl == "cudnn" else 1  # cuDNN wants head_dim % 8 == 0
    q_sink = jnp.broadcast_to((sink * hd ** 0.5).astype(q.dtype)[None, None, :, :, None],
                              (b, t, hkv, g, 1))
    q = jnp.concatenate([q, q_sink, jnp.zeros((b, t, hkv, g, extra - 1), q.dtype)], -1)
    k = jnp.concatenate([k, jnp.zeros(k.shape[:-1] + (extra,), k.dtype)], -1)
    sink_key = jnp.zeros((b, 1, hkv, hd + extra), k.dtype).at[..., hd].set(1)
    k = jnp.concatenate([sink_key, k], 1)  # the sink is key 0
    v = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (extra,), v.dtype)], -1)  # same width
    v = jnp.concatenate([jnp.zeros((b, 1, hkv, hd + extra), v.dtype), v], 1)
    mask = jnp.concatenate([jnp.ones((b, t, 1), bool), mask], 2)
    if structure == "causal":  # a dummy query 0 keeps the mask a square triangle
      q = jnp.concatenate([jnp.zeros_like(q[:, :1]), q], 1)
    elif structure == "decode":
      positions = positions + 1
  tq = q.shape[1]
  kw = {}
  if structure == "causal":
    kw["is_causal"] = True
  elif structure == "decode":
    kw["key_value_seq_lengths"] = (positions[:, 0] + 1).astype(jnp.int32)
  else:
    kw["mask"] = mask[:, None]  # bool[B, 1, T, S]
  out = jax.nn.dot_product_attention(
      q.reshape(b, tq, hkv * g, q.shape[-1]), k, v, scale=scale, implementation=impl, **kw)
  out = out[..., :hd].reshape(b, tq, hkv, g, hd)
  return out[:, tq - t:]


def _masked_scores(q: jax.Array, k: jax.Array, mask: jax.Array, gemm=None) -> jax.Array:
  """q k^T / sqrt(hd) with masked entries at MASK_VALUE: f32[B, Hkv, G, T, S]."""
  if gemm is None:
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
  else:
    scores = gemm.einsum("btkgd,bskd->bkgts", q, k)
  scores = scores / jnp.sqrt(q.shape[-1])
  return jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)


def softmax_probs(q: jax.Array, k: jax.Array, mask: jax.Array, gemm=None) -> jax.Array:
  """softmax(q k^T / sqrt(hd)) with masking, in float32.

  Args:
    q: [B, T, Hkv, G, hd].
    k: [B, S, Hkv, hd].
    mask: bool[B, T, S].
    gemm: None, or what computes q k^T (`Attention.gemm`: a masked GEMM).

  Returns:
    f32[B, Hkv, G, T, S] attention probabilities.
  """
  return jax.nn.softmax(_masked_scores(q, k, mask, gemm), axis=-1)


def sink_probs(q: jax.Array, k: jax.Array, mask: jax.Array, sink: jax.Array, gemm=None
               ) -> jax.Array:
  """e^x_s / (e^sink + sum_s' e^x_s') in float32, with a sink logit per head.

  Args:
    q, k, mask, gemm: as in `softmax_probs`.
    sink: f32[Hkv, G] sink logits (0 for off-by-one).

  Returns:
    f32[B, Hkv, G, T, S]; rows sum to sigmoid(lse - sink) < 1.
  """
  scores = _masked_scores(q, k, mask, gemm)
  sink = sink.astype(jnp.float32)[None, :, :, None, None]  # f32[1, Hkv, G, 1, 1]
  m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
  e = jnp.exp(scores - m)
  return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - m))


def linear_clip(x: jax.Array) -> jax.Array:
  """The paper's phi (eq. 11): 0 for x <= -5, 0.1 x + 0.5 in between, 1 for x >= 5."""
  return jnp.clip(0.1 * x + 0.5, 0.0, 1.0)


def causal_sums(values: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array,
                                                                           jax.Array]:
  """Per query t: the sum of values[s] over visible s <= t (within t's segment), and
  how many keys that is.

  Segments must be contiguous runs (packed sequences), as the decoder's masks assume.

  Args:
    values: f32[B, T, ...].
    segment_ids: i32[B, T] or None.

  Returns:
    (f32[B, T, ...] sums, f32[B, T] counts).
  """
  b, t = values.shape[:2]
  total = jnp.cumsum(values, axis=1)
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  if segment_ids is None:
    return total, (idx + 1).astype(jnp.float32)
  starts = jnp.concatenate([jnp.ones((b, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # i32[B, T] segment start
  before = jnp.take_along_axis(total, jnp.maximum(first - 1, 0).reshape(
      (b, t) + (1,) * (values.ndim - 2)), axis=1)
  before = jnp.where((first > 0).reshape((b, t) + (1,) * (values.ndim - 2)), before, 0.0)
  return total - before, (idx - first + 1).astype(jnp.float32)


class Attention(nnx.Module):
  """Softmax attention: softmax(q k^T / sqrt(hd)) v, with GQA and RoPE.

  A variant overrides some of `weights` (its naive weight matrix), `fused` (the same
  result through `sdpa`), `output_gate` and `next_state`, or `attend` as a whole.
  """

  kind = "softmax"

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.rope_theta, self.rope_scaling = cfg.rope_theta, cfg.rope_scaling
    self.dtype = cfg.dtype
    self.impl = cfg.attention_impl
    # None, or an object whose `einsum(spec, a, b)` computes the score and value
    # products (a masked GEMM: `jaxsun.quant.masked_gemm.apply`); forces the naive path.
    self.gemm = None
    kw = dict(std=cfg.init_std, param_dtype=cfg.params_dtype, dtype=cfg.dtype, rngs=rngs)
    dense = layers.Linear  # FP8 (`cfg.fp8`) swaps them afterwards: fp8_linear.apply
    self.q_proj = dense(cfg.d_model, cfg.q_dim, ("embed", "heads"), **kw)
    self.k_proj = dense(cfg.d_model, cfg.kv_dim, ("embed", "kv_heads"), **kw)
    self.v_proj = dense(cfg.d_model, cfg.kv_dim, ("embed", "kv_heads"), **kw)
    self.o_proj = dense(cfg.q_dim, cfg.d_model, ("heads", "embed"), **kw)
    if cfg.qkv_bias:  # Qwen2; kept outside the projections so quantized layers stay bias-free
      bias = dict(dtype=cfg.params_dtype, value=0.0)
      self.q_bias = layers.param(None, (cfg.q_dim,), ("heads",), **bias)
      self.k_bias = layers.param(None, (cfg.kv_dim,), ("kv_heads",), **bias)
      self.v_bias = layers.param(None, (cfg.kv_dim,), ("kv_heads",), **bias)
    self.qkv_bias = cfg.qkv_bias

  def init_state(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """Per-sequence cache state of this variant (none for softmax)."""
    del batch, max_len
    return {}

  def _qkv(self, x, positions, key):
    """Projections + RoPE: q [B, T, Hkv, G, hd], k and v [B, T, Hkv, hd]."""
    b, t, _ = x.shape
    q = layers.dense_call(self.q_proj, x, key, 0)
    k = layers.dense_call(self.k_proj, x, key, 1)
    v = layers.dense_call(self.v_proj, x, key, 2)
    if self.qkv_bias:
      q = q + self.q_bias[...].astype(q.dtype)
      k = k + self.k_bias[...].astype(k.dtype)
      v = v + self.v_bias[...].astype(v.dtype)
    # Names for the "minimal" remat policy (`jaxsun.nn.decoder.REMAT_POLICIES`).
    q = checkpoint_name(q, "query_proj")
    k = checkpoint_name(k, "key_proj")
    v = checkpoint_name(v, "value_proj")
    q = q.reshape(b, t, self.n_heads, self.head_dim)
    k = k.reshape(b, t, self.n_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.n_kv_heads, self.head_dim)
    q = layers.apply_rope(q, positions, self.rope_theta, self.rope_scaling)
    k = layers.apply_rope(k, positions, self.rope_theta, self.rope_scaling)
    q = q.reshape(b, t, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
    return q, k, v

  @staticmethod
  def _train_mask(positions, segment_ids):
    mask = positions[:, None, :] <= positions[:, :, None]  # bool[B, T, T]
    if segment_ids is not None:
      mask &= segment_ids[:, None, :] == segment_ids[:, :, None]
    return mask

  def __call__(self, x: jax.Array, positions: jax.Array, *,
               cache: kv_cache.LayerCache | None = None,
               lengths: jax.Array | None = None,
               new_lengths: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               key: jax.Array | None = None,
               causal: bool = False):
    """Attention over fresh tokens, optionally through a KV cache.

    Args:
      x: [B, T, D] normalised block input.
      positions: i32[B, T] absolute positions; with a cache, row b must hold
        `start[b] + arange(T)` and `start[b] + T <= max_len`.
      cache: this layer's cache, or None (train mode: attend among the T tokens).
      lengths: i32[B] valid slots of the cache before this call (never overwritten).
      new_lengths: i32[B] valid slots after this call.
      segment_ids: i32[B, T] optional, train mode only: tokens attend within a segment.
      key: optional dropout key for adapter layers (training only).
      causal: static promise (train mode) that positions are `arange(T)` with no
        segments, so fused kernels may use their built-in causal mask.

    Returns:
      (out [B, T, D], updated LayerCache or None).
    """
    b, t, _ = x.shape
    q, k, v = self._qkv(x, positions, key)
    if cache is None:
      mask = self._train_mask(positions, segment_ids)
      keys, values, state, new_cache = k, v, {}, None
      is_new = jnp.ones((b, t), bool)
      structure = "causal" if causal and segment_ids is None else "general"
    else:
      start = positions[:, 0]
      keys = kv_cache.write_kv(cache.k, k, start, lengths)
      values = kv_cache.write_kv(cache.v, v, start, lengths)
      slots = jnp.arange(keys.shape[1])
      mask = slots[None, None, :] <= positions[:, :, None]  # bool[B, T, S]
      state = cache.state
      is_new = (positions >= lengths[:, None]) & (positions < new_lengths[:, None])
      structure = "decode" if t == 1 else "general"
      segment_ids = None
    out, state = self.attend(AttendInputs(q=q, k=keys, v=values, mask=mask, x=x,
                                          positions=positions, fresh_k=k, fresh_v=v,
                                          is_new=is_new, state=state, structure=structure,
                                          segment_ids=segment_ids))
    if cache is not None:
      new_cache = kv_cache.LayerCache(k=keys, v=values, state=state)
    out = checkpoint_name(out.reshape(b, t, self.n_heads * self.head_dim), "attention_out")
    return layers.dense_call(self.o_proj, out, key, 3), new_cache

  # -- the scoring rule ------------------------------------------------------------------

  def attend(self, a: AttendInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scoring rule. Returns (out [B, T, Hkv, G, hd] in compute dtype, new state)."""
    if self.gemm is not None:
      out = self.gemm.einsum("bkgts,bskd->btkgd", self.weights(a), a.v)
    elif self.impl == "naive":
      w = self.weights(a)  # f32[B, Hkv, G, T, S]
      out = jnp.einsum("bkgts,bskd->btkgd", w.astype(self.dtype), a.v.astype(self.dtype),
                       preferred_element_type=jnp.float32)
    else:
      out = self.fused(a).astype(jnp.float32)
    out = self.output_gate(out, a)
    return out.astype(self.dtype), self.next_state(a)

  def weights(self, a: AttendInputs) -> jax.Array:
    """The effective attention weights, f32[B, Hkv, G, T, S] (the naive reference)."""
    return softmax_probs(a.q, a.k, a.mask, self.gemm)

  def fused(self, a: AttendInputs) -> jax.Array:
    """`weights(a) @ v` through the fused op: [B, T, Hkv, G, hd]."""
    return self._sdpa(a)

  def output_gate(self, out: jax.Array, a: AttendInputs) -> jax.Array:
    """An elementwise transform of the attention output (identity; gated variants)."""
    del a
    return out

  def next_state(self, a: AttendInputs) -> dict[str, jax.Array]:
    """The variant's cache state after this call."""
    return a.state

  def _sdpa(self, a: AttendInputs, sink: jax.Array | None = None) -> jax.Array:
    impl = resolve_impl(self.impl, a.q.dtype, self.head_dim, a.structure,
                        seq_len=a.q.shape[1])
    return sdpa(a.q, a.k, a.v, a.mask, structure=a.structure, positions=a.positions,
                impl=impl, sink=sink)

  def attention_weights(self, x: jax.Array, positions: jax.Array | None = None,
                        segment_ids: jax.Array | None = None) -> jax.Array:
    """The train-mode effective weights of this layer, f32[B, H, T, T] (for analysis).

    Gates act on the output, not the weights, so gated kinds report their softmax part.

    Args:
      x: [B, T, D] the normalised block input.
      positions: i32[B, T] (default `arange(T)`).
      segment_ids: i32[B, T] or None.
    """
    b, t, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    q, k, v = self._qkv(x, positions, None)
    a = AttendInputs(q=q, k=k, v=v, mask=self._train_mask(positions, segment_ids), x=x,
                     positions=positions, fresh_k=k, fresh_v=v,
                     is_new=jnp.ones((b, t), bool), state={}, segment_ids=segment_ids)
    return self.weights(a).reshape(b, self.n_heads, t, t)


register_attention("softmax")(Attention)


@register_attention("off_by_one")
class OffByOneAttention(Attention):
  """softmax_1: e^x_i / (1 + sum_j e^x_j) (Miller 2023): a sink logit fixed at 0."""

  def sink_logits(self) -> jax.Array:  # f32[Hkv, G]
    return jnp.zeros((self.n_kv_heads, self.n_heads // self.n_kv_heads), jnp.float32)

  def weights(self, a):
    return sink_probs(a.q, a.k, a.mask, self.sink_logits(), self.gemm)

  def fused(self, a):
    return self._sdpa(a, sink=self.sink_logits())


@register_attention("sink")
class SinkAttention(OffByOneAttention):
  """A learnable logit s_h per head in the denominator (GPT-OSS's attention sink)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.sink = layers.param(None, (cfg.n_heads,), (None,), dtype=cfg.params_dtype,
                             value=0.0)

  def sink_logits(self):
    return self.sink[...].astype(jnp.float32).reshape(
        self.n_kv_heads, self.n_heads // self.n_kv_heads)


class _Gate(nnx.Module):
  """The head-specific elementwise output gate sigmoid(X W_gate) (Qiu et al. 2025)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.gate_proj = layers.Linear(cfg.d_model, cfg.q_dim, ("embed", "heads"),
                                   std=cfg.init_std, param_dtype=cfg.params_dtype,
                                   dtype=cfg.dtype, rngs=rngs)

  def __call__(self, out: jax.Array, x: jax.Array) -> jax.Array:
    g = jax.nn.sigmoid(self.gate_proj(x, out_dtype=jnp.float32))  # f32[B, T, H * hd]
    return out * g.reshape(out.shape)


@register_attention("gated")
class GatedAttention(Attention):
  """softmax attention * sigmoid(X W_gate) before o_proj (Gated Attention)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.gate = _Gate(cfg, rngs=rngs)

  def output_gate(self, out, a):
    return self.gate(out, a.x)


@register_attention("affine")
class AffineAttention(Attention):
  """[alpha(X) softmax(q k^T / sqrt(hd)) + beta(X)] v (Affine-Scaled Attention, eq. 6-9).

  alpha = phi(X W_alpha): f32[B, T, H], one per head and query token; beta = (alpha_ma -
  alpha) / N, added to every visible key's weight; alpha_ma (`AlphaEMA`) follows
  rho alpha_ma + (1 - rho) mean(alpha) over the batch's new tokens, written back by
  training steps only (`jaxsun.nn.step_state`). The forward pass uses the stored value
  (the EMA before this step's update), so train, prefill and decode agree exactly.
  Options: `ModelConfig.affine`.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    aff = cfg.affine
    self.affine = aff
    self.max_len = cfg.max_len
    std = cfg.init_std if aff.w_init == "normal" else None
    self.alpha_proj = layers.Linear(cfg.d_model, cfg.n_heads, ("embed", None),
                                    std=std or 1.0, param_dtype=cfg.params_dtype,
                                    dtype=cfg.dtype, rngs=rngs)
    if std is None:
      self.alpha_proj.kernel[...] = jnp.zeros_like(self.alpha_proj.kernel[...])
    n_ma = cfg.n_heads if aff.alpha_ma == "head" else 1
    self.alpha_ma = AlphaEMA(jnp.full((n_ma,), aff.alpha_ma_init, jnp.float32))

  def init_state(self, batch, max_len):
    del max_len
    return {"v_sum": jnp.zeros((batch, self.n_kv_heads, self.head_dim), jnp.float32)}

  def alpha_beta(self, a: AttendInputs, counts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha, beta) f32[B, T, H]; `counts` f32[B, T] is each query's visible keys."""
    logits = self.alpha_proj(a.x, out_dtype=jnp.float32)  # f32[B, T, H]
    alpha = linear_clip(logits) if self.affine.phi == "linear_clip" else jax.nn.sigmoid(logits)
    # alpha_ma's "gradient" is its next value: rho * alpha_ma + (1 - rho) * batch mean.
    w = a.is_new.astype(jnp.float32)[..., None]  # f32[B, T, 1]
    axes = (0, 1) if self.affine.alpha_ma == "head" else (0, 1, 2)
    mean = jnp.sum(alpha * w, axis=axes) / jnp.maximum(
        jnp.sum(jnp.broadcast_to(w, alpha.shape), axis=axes), 1.0)
    ema = self.alpha_ma[...]
    nxt = self.affine.rho * ema + (1.0 - self.affine.rho) * jax.lax.stop_gradient(mean)
    alpha_ma = read_with_update(ema, nxt.reshape(ema.shape))  # f32[H] or f32[1]
    n = float(self.max_len) if self.affine.n == "full" else jnp.maximum(counts, 1.0)[..., None]
    return alpha, (alpha_ma - alpha) / n

  def _by_head(self, x: jax.Array) -> jax.Array:
    """f32[B, T, H] -> f32[B, Hkv, G, T, 1], the layout of the weight matrix."""
    b, t, _ = x.shape
    x = x.reshape(b, t, self.n_kv_heads, self.n_heads // self.n_kv_heads)
    return x.transpose(0, 2, 3, 1)[..., None]

  def weights(self, a):
    alpha, beta = self.alpha_beta(a, jnp.sum(a.mask, axis=-1).astype(jnp.float32))
    p = softmax_probs(a.q, a.k, a.mask, self.gemm)
    visible = a.mask[:, None, None].astype(jnp.float32)  # f32[B, 1, 1, T, S]
    return self._by_head(alpha) * p + self._by_head(beta) * visible

  def _visible_sums(self, a: AttendInputs) -> tuple[jax.Array, jax.Array]:
    """Sum of V over each query's visible keys f32[B, T, Hkv, hd], and their count."""
    v = a.fresh_v.astype(a.v.dtype).astype(jnp.float32)  # as stored in the cache
    if not a.state:  # train mode: causal cumulative sums (within segments)
      return causal_sums(v, a.segment_ids)
    # With a cache: the history's running sum plus this call's new tokens. Exact for
    # every new query (positions >= lengths), the only ones whose output is used.
    fresh = jnp.where(a.is_new[..., None, None], v, 0.0)
    sums = a.state["v_sum"][:, None] + jnp.cumsum(fresh, axis=1)
    return sums, (a.positions + 1).astype(jnp.float32)

  def fused(self, a):
    sums, counts = self._visible_sums(a)
    alpha, beta = self.alpha_beta(a, counts)
    g = self.n_heads // self.n_kv_heads
    b, t = alpha.shape[:2]
    alpha = alpha.reshape(b, t, self.n_kv_heads, g, 1)
    beta = beta.reshape(b, t, self.n_kv_heads, g, 1)
    out = self._sdpa(a).astype(jnp.float32)
    return alpha * out + beta * sums[:, :, :, None, :]

  def next_state(self, a):
    if not a.state:
      return a.state
    fresh = jnp.where(a.is_new[..., None, None],
                      a.fresh_v.astype(a.v.dtype).astype(jnp.float32), 0.0)
    return {**a.state, "v_sum": a.state["v_sum"] + fresh.sum(axis=1)}


@register_attention("affine_gated")
class AffineGatedAttention(AffineAttention):
  """Affine-Scaled Attention followed by the Gated Attention output gate (Table 2)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.gate = _Gate(cfg, rngs=rngs)

  def output_gate(self, out, a):
    return self.gate(out, a.x)
