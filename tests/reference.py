"""An independent float64 NumPy implementation of the decoder and of the split forward.

Written from the equations (Llama: RMSNorm, rotate-half RoPE, GQA with kv head h // G,
SwiGLU), one row at a time with plain loops, sharing no code with `jaxsun`.
"""

import numpy as np
from flax import nnx


def numpy_params(state: nnx.State) -> dict:
  """nnx.State -> nested dict of float64 numpy arrays."""
  def conv(tree):
    if isinstance(tree, dict):
      return {k: conv(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)
  return conv(nnx.to_pure_dict(state))


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, pos, theta):  # x [T, H, hd], pos [T]
  half = x.shape[-1] // 2
  freq = 1.0 / theta ** (np.arange(half) / half)
  ang = pos[:, None, None] * freq[None, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                         x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def _qkv(p, xn, cfg, pos):
  t = xn.shape[0]
  q = (xn @ p["q_proj"]["kernel"]).reshape(t, cfg.n_heads, cfg.head_dim)
  k = (xn @ p["k_proj"]["kernel"]).reshape(t, cfg.n_kv_heads, cfg.head_dim)
  v = (xn @ p["v_proj"]["kernel"]).reshape(t, cfg.n_kv_heads, cfg.head_dim)
  return _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta), v


def _causal_attention(q, k, v, cfg):  # q [T, H, hd]; k, v [T, Hkv, hd]
  t = q.shape[0]
  group = cfg.n_heads // cfg.n_kv_heads
  out = np.zeros_like(q)
  for h in range(cfg.n_heads):
    kh, vh = k[:, h // group], v[:, h // group]
    for i in range(t):
      s = kh[:i + 1] @ q[i, h] / np.sqrt(cfg.head_dim)
      w = np.exp(s - s.max())
      out[i, h] = (w / w.sum()) @ vh[:i + 1]
  return out.reshape(t, -1)


def _mlp(p, x):
  g = x @ p["gate_proj"]["kernel"]
  return ((g / (1 + np.exp(-g))) * (x @ p["up_proj"]["kernel"])) @ p["down_proj"]["kernel"]


def _head(p, x, cfg):
  x = _rms(x, p["final_norm"]["scale"], cfg.norm_eps)
  w = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
  return x @ w


def split_forward_row(pp, pd, cfg, tokens, n_prefill):
  """Logits [T, V] of one row: positions < n_prefill from the prefill params `pp`,
  the rest from the decode params `pd`, whose attention reads the prefill K/V for
  positions < n_prefill at every layer."""
  t = len(tokens)
  pos = np.arange(t, dtype=np.float64)
  xp, xd = pp["embed"]["embedding"][tokens], pd["embed"]["embedding"][tokens]
  for layer in range(cfg.n_layers):
    lp, ld = pp["layers"][layer], pd["layers"][layer]
    qp, kp, vp = _qkv(lp["attn"], _rms(xp, lp["attn_norm"]["scale"], cfg.norm_eps), cfg, pos)
    qd, kd, vd = _qkv(ld["attn"], _rms(xd, ld["attn_norm"]["scale"], cfg.norm_eps), cfg, pos)
    kmix = np.concatenate([kp[:n_prefill], kd[n_prefill:]])
    vmix = np.concatenate([vp[:n_prefill], vd[n_prefill:]])
    xp = xp + _causal_attention(qp, kp, vp, cfg) @ lp["attn"]["o_proj"]["kernel"]
    xd = xd + _causal_attention(qd, kmix, vmix, cfg) @ ld["attn"]["o_proj"]["kernel"]
    xp = xp + _mlp(lp["mlp"], _rms(xp, lp["mlp_norm"]["scale"], cfg.norm_eps))
    xd = xd + _mlp(ld["mlp"], _rms(xd, ld["mlp_norm"]["scale"], cfg.norm_eps))
  return np.concatenate([_head(pp, xp, cfg)[:n_prefill], _head(pd, xd, cfg)[n_prefill:]])


def forward_row(p, cfg, tokens):
  """Plain causal forward of one row: logits [T, V]."""
  return split_forward_row(p, p, cfg, tokens, len(tokens))
