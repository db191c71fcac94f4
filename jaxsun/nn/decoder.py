"""The Llama-style decoder and its execution modes.

Modes (`Mode`) say how a call uses the KV cache, not which parameter tree runs it:

  * `TRAIN`: no cache; the T tokens attend causally among themselves.
  * `PREFILL`: T tokens are written into a cache (slots `positions`) and attend to it.
  * `DECODE`: one token per row, appended at slot `cache.lengths[b]`.

Tests check that the modes agree: a full `TRAIN` forward equals `PREFILL` of a prefix
followed by token-by-token `DECODE`.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun import kv_cache
from jaxsun import validation
from jaxsun.config import ModelConfig
from jaxsun.nn import attention as attention_lib
from jaxsun.nn import layers


class Mode(str, enum.Enum):
  TRAIN = "train"
  PREFILL = "prefill"
  DECODE = "decode"

  @classmethod
  def parse(cls, mode: Mode | str) -> Mode:
    try:
      return cls(mode)
    except ValueError:
      raise ValueError(f"mode={mode!r} is not one of {[m.value for m in cls]}") from None


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=cfg.norm_eps, param_dtype=cfg.params_dtype, dtype=cfg.dtype)
    self.attn_norm = layers.RMSNorm(cfg.d_model, **norm)
    self.attn = attention_lib.ATTENTION_KINDS[cfg.attention](cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, **norm)
    self.mlp = layers.SwiGLU(cfg.d_model, cfg.d_ff, std=cfg.init_std,
                             param_dtype=cfg.params_dtype, dtype=cfg.dtype, rngs=rngs,
                             fp8=cfg.fp8)

  def __call__(self, x, positions, *, cache=None, lengths=None, new_lengths=None,
               segment_ids=None, key=None):
    k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
    kw = {} if key is None else {"key": k_attn}  # variants that predate `key` still work
    h, cache = self.attn(self.attn_norm(x), positions, cache=cache, lengths=lengths,
                         new_lengths=new_lengths, segment_ids=segment_ids, **kw)
    x = x + h
    mlp_kw = {} if key is None else {"key": k_mlp}
    return x + self.mlp(self.mlp_norm(x), **mlp_kw), cache


class Decoder(nnx.Module):
  """Token embedding -> `n_layers` blocks -> final RMSNorm -> LM head (tied or not)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, ModelConfig):
      raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    self.cfg = cfg
    self.embed = layers.Embedding(cfg.vocab_size, cfg.d_model, std=cfg.init_std,
                                  param_dtype=cfg.params_dtype, dtype=cfg.dtype, rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps,
                                     param_dtype=cfg.params_dtype, dtype=cfg.dtype)
    if not cfg.tie_embeddings:
      self.lm_head = layers.Linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"),
                                   std=cfg.init_std, param_dtype=cfg.params_dtype,
                                   dtype=cfg.dtype, rngs=rngs)

  def init_cache(self, batch: int, max_len: int | None = None) -> kv_cache.KVCache:
    """An empty cache of `max_len` slots (default `cfg.max_len`) for `batch` rows."""
    cfg = self.cfg
    max_len = cfg.max_len if max_len is None else max_len
    validation.check_positive_int("batch", batch)
    validation.check_positive_int("max_len", max_len)
    if max_len > cfg.max_len:
      raise ValueError(f"max_len={max_len} exceeds ModelConfig.max_len={cfg.max_len}")
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return kv_cache.KVCache(
        layers=tuple(
            kv_cache.LayerCache(k=jnp.zeros(shape, cfg.dtype), v=jnp.zeros(shape, cfg.dtype),
                                state=blk.attn.init_state(batch, max_len))
            for blk in self.layers),
        lengths=jnp.zeros((batch,), jnp.int32))

  def hidden(self, tokens: jax.Array, *, mode: Mode | str = Mode.TRAIN,
             positions: jax.Array | None = None, cache: kv_cache.KVCache | None = None,
             new_lengths: jax.Array | None = None, segment_ids: jax.Array | None = None,
             dropout_key: jax.Array | None = None):
    """Runs the blocks; returns (hidden [B, T, D] before the final norm, cache).

    Args:
      tokens: i32[B, T] token ids in [0, vocab_size).
      mode: `Mode.TRAIN` (no cache), `Mode.PREFILL` or `Mode.DECODE` (T == 1).
      positions: i32[B, T] absolute positions. Default: `arange(T)` in train mode,
        `cache.lengths[:, None] + arange(T)` with a cache.
      cache: the KV cache (required for PREFILL/DECODE, forbidden for TRAIN).
      new_lengths: i32[B] valid slots after the call (e.g. prompt lengths of a padded
        batch). Default: `max(cache.lengths, positions[:, -1] + 1)`.
      segment_ids: i32[B, T] train mode only; attention stays within a segment.
      dropout_key: PRNG key for training-time dropout in adapter layers (`jaxsun.lora`);
        None (inference): no dropout.
    """
    mode = Mode.parse(mode)
    cfg = self.cfg
    validation.check_tokens("tokens", tokens, cfg.vocab_size)
    b, t = tokens.shape
    if mode is Mode.TRAIN:
      if cache is not None:
        raise ValueError("mode='train' runs without a KV cache; pass cache=None "
                         "(or use mode='prefill' to build one)")
      if t > cfg.max_len:
        raise ValueError(f"tokens has length {t} > ModelConfig.max_len={cfg.max_len}")
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
      if cache is None:
        raise ValueError(f"mode={mode.value!r} needs a KV cache (Decoder.init_cache)")
      if segment_ids is not None:
        raise ValueError("segment_ids is only supported in mode='train'")
      if mode is Mode.DECODE and t != 1:
        raise ValueError(f"mode='decode' takes one token per row; tokens has shape {tokens.shape}")
      if cache.batch_size != b:
        raise ValueError(f"cache has batch {cache.batch_size} but tokens has batch {b}")
      if t > cache.max_len:
        raise ValueError(f"tokens has length {t} > cache max_len={cache.max_len}")
      if positions is None:
        positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)
    validation.check_int_array("positions", positions, (b, t))
    if cache is not None:
      if new_lengths is None:
        new_lengths = jnp.maximum(cache.lengths, positions[:, -1] + 1)
      validation.check_int_array("new_lengths", new_lengths, (b,))
      new_lengths = new_lengths.astype(jnp.int32)

    x = self.embed(tokens)
    new_layers = []
    for i, blk in enumerate(self.layers):
      layer_cache = None if cache is None else cache.layers[i]
      x, layer_cache = blk(x, positions, cache=layer_cache,
                           lengths=None if cache is None else cache.lengths,
                           new_lengths=new_lengths, segment_ids=segment_ids,
                           key=None if dropout_key is None else
                           jax.random.fold_in(dropout_key, i))
      new_layers.append(layer_cache)
    if cache is None:
      return x, None
    return x, kv_cache.KVCache(layers=tuple(new_layers), lengths=new_lengths)

  def logits(self, h: jax.Array) -> jax.Array:
    """Final norm + LM head: [..., D] -> f32[..., V]."""
    h = self.final_norm(h)
    if self.cfg.tie_embeddings:
      return self.embed.attend(h)
    return self.lm_head(h, out_dtype=jnp.float32)

  def __call__(self, tokens: jax.Array, *, mode: Mode | str = Mode.TRAIN, **kwargs):
    """Returns (logits f32[B, T, V], cache or None). Keyword args as in `hidden`."""
    h, cache = self.hidden(tokens, mode=mode, **kwargs)
    return self.logits(h), cache
