"""Pallas splash attention (TPU flash attention) in jaxsun's attention layout.

`splash_attention` wraps `jax.experimental.pallas.ops.tpu.splash_attention`: the block-
sparse flash-attention kernels (forward, dq and dkv, with a custom VJP) that MaxText uses
on TPU. `jaxsun.nn.attention.sdpa` routes the causal training mask here when
`ModelConfig.attention_impl` is "splash" (or "auto" on a TPU, see `resolve_impl`).

How our layout maps onto the kernel:

  * GQA without repeating K/V: the kernel's MHA form takes q [H, T, hd] and k, v
    [Hkv, S, hd] and lets query head h read KV head h // G, which is exactly our
    grouping q [B, T, Hkv, G, hd] flattened to h = kv * G + g. The batch is a `vmap`.
  * Splash does not scale the logits: q is multiplied by 1/sqrt(hd) first.
  * The sink logit (kinds "sink", "off_by_one") is splash's native `sinks` argument (one
    logit per query head, in the denominator only), with its own gradient; no extra key.
  * Masks: `CausalMask` (key s visible to query t iff s <= t) or none, optionally and-ed
    with segment ids (packed sequences: same id only).

Shape constraints (`shape_error`): T and S multiples of 128. Each block size of
`SplashConfig` is shrunk to the largest multiple of 128 that divides the sequence, so any
such length tiles. Any head_dim lowers (blocks span the whole head dimension);
`resolve_impl` still takes splash automatically only for head_dim % 128 == 0, the shape
the MXU is built for.

On CPU the kernel runs only in the TPU interpreter: pass
`interpret=pltpu.InterpretParams()` or wrap the call in
`pltpu.force_tpu_interpret_mode()` (tests/test_splash_attention.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask)

LANES = 128  # every splash block (and so every sequence length) is a multiple of this

# Logits of masked pairs in the reference (finite, as `attention.MASK_VALUE`).
MASK_VALUE = -1e30

_BLOCK_FIELDS = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                 "block_kv_dkv_compute", "block_q_dq", "block_kv_dq")


@dataclasses.dataclass(frozen=True)
class SplashConfig:
  """Tile sizes of the splash kernels (`splash_attention_kernel.BlockSizes`).

  They change speed, not results (up to float summation order). Each is an upper bound:
  for a sequence of length n the kernel uses the largest multiple of 128 that is at most
  the field and divides n (`block_sizes`). Defaults follow MaxText's (512 everywhere).

  Attributes:
    block_q: forward pass, queries per block.
    block_kv: forward pass, keys per block.
    block_kv_compute: forward pass, keys per inner step; divides block_kv.
    block_q_dkv, block_kv_dkv, block_kv_dkv_compute: the same for the dK/dV kernel.
    block_q_dq, block_kv_dq: the dQ kernel (unused when use_fused_bwd_kernel).
    use_fused_bwd_kernel: compute dQ inside the dK/dV kernel (one backward kernel,
      more memory for partial dQ sums).
  """

  block_q: int = 512
  block_kv: int = 512
  block_kv_compute: int = 512
  block_q_dkv: int = 512
  block_kv_dkv: int = 512
  block_kv_dkv_compute: int = 512
  block_q_dq: int = 512
  block_kv_dq: int = 512
  use_fused_bwd_kernel: bool = False

  def __post_init__(self):
    for name in _BLOCK_FIELDS:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0 \
          or value % LANES:
        raise ValueError(f"SplashConfig.{name}={value!r} must be a positive multiple of "
                         f"{LANES}")
    for outer, inner in (("block_kv", "block_kv_compute"),
                         ("block_kv_dkv", "block_kv_dkv_compute")):
      if getattr(self, outer) % getattr(self, inner):
        raise ValueError(f"SplashConfig.{inner}={getattr(self, inner)} must divide "
                         f"SplashConfig.{outer}={getattr(self, outer)}")
    if not isinstance(self.use_fused_bwd_kernel, bool):
      raise ValueError(f"SplashConfig.use_fused_bwd_kernel={self.use_fused_bwd_kernel!r} "
                       "must be a bool")

  def block_sizes(self, q_len: int, kv_len: int) -> splash_kernel.BlockSizes:
    """The kernel's `BlockSizes` for these lengths (each field fitted, see the class)."""
    err = shape_error(q_len, kv_len)
    if err:
      raise ValueError(err)
    bkv = _fit(self.block_kv, kv_len)
    bkv_dkv = _fit(self.block_kv_dkv, kv_len)
    fused = self.use_fused_bwd_kernel
    return splash_kernel.BlockSizes(
        block_q=_fit(self.block_q, q_len),
        block_kv=bkv,
        block_kv_compute=_fit(self.block_kv_compute, bkv),
        block_q_dkv=_fit(self.block_q_dkv, q_len),
        block_kv_dkv=bkv_dkv,
        block_kv_dkv_compute=_fit(self.block_kv_dkv_compute, bkv_dkv),
        block_q_dq=None if fused else _fit(self.block_q_dq, q_len),
        block_kv_dq=None if fused else _fit(self.block_kv_dq, kv_len),
        use_fused_bwd_kernel=fused)


