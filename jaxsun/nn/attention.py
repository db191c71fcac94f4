"""Grouped-query attention with RoPE and a pluggable scoring rule.

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
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun import kv_cache
from jaxsun.nn import fp8_linear
from jaxsun.nn import layers

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


class Attention(nnx.Module):
  """Softmax attention: softmax(q k^T / sqrt(hd)) v, with GQA and RoPE."""

  kind = "softmax"

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.rope_theta, self.rope_scaling = cfg.rope_theta, cfg.rope_scaling
    self.dtype = cfg.dtype
    kw = dict(std=cfg.init_std, param_dtype=cfg.params_dtype, dtype=cfg.dtype, rngs=rngs)
    dense = functools.partial(fp8_linear.dense, cfg.fp8)  # Linear, or Fp8Linear by config
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

  def __call__(self, x: jax.Array, positions: jax.Array, *,
               cache: kv_cache.LayerCache | None = None,
               lengths: jax.Array | None = None,
               new_lengths: jax.Array | None = None,
               segment_ids: jax.Array | None = None,
               key: jax.Array | None = None):
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

    Returns:
      (out [B, T, D], updated LayerCache or None).
    """
    b, t, _ = x.shape
    q = layers.dense_call(self.q_proj, x, key, 0)
    k = layers.dense_call(self.k_proj, x, key, 1)
    v = layers.dense_call(self.v_proj, x, key, 2)
    if self.qkv_bias:
      q = q + self.q_bias[...].astype(q.dtype)
      k = k + self.k_bias[...].astype(k.dtype)
      v = v + self.v_bias[...].astype(v.dtype)
    q = q.reshape(b, t, self.n_heads, self.head_dim)
    k = k.reshape(b, t, self.n_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.n_kv_heads, self.head_dim)
    q = layers.apply_rope(q, positions, self.rope_theta, self.rope_scaling)
    k = layers.apply_rope(k, positions, self.rope_theta, self.rope_scaling)
    q = q.reshape(b, t, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)

    if cache is None:
      mask = positions[:, None, :] <= positions[:, :, None]  # bool[B, T, T]
      if segment_ids is not None:
        mask &= segment_ids[:, None, :] == segment_ids[:, :, None]
      keys, values, state, new_cache = k, v, {}, None
      is_new = jnp.ones((b, t), bool)
    else:
      start = positions[:, 0]
      keys = kv_cache.write_kv(cache.k, k, start, lengths)
      values = kv_cache.write_kv(cache.v, v, start, lengths)
      slots = jnp.arange(keys.shape[1])
      mask = slots[None, None, :] <= positions[:, :, None]  # bool[B, T, S]
      state = cache.state
      is_new = (positions >= lengths[:, None]) & (positions < new_lengths[:, None])
    out, state = self.attend(AttendInputs(q=q, k=keys, v=values, mask=mask, x=x,
                                          positions=positions, fresh_k=k, fresh_v=v,
                                          is_new=is_new, state=state))
    if cache is not None:
      new_cache = kv_cache.LayerCache(k=keys, v=values, state=state)
    out = out.reshape(b, t, self.n_heads * self.head_dim)
    return layers.dense_call(self.o_proj, out, key, 3), new_cache

  def attend(self, a: AttendInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scoring rule. Returns (out [B, T, Hkv, G, hd] in compute dtype, new state)."""
    probs = softmax_probs(a.q, a.k, a.mask)  # f32[B, Hkv, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(self.dtype), a.v.astype(self.dtype),
                     preferred_element_type=jnp.float32)
    return out.astype(self.dtype), a.state


def softmax_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(hd)) with masking, in float32.

  Args:
    q: [B, T, Hkv, G, hd].
    k: [B, S, Hkv, hd].
    mask: bool[B, T, S].

  Returns:
    f32[B, Hkv, G, T, S] attention probabilities.
  """
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                      preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
  return jax.nn.softmax(scores, axis=-1)


register_attention("softmax")(Attention)
