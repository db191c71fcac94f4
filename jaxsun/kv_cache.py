"""The KV cache: an explicit pytree passed into and returned from every cached call.

Layout (one `LayerCache` per block, preallocated):

    k, v    : [batch, max_len, n_kv_heads, head_dim]   slot s holds absolute position s
    state   : dict of per-sequence arrays owned by the attention variant (e.g. a running
              sum of V for affine-scaled attention); empty for softmax attention
    lengths : i32[batch]  how many leading slots of each row are valid

Rows are left-aligned: position p of row b lives in slot p, so rows of different
lengths share one array and a decode step writes row b at slot `lengths[b]`.

The write rule that makes the prefill/decode split work (see `jaxsun.split`): a cached
call with tokens at positions `start[b] + t` writes slot `s` only if `s >= lengths[b]`
(old lengths). Slots below `lengths` are history and are never overwritten, so a cache
built by one parameter tree can be extended by another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Logical axis names of the cache arrays (mapped to the mesh by `jaxsun.parallel`).
# Prefill and decode caches get distinct batch names so a topology can shard them
# differently (e.g. prefill batch over data, decode batch over data x fsdp).
CACHE_AXES = ("cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")
PREFILL_CACHE_AXES = ("cache_batch_prefill",) + CACHE_AXES[1:]


@struct.dataclass
class LayerCache:
  k: jax.Array  # [B, S, Hkv, hd]
  v: jax.Array  # [B, S, Hkv, hd]
  state: dict[str, jax.Array] = struct.field(default_factory=dict)


@struct.dataclass
class KVCache:
  layers: tuple[LayerCache, ...]
  lengths: jax.Array  # i32[B]

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]

  @property
  def max_len(self) -> int:
    return self.layers[0].k.shape[1]


def write_kv(cache: jax.Array, fresh: jax.Array, start: jax.Array,
             lengths: jax.Array) -> jax.Array:
  """Writes `fresh` into `cache` at slots `start[b] + t`, only where slot >= lengths[b].

  Args:
    cache: [B, S, ...] the preallocated buffer.
    fresh: [B, T, ...] new entries, T <= S. Callers guarantee start + T <= S (a
      `dynamic_update_slice` would otherwise clamp the start index).
    start: i32[B] slot of fresh[:, 0].
    lengths: i32[B] number of valid (frozen) leading slots per row.

  Returns:
    The updated [B, S, ...] buffer.
  """
  t = fresh.shape[1]

  def row(c, f, s, n):
    old = jax.lax.dynamic_slice_in_dim(c, s, t, axis=0)
    keep_old = (s + jnp.arange(t)) < n  # bool[T]
    keep_old = keep_old.reshape((t,) + (1,) * (f.ndim - 1))
    return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(keep_old, old, f.astype(c.dtype)),
                                               s, axis=0)

  return jax.vmap(row)(cache, fresh, start, lengths)


def _sum_of_valid_v(layer: LayerCache, lengths: jax.Array) -> jax.Array:
  valid = jnp.arange(layer.v.shape[1])[None, :, None, None] < lengths[:, None, None, None]
  return jnp.sum(jnp.where(valid, layer.v.astype(jnp.float32), 0.0), axis=1)


# Per-sequence state that can be rebuilt from the cached K/V alone, by state name: what a
# shorter view of a cache (a prefix-cache hit, `truncate`) needs. "v_sum" is the running
# sum of the valid values f32[B, Hkv, hd] (affine-scaled attention keeps it for decode).
STATE_FROM_KV = {"v_sum": _sum_of_valid_v}


def truncate(cache: KVCache, lengths: jax.Array) -> KVCache:
  """The cache with only its first `lengths[b]` slots valid, variant state rebuilt.

  Args:
    cache: a cache whose rows hold at least `lengths` valid slots.
    lengths: i32[B] new lengths (<= cache.lengths).

  Raises:
    ValueError: a variant keeps state that cannot be rebuilt from K/V (`STATE_FROM_KV`).
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  layers = []
  for layer in cache.layers:
    unknown = sorted(set(layer.state) - set(STATE_FROM_KV))
    if unknown:
      raise ValueError(f"cannot truncate a KV cache with attention state {unknown}: add a "
                       "rebuild rule to jaxsun.kv_cache.STATE_FROM_KV")
    layers.append(layer.replace(state={n: STATE_FROM_KV[n](layer, lengths).astype(x.dtype)
                                       for n, x in layer.state.items()}))
  return cache.replace(layers=tuple(layers), lengths=lengths)