def _fit(block: int, n: int) -> int:
  """The largest multiple of LANES that is <= block and divides n (n % LANES == 0)."""
  b = min(block, n) // LANES * LANES
  while n % b:
    b -= LANES
  return b


def shape_error(q_len: int, kv_len: int) -> str | None:
  """Why splash cannot take these sequence lengths, or None when it can."""
  for name, n in (("query", q_len), ("key", kv_len)):
    if n <= 0 or n % LANES:
      return (f"splash attention needs the {name} length to be a positive multiple of "
              f"{LANES}, got {n}")
  return None


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     sink: jax.Array | None = None,
                     segment_ids: jax.Array | None = None,
                     causal: bool = True,
                     config: SplashConfig = SplashConfig(),
                     interpret=False) -> jax.Array:
  """softmax(q k^T / sqrt(hd)) v through the splash kernels.

  Args:
    q: [B, T, Hkv, G, hd] queries (grouped by KV head).
    k: [B, S, Hkv, hd] keys (cast to q's dtype).
    v: [B, S, Hkv, hd] values (cast to q's dtype).
    sink: f32[Hkv, G] logits added to the softmax denominator only (e^x / (e^sink +
      sum e^x)), or None.
    segment_ids: i32[B, T] self-attention segments (requires T == S), or None.
    causal: query t sees keys s <= t (else every key, up to segments).
    config: block sizes.
    interpret: passed to the Pallas calls: False on TPU, `pltpu.InterpretParams()` to
      run the TPU interpreter on CPU.

  Returns:
    [B, T, Hkv, G, hd] in q's dtype.
  """
  b, t, hkv, g, hd = q.shape
  s = k.shape[1]
  if k.shape != (b, s, hkv, hd) or v.shape != k.shape:
    raise ValueError(f"splash_attention: q {q.shape} needs k and v of shape "
                     f"[B, S, Hkv, hd] = [{b}, S, {hkv}, {hd}], got {k.shape}, {v.shape}")
  if segment_ids is not None and (t != s or segment_ids.shape != (b, t)):
    raise ValueError(f"splash_attention: segment_ids {segment_ids.shape} must be "
                     f"[B, T] = [{b}, {t}] with T == S (self-attention), S = {s}")
  h = hkv * g
  head_mask = splash_mask.CausalMask((t, s)) if causal else splash_mask.FullMask((t, s))
  kernel = splash_kernel.make_splash_mha_single_device(
      splash_mask.MultiHeadMask([head_mask] * h), block_sizes=config.block_sizes(t, s),
      interpret=interpret)
  scale = 1.0 / float(hd) ** 0.5
  qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 3, 1, 4).reshape(b, h, t, hd)
  # qh: [B, H, T, hd], head h = kv * G + g reads KV head h // G
  kh = k.astype(q.dtype).transpose(0, 2, 1, 3)  # [B, Hkv, S, hd]
  vh = v.astype(q.dtype).transpose(0, 2, 1, 3)  # [B, Hkv, S, hd]
  sinks = None if sink is None else sink.astype(jnp.float32).reshape(h)  # f32[H]
  if segment_ids is None:
    seg, seg_axes = None, None
  else:
    ids = segment_ids.astype(jnp.int32)  # i32[B, T]
    seg, seg_axes = splash_kernel.SegmentIds(q=ids, kv=ids), splash_kernel.SegmentIds(0, 0)
  out = jax.vmap(kernel, in_axes=(0, 0, 0, seg_axes, None))(qh, kh, vh, seg, sinks)
  # out: [B, H, T, hd]
  return out.reshape(b, hkv, g, t, hd).transpose(0, 3, 1, 2, 4)  # [B, T, Hkv, G, hd]


def splash_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     sink: jax.Array | None = None,
                     segment_ids: jax.Array | None = None,
                     causal: bool = True) -> jax.Array:
  """What `splash_attention` computes, in plain float32 jnp (materialises the scores).

  Same arguments and layout as `splash_attention`; returns f32[B, T, Hkv, G, hd].
  """
  t, s = q.shape[1], k.shape[1]
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  scores = jnp.einsum("btkgd,bskd->bkgts", q32, k32) / jnp.sqrt(
      jnp.float32(q.shape[-1]))  # f32[B, Hkv, G, T, S]
  mask = jnp.ones((1, t, s), bool)  # bool[1 or B, T, S]
  if causal:
    mask &= jnp.arange(s)[None, None, :] <= jnp.arange(t)[None, :, None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
  m = jnp.max(scores, axis=-1, keepdims=True)  # f32[B, Hkv, G, T, 1]
  extra = 0.0
  if sink is not None:
    sk = sink.astype(jnp.float32)[None, :, :, None, None]  # f32[1, Hkv, G, 1, 1]
    m = jnp.maximum(m, sk)
    extra = jnp.exp(sk - m)
  e = jnp.exp(scores - m)  # f32[B, Hkv, G, T, S]
  p = e / (jnp.sum(e, axis=-1, keepdims=True) + extra)
  return jnp.einsum("bkgts,bskd->btkgd", p, v32)  # f32[B, T, Hkv, G, hd]
