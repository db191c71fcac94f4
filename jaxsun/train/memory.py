"""Memory estimate of a training run per device, printed before a launch and checked.

    est = estimate_memory(cfg, trainability="prefill", untied=True, batch_size=16,
                          seq_len=1024, mesh_shape=(1, 8, 1))
    print(est.report())
    est.check(device_memory_gb=80)   # ValueError with the numbers if it cannot fit

What is counted (bytes, per device, assuming every sharded dimension divides):
  * parameters: every tree the run holds (an untied split holds two), in `param_dtype`,
    split over fsdp x tensor;
  * trainable state: gradients plus AdamW's two moments (three copies of the trainable
    parameters, optax keeps the moments in the parameters' dtype), split the same way;
  * activations of one micro-batch kept for the backward pass: per layer and token the
    block's inputs and intermediates in the compute dtype plus float32 attention scores
    and probabilities (2 x heads x seq_len) for naive attention (a fused op keeps its
    log-sum-exp), less under `ModelConfig.remat` ("full": the block input, plus one
    layer recomputed at a time; "minimal": the named projections), and float32 logits
    and their gradient at the head; both trees' when untied (each runs over the
    sequence); split over data x fsdp (batch) and tensor;
  * optionally a KV cache for generation: 2 x layers x batch x length x kv_dim.
An estimate, not a measurement: XLA's temporaries and fragmentation come on top, so
`check` keeps `headroom` (10% by default) free.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxsun.config import ModelConfig

GB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of each part (see the module docstring)."""

  params: int
  trainable_state: int
  activations: int
  kv_cache: int
  trainable_params: int
  devices: int

  @property
  def total(self) -> int:
    return self.params + self.trainable_state + self.activations + self.kv_cache

  def report(self) -> str:
    rows = [("parameters", self.params), ("gradients + AdamW moments", self.trainable_state),
            ("activations (one micro-batch)", self.activations), ("KV cache", self.kv_cache),
            ("total", self.total)]
    lines = [f"memory estimate per device ({self.devices} device(s), "
             f"{self.trainable_params:,} trainable parameters):"]
    lines += [f"  {name:32s} {value / GB:10.3f} GiB" for name, value in rows]
    return "\n".join(lines)

  def check(self, device_memory_gb: float, headroom: float = 0.1) -> None:
    """Raises ValueError, with the numbers, when the estimate exceeds the device."""
    if device_memory_gb <= 0:
      return
    budget = device_memory_gb * GB * (1 - headroom)
    if self.total > budget:
      raise ValueError(
          f"this run needs about {self.total / GB:.1f} GiB per device, more than "
          f"{device_memory_gb:g} GiB less {headroom:.0%} headroom ({budget / GB:.1f} GiB):\n"
          f"{self.report()}\nuse a bigger mesh (fsdp / tensor), a LoRA regime, a smaller "
          "micro-batch (accum_steps) or a shorter sequence")


def estimate_memory(cfg: ModelConfig, *, trainability: str, untied: bool, batch_size: int,
                    seq_len: int, accum_steps: int = 1,
                    mesh_shape: tuple[int, int, int] = (1, 1, 1),
                    trainable_params: int | None = None, kv_batch: int = 0,
                    kv_len: int = 0) -> MemoryEstimate:
  """The memory estimate of one training (and optional generation) setting.

  Args:
    cfg: the model.
    trainability: "prefill", "decode", "both" or "none".
    untied: the split holds two trees (SUN / PrefillShare task models, untied full).
    batch_size: global batch (rows) per optimizer step.
    seq_len: tokens per row.
    accum_steps: micro-batches per step (activations are held for one).
    mesh_shape: (data, fsdp, tensor).
    trainable_params: override (e.g. LoRA adapters only); default from the regime.
    kv_batch, kv_len: add a generation KV cache of this batch and length.
  """
  data, fsdp, tensor = mesh_shape
  if min(mesh_shape) < 1 or batch_size < 1 or seq_len < 1 or accum_steps < 1:
    raise ValueError(f"mesh_shape={mesh_shape}, batch_size={batch_size}, seq_len={seq_len} "
                     f"and accum_steps={accum_steps} must be positive")
  p_bytes = np.dtype(cfg.params_dtype).itemsize
  c_bytes = np.dtype(cfg.dtype).itemsize
  n = cfg.num_params()
  trees = 2 if untied else 1
  if trainable_params is None:
    trainable_params = {"none": 0, "prefill": n, "decode": n,
                        "both": trees * n}[trainability]
  model_split = fsdp * tensor
  params = trees * n * p_bytes / model_split
  trainable_state = 3 * trainable_params * p_bytes / model_split
  micro = math.ceil(batch_size / accum_steps)
  d, h = cfg.d_model, cfg.n_heads
  # Naive attention keeps float32 scores and probabilities; a fused op its log-sum-exp.
  scores = 4 * 2 * h * seq_len if cfg.attention_impl == "naive" else 4 * h
  per_token_layer = (c_bytes * (6 * d + 2 * cfg.q_dim + 2 * cfg.kv_dim + 3 * cfg.d_ff)
                     + scores)
  # Remat keeps less per layer, and recomputes one layer's intermediates at a time.
  recompute = 0
  if cfg.remat == "full":
    per_token_layer, recompute = c_bytes * d, per_token_layer
  elif cfg.remat == "minimal":  # named q/k/v, attention output, MLP gate/up + the input
    per_token_layer, recompute = (c_bytes * (d + 2 * cfg.q_dim + 2 * cfg.kv_dim
                                             + 2 * cfg.d_ff), per_token_layer)
  per_token_head = 4 * 2 * cfg.vocab_size + c_bytes * d
  tokens = micro * seq_len
  activations = trees * tokens * (cfg.n_layers * per_token_layer + recompute
                                  + per_token_head)
  activations /= data * fsdp * tensor
  kv = 2 * cfg.n_layers * kv_batch * kv_len * cfg.kv_dim * c_bytes / (data * fsdp * tensor)
  return MemoryEstimate(params=int(params), trainable_state=int(trainable_state),
                        activations=int(activations), kv_cache=int(kv),
                        trainable_params=int(trainable_params),
                        devices=data * fsdp * tensor)
