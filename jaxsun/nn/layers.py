"""Basic layers: `Linear`, `Embedding`, `RMSNorm`, `SwiGLU` and rotary embeddings.

Every parameter carries its *logical* axis names as `out_sharding` metadata (e.g.
`("embed", "mlp")`); `jaxsun.parallel` maps those names onto a device mesh. Eager
sharding is off, so modules are built the same way with or without a mesh.

Weights are stored in `param_dtype` and cast to the compute dtype at use; norms, RoPE
and everything statistical run in float32.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], *,
          dtype, std: float | None = None, value: float | None = None) -> nnx.Param:
  """A `nnx.Param` initialised N(0, std^2) (or to a constant), tagged with logical axes."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
  if value is not None:
    init = jnp.full(shape, value, dtype)
  else:
    init = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(init, out_sharding=axes, eager_sharding=False)


def dense_call(module, x: jax.Array, key: jax.Array | None, index: int, out_dtype=None):
  """Calls a dense layer, passing a per-layer dropout key to those that take one.

  Only adapter layers (`jaxsun.lora.LoRALinear`, `takes_dropout_key = True`) use the
  key; plain, FP8 and codebook layers are called as before.
  """
  kw = {} if out_dtype is None else {"out_dtype": out_dtype}
  if key is not None and getattr(module, "takes_dropout_key", False):
    kw["key"] = jax.random.fold_in(key, index)
  return module(x, **kw)


class Linear(nnx.Module):
  """y = x @ W without bias; W is f[in, out]. The unit that quantized layers replace."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str, str], *,
               std: float, param_dtype, dtype, rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.dtype = jnp.dtype(dtype)
    self.kernel = param(rngs, (in_features, out_features), axes, dtype=param_dtype, std=std)

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., in] -> [..., out]
    out_dtype = self.dtype if out_dtype is None else out_dtype
    return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   preferred_element_type=out_dtype)


def swap_linears(module: nnx.Module, regex: str, make) -> nnx.Module:
  """Replaces, in place, every plain `Linear` under `module` whose path ("layers/0/mlp/
  up_proj") fully matches `regex` by `make(linear)`; returns `module`. How FP8 and
  masked-GEMM layers are put into a model."""
  for path, m in list(nnx.iter_modules(module)):
    if type(m) is Linear and re.fullmatch(regex, "/".join(map(str, path))):
      parent = module
      for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
      setattr(parent, path[-1], make(m))
  return module


class Embedding(nnx.Module):
  """Token embedding table f[vocab, d]; `attend` is the tied LM head."""

  def __init__(self, vocab_size: int, d_model: int, *, std: float, param_dtype, dtype,
               rngs: nnx.Rngs):
    self.dtype = jnp.dtype(dtype)
    self.embedding = param(rngs, (vocab_size, d_model), ("vocab", "embed"),
                           dtype=param_dtype, std=std)

  def __call__(self, tokens: jax.Array) -> jax.Array:  # i32[B, T] -> [B, T, D]
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> f32[B, T, V]
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T,
                   preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32, returned in `dtype`."""

  def __init__(self, dim: int, *, eps: float, param_dtype, dtype):
    self.eps, self.dtype = eps, jnp.dtype(dtype)
    self.scale = param(None, (dim,), ("norm",), dtype=param_dtype, value=1.0)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)), the Llama MLP."""

  def __init__(self, d_model: int, d_ff: int, *, std: float, param_dtype, dtype,
               rngs: nnx.Rngs):
    kw = dict(std=std, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
    dense = Linear  # quantized variants replace them afterwards (jaxsun.quant)
    self.gate_proj = dense(d_model, d_ff, ("embed", "mlp"), **kw)
    self.up_proj = dense(d_model, d_ff, ("embed", "mlp"), **kw)
    self.down_proj = dense(d_ff, d_model, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    # Named for `remat="minimal"` (`jaxsun.nn.decoder.REMAT_POLICIES`); a no-op otherwise.
    gate = checkpoint_name(dense_call(self.gate_proj, x, key, 0), "mlp_gate")  # [..., F]
    up = checkpoint_name(dense_call(self.up_proj, x, key, 1), "mlp_up")  # [..., F]
    return dense_call(self.down_proj, jax.nn.silu(gate) * up, key, 2)


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> jax.Array:
  """RoPE inverse frequencies f32[head_dim / 2], with Llama 3's scaling if given.

  Args:
    head_dim: per-head width (even).
    theta: base frequency.
    scaling: a `jaxsun.config.RopeScaling` or None.
  """
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))  # f32[hd/2]
  if scaling is None:
    return inv_freq
  # Llama 3: keep short wavelengths, stretch long ones by `factor`, blend in between.
  old = float(scaling.original_max_len)
  wavelen = 2 * jnp.pi / inv_freq
  smooth = (old / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  out = jnp.where(wavelen > old / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
  medium = (wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor)
  return jnp.where(medium, blended, out)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, scaling=None) -> jax.Array:
  """Rotary position embedding, "rotate-half" layout (as in Llama / Hugging Face).

  Hugging Face checkpoints already store q/k projections permuted for rotate-half (their
  conversion script permutes Meta's interleaved layout), so imported weights need no
  permutation here.

  Args:
    x: [B, T, H, hd] queries or keys.
    positions: i32[B, T] absolute positions.
    theta: base frequency.
    scaling: optional `jaxsun.config.RopeScaling` (Llama 3 long-context frequencies).

  Returns:
    [B, T, H, hd] in x's dtype, computed in float32.
  """
  inv_freq = rope_inv_freq(x.shape[-1], theta, scaling)  # f32[hd/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # f32[B, T, hd/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)
