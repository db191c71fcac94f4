"""`ModelConfig`: the frozen, validated description of a jaxsun decoder, and presets.

A config is hashable (it is static under `jax.jit`) and validated on construction, so a
bad value fails where it is written, with the field named in the message, e.g.
`ModelConfig.preset("tiny", n_kv_heads=3)` raises "ModelConfig.n_heads=4 must be
divisible by ModelConfig.n_kv_heads=3".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")
# How the softmax part of attention is computed (`jaxsun.nn.attention.sdpa`).
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "einsum", "naive")
# Rematerialisation policies of a block (`jaxsun.nn.decoder.REMAT_POLICIES`).
REMAT = ("none", "full", "dots", "dots_no_batch", "minimal")


@dataclasses.dataclass(frozen=True)
class AffineConfig:
  """The choices Affine-Scaled Attention's paper leaves open (papers.md §2.2).

  out = [alpha(X) softmax(QK^T / sqrt(d)) + beta(X)] V, alpha = phi(X W_alpha) one scalar
  per head per query token, beta = (alpha_ma - alpha) / N, alpha_ma an EMA of the
  batch-mean alpha updated in training steps only (`jaxsun.nn.attention.AlphaEMA`).

  Attributes:
    n: N in beta. "full" (default, the paper's "key sequence length"): the model's
      context `ModelConfig.max_len`, a constant, so every mode and every row of a padded
      batch agree and the per-query mass alpha + beta (t + 1) varies per query. "visible":
      the number of keys query t sees (t + 1); the weights of a row then sum to alpha_ma.
    alpha_ma: granularity of the moving average: "head" (default, one per layer and
      head) or "layer" (one scalar per layer).
    rho: EMA decay (the paper: 0.9).
    alpha_ma_init: alpha_ma before the first step (the paper: 0; a third-party port: 0.5).
    w_init: W_alpha's initialiser: "normal" (default, N(0, init_std^2) like every
      projection, so alpha starts near 0.5) or "zeros" (alpha = 0.5 exactly).
    phi: "linear_clip" (default, eq. 11: clip(0.1 x + 0.5, 0, 1)) or "sigmoid" (the
      paper's ablation).
  """

  n: str = "full"
  alpha_ma: str = "head"
  rho: float = 0.9
  alpha_ma_init: float = 0.0
  w_init: str = "normal"
  phi: str = "linear_clip"

  def __post_init__(self):
    choices = {"n": ("full", "visible"), "alpha_ma": ("head", "layer"),
               "w_init": ("normal", "zeros"), "phi": ("linear_clip", "sigmoid")}
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        raise ValueError(f"AffineConfig.{field}={getattr(self, field)!r} is not one of "
                         f"{allowed}.")
    if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) \
        or not 0.0 <= self.rho < 1.0:
      raise ValueError(f"AffineConfig.rho={self.rho!r} must be a number in [0, 1).")
    if isinstance(self.alpha_ma_init, bool) or not isinstance(self.alpha_ma_init, (int, float)):
      raise ValueError(f"AffineConfig.alpha_ma_init={self.alpha_ma_init!r} must be a number.")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3's RoPE frequency scaling (Hugging Face `rope_type: "llama3"`).

  Wavelengths longer than `original_max_len / low_freq_factor` are divided by `factor`,
  those shorter than `original_max_len / high_freq_factor` are kept, and the band in
  between is interpolated smoothly (`jaxsun.nn.layers.rope_inv_freq`).

  Attributes:
    factor: how much longer the context got (8.0 for Llama 3.1 / 32.0 for Llama 3.2).
    low_freq_factor: 1.0 in Meta's releases.
    high_freq_factor: 4.0 in Meta's releases.
    original_max_len: the pretraining context (`original_max_position_embeddings`, 8192).
  """

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192

  def __post_init__(self):
    for field in ("factor", "low_freq_factor", "high_freq_factor", "original_max_len"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"RopeScaling.{field}={value!r} must be a positive number.")
    if not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(
          f"RopeScaling.high_freq_factor={self.high_freq_factor} must exceed "
          f"RopeScaling.low_freq_factor={self.low_freq_factor}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-style decoder: pre-norm RMSNorm blocks, RoPE, GQA, SwiGLU, final norm.

  Attributes:
    vocab_size: number of token ids; inputs must lie in `[0, vocab_size)`.
    d_model: residual stream width.
    n_layers: number of transformer blocks.
    n_heads: query heads per block.
    n_kv_heads: key/value heads (grouped-query attention); must divide `n_heads`.
    d_ff: hidden width of the SwiGLU MLP.
    max_len: longest sequence (prompt + generated) the model accepts.
    head_dim: per-head width; `None` means `d_model // n_heads`. Must be even (RoPE).
    rope_theta: RoPE base frequency (10_000 classic Llama, 500_000 for Llama 3).
    rope_scaling: Llama 3's long-context frequency scaling, or None (plain RoPE).
    qkv_bias: the q/k/v projections add a bias (Qwen2); o_proj and the MLP never do.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: the LM head reuses the token embedding matrix.
    param_dtype: dtype the parameters are stored in.
    compute_dtype: dtype of matmul inputs; norms, softmax and logits are float32.
    attention: attention kind, a key of `jaxsun.nn.attention.ATTENTION_KINDS`:
      "softmax", "off_by_one", "sink", "gated", "affine", "affine_gated".
    attention_impl: how the softmax part runs: "auto" (default: cuDNN flash attention
      on a GPU, Pallas splash attention on a TPU, when the shapes allow, else XLA's fused
      `dot_product_attention`; on a CPU "einsum"), "xla", "cudnn", "splash" (TPU: the
      causal training mask with lengths a multiple of 128, XLA elsewhere;
      `jaxsun.nn.splash`), "einsum" (the fused path's rewrites around plain grouped
      einsums: a CPU has no fused kernel) or "naive" (each kind's float32 weight matrix
      times V: the reference).
    affine: Affine-Scaled Attention's options (`AffineConfig`); used by the affine kinds.
    scan_layers: the blocks' parameters are stacked on a leading layer axis and run under
      `jax.lax.scan` (one compiled block for any depth, as MaxText's `scan_layers`);
      `jaxsun.nn.decoder.stack_layers` / `unstack_layers` convert between the layouts.
    remat: what a block saves for the backward pass: "none" (everything), "full"
      (nothing: recompute the block), "dots" (matmul outputs), "dots_no_batch" (matmul
      outputs without batch dimensions, i.e. weights-only products) or "minimal" (the
      attention output and the projections' outputs, by name).
    fp8: FP8 matmuls in the attention and MLP projections: "none", "delayed" (training:
      E4M3 forward, E5M2 gradients, delayed per-tensor scales) or "current" (inference:
      per-token / per-channel current scales). See `jaxsun.nn.fp8_linear`.
    init_std: standard deviation of the normal initialiser of weight matrices.
    name: a label (the preset's name), informational only.
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  max_len: int
  head_dim: int | None = None
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  attention: str = "softmax"
  attention_impl: str = "auto"
  affine: AffineConfig = AffineConfig()
  scan_layers: bool = False
  remat: str = "none"
  fp8: str = "none"
  init_std: float = 0.02
  name: str = "custom"

  def __post_init__(self):
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                  "max_len"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{field}={value!r} must be a positive integer.")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"ModelConfig.n_heads={self.n_heads} must be divisible by "
          f"ModelConfig.n_kv_heads={self.n_kv_heads} (grouped-query attention).")
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(
            f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
            "set ModelConfig.head_dim explicitly.")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) \
        or self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim!r} must be a positive even "
                       "integer (RoPE rotates pairs of channels).")
    if not self.rope_theta > 0:
      raise ValueError(f"ModelConfig.rope_theta={self.rope_theta!r} must be > 0.")
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"ModelConfig.rope_scaling={self.rope_scaling!r} must be a "
                       "RopeScaling or None.")
    if not isinstance(self.qkv_bias, bool):
      raise ValueError(f"ModelConfig.qkv_bias={self.qkv_bias!r} must be a bool.")
    if not self.norm_eps > 0:
      raise ValueError(f"ModelConfig.norm_eps={self.norm_eps!r} must be > 0.")
    if not self.init_std > 0:
      raise ValueError(f"ModelConfig.init_std={self.init_std!r} must be > 0.")
    for field in ("param_dtype", "compute_dtype"):
      if getattr(self, field) not in DTYPES:
        raise ValueError(
            f"ModelConfig.{field}={getattr(self, field)!r} is not one of {DTYPES}.")
    if self.fp8 not in ("none", "delayed", "current"):
      raise ValueError(f"ModelConfig.fp8={self.fp8!r} is not one of "
                       "('none', 'delayed', 'current').")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl={self.attention_impl!r} is not one of "
                       f"{ATTENTION_IMPLS}.")
    if not isinstance(self.affine, AffineConfig):
      raise ValueError(f"ModelConfig.affine={self.affine!r} must be an AffineConfig.")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"ModelConfig.scan_layers={self.scan_layers!r} must be a bool.")
    if self.remat not in REMAT:
      raise ValueError(f"ModelConfig.remat={self.remat!r} is not one of {REMAT}.")
    from jaxsun.nn import attention  # pylint: disable=g-import-not-at-top  (registry)
    if self.attention not in attention.ATTENTION_KINDS:
      raise ValueError(
          f"ModelConfig.attention={self.attention!r} is unknown; registered kinds: "
          f"{sorted(attention.ATTENTION_KINDS)}.")

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def dtype(self) -> jnp.dtype:
    """The compute dtype as a numpy dtype."""
    return jnp.dtype(self.compute_dtype)

  @property
  def q_dim(self) -> int:
    return self.n_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.n_kv_heads * self.head_dim

  def replace(self, **changes: Any) -> ModelConfig:
    """A copy with `changes` applied (and validated again)."""
    if "head_dim" not in changes and ("d_model" in changes or "n_heads" in changes):
      changes["head_dim"] = None  # re-derive
    return dataclasses.replace(self, **changes)

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> ModelConfig:
    """A named preset (see `PRESETS`), with optional field overrides."""
    if name not in PRESETS:
      raise ValueError(f"unknown ModelConfig preset {name!r}; available: {sorted(PRESETS)}.")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

  def num_params(self) -> int:
    """Parameter count from the formula (tests check it against the built model)."""
    d = self.d_model
    attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
    if self.qkv_bias:
      attn += self.q_dim + 2 * self.kv_dim
    attn += self.attention_params()
    mlp = 3 * d * self.d_ff
    block = attn + mlp + 2 * d  # two RMSNorm scales
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.n_layers * block + d + head

  def attention_params(self) -> int:
    """Trainable parameters a variant adds to each block (the papers' "Delta Params")."""
    extra = 0
    if self.attention in ("gated", "affine_gated"):
      extra += self.d_model * self.q_dim  # W_gate: head-specific elementwise gate
    if self.attention in ("affine", "affine_gated"):
      extra += self.d_model * self.n_heads  # W_alpha: one alpha per head per token
    if self.attention == "sink":
      extra += self.n_heads  # one sink logit per head
    return extra

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward, PaLM appendix B style).

    6 * (non-embedding matmul params + LM head) plus the attention score/value matmuls,
    `12 * n_layers * seq_len * q_dim` for a full (non-causal-discounted) context.
    """
    d = self.d_model
    attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
    matmul_params = self.n_layers * (attn + 3 * d * self.d_ff) + d * self.vocab_size
    return 6.0 * matmul_params + 12.0 * self.n_layers * seq_len * self.q_dim


PRESETS: dict[str, ModelConfig] = {
    # For unit tests: tiny enough to compile in a second on CPU.
    "tiny": ModelConfig(name="tiny", vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, d_ff=128, max_len=64),
    # ~10.5M parameters, for the shipped-corpus experiments (4k BPE vocabulary).
    "10m": ModelConfig(name="10m", vocab_size=4096, d_model=256, n_layers=12, n_heads=8,
                       n_kv_heads=4, d_ff=768, max_len=512),
    # ~124M parameters (GPT-2-small scale), 32k vocabulary.
    "125m": ModelConfig(name="125m", vocab_size=32768, d_model=768, n_layers=12,
                        n_heads=12, n_kv_heads=4, d_ff=2560, max_len=2048),
    # Shapes of Meta's Llama 3.2 1B / Llama 3.1 8B (for benchmarks and weight import).
    "llama-3.2-1b": ModelConfig(name="llama-3.2-1b", vocab_size=128256, d_model=2048,
                                n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                                max_len=131072, rope_theta=500_000.0,
                                rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True,
                                param_dtype="bfloat16", compute_dtype="bfloat16"),
    "llama-3.1-8b": ModelConfig(name="llama-3.1-8b", vocab_size=128256, d_model=4096,
                                n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                                max_len=131072, rope_theta=500_000.0,
                                rope_scaling=RopeScaling(factor=8.0), tie_embeddings=False,
                                param_dtype="bfloat16", compute_dtype="bfloat16"),
}
