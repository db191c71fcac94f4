"""Block-output reconstruction over jaxsun's decoder: FlexRound, LRQ and UniQuanF's driver.

For each decoder block in order, with calibration sequences X (i32[n, T]):

    target  = float block(x_fp)            x_fp: the float model's inputs to this block
    minimise  mean_tokens || qblock_theta(x_q) - target ||^2   over the method's params
              x_q: the inputs the already-quantized prefix produces
    then    x_fp <- target, x_q <- qblock(x_q) with the exported weights

(the loss of the LRQ / UniQuanF code: squared error summed over the hidden size, averaged
over tokens). Adam with cosine decay to 0, one jitted step per block structure; the
method (`jaxsun.quant.ptq.methods`) is the only thing that differs between FlexRound,
LRQ and UniQuanF. With `ReconConfig.act_quant` the block's activations (and K/V
projections) are fake-quantized during reconstruction as the scheme says; otherwise the
weights are reconstructed against float activations (what the LRQ code does for W4A8).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsun.nn.layers import Linear
from jaxsun.quant import qlinear
from jaxsun.quant.ptq import methods as methods_lib
from jaxsun.quant.schemes import IntScheme
from jaxsun.train import optim

KV_LAYERS = ("attn/k_proj", "attn/v_proj")


@dataclasses.dataclass(frozen=True)
class ReconConfig:
  """Block reconstruction settings.

  Attributes:
    steps: optimizer steps per block (the papers: 5000 LRQ, 2560 UniQuanF, batch 1).
    batch_size: calibration sequences per step.
    lr: learning rate of the quantizer's scale / transformation parameters ("u").
    lr_b: learning rate of UniQuanF's BCQ scales and shift ("b"); None: lr / 10 (the
      official 5e-3 / 5e-4).
    act_quant: fake-quantize activations and K/V during reconstruction.
    seed: batch order and random initialisation (LRQ's factor).
  """

  steps: int = 200
  batch_size: int = 4
  lr: float = 1e-3
  lr_b: float | None = None
  act_quant: bool = False
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.steps, int) or self.steps < 0:
      raise ValueError(f"ReconConfig.steps={self.steps!r} must be an int >= 0 "
                       f"(0: the method's initialisation, e.g. RTN for LRQ)")
    if not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f"ReconConfig.batch_size={self.batch_size!r} must be a positive int")
    for name in ("lr", "lr_b"):
      v = getattr(self, name)
      if v is not None and not (isinstance(v, (int, float)) and v > 0):
        raise ValueError(f"ReconConfig.{name}={v!r} must be > 0")


def _get(root, path: tuple):
  mod = root
  for p in path:
    mod = mod[p] if isinstance(p, int) else getattr(mod, p)
  return mod


def _set(root, path: tuple, value) -> None:
  parent = _get(root, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _local(name: str, i: int) -> tuple | None:
  """"layers/3/attn/q_proj" -> ("attn", "q_proj") for block 3, else None."""
  prefix = f"layers/{i}/"
  if not name.startswith(prefix):
    return None
  return tuple(int(p) if p.isdigit() else p for p in name[len(prefix):].split("/"))


def sim_block(block: nnx.Module, schemes: dict[tuple, IntScheme], *, act_quant: bool,
              act_scales: dict[tuple, Any], weights: dict[tuple, jax.Array] | None = None
              ) -> nnx.Module:
  """A copy of `block` whose selected Linears are `SimLinear`s (weights optional)."""
  blk = nnx.clone(block)
  for path, scheme in schemes.items():
    lin = _get(blk, path)
    kernel = lin.kernel[...] if weights is None else weights[path]
    on = act_quant and scheme.act is not None
    kv = scheme.kv if act_quant and "/".join(map(str, path)) in KV_LAYERS else None
    _set(blk, path, qlinear.SimLinear(kernel, dtype=lin.dtype, act=scheme.act if on else None,
                                      kv=kv, act_scale=act_scales.get(path) if on else None))
  return blk


def _batched(fn, x, batch: int):
  return jnp.concatenate([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)], axis=0)


def _forward(blk, x):  # f[B, T, D] -> f[B, T, D], train mode (causal, no cache)
  pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  return blk(x, pos, causal=True)[0]


_run_block = nnx.jit(_forward)


class BlockResult(NamedTuple):
  """One block's reconstruction: per local path, the export, the learned params and
  state, and the learnable-parameter count; and the training loss at each step."""

  exports: dict
  params: dict
  state: dict
  counts: dict
  losses: list


def _optimizer(method, params, cfg: ReconConfig):
  def adam(lr):
    opt = optim.OptimizerConfig(learning_rate=lr, schedule="cosine", end_lr_fraction=0.0,
                                b2=0.999, weight_decay=0.0, grad_clip_norm=0.0)
    return optim.make_optimizer(opt, cfg.steps)[0]
  labels = {k: method.labels(p) for k, p in params.items()}
  lr_b = cfg.lr / 10 if cfg.lr_b is None else cfg.lr_b
  return optax.multi_transform({"u": adam(cfg.lr), "b": adam(lr_b)}, labels)


def reconstruct_block(block: nnx.Module, schemes: dict[tuple, IntScheme], method,
                      x_q: jax.Array, target: jax.Array, cfg: ReconConfig, key: jax.Array,
                      act_scales: dict[tuple, Any] | None = None):
  """Learns one block's quantizers (a `BlockResult`).

  Args:
    block: the float block.
    schemes: {local path ("attn", "q_proj"): IntScheme} of the Linears to quantize.
    method: a `jaxsun.quant.ptq.methods` object.
    x_q: f[n, T, D] inputs from the quantized prefix.
    target: f[n, T, D] float block outputs.
    cfg: settings.
    key: PRNG key (initialisation and batch order).
    act_scales: calibrated static activation scales by path.
  """
  act_scales = act_scales or {}
  sim = sim_block(block, schemes, act_quant=cfg.act_quant, act_scales=act_scales)
  graphdef, state = nnx.split(sim)
  w0 = {p: jnp.asarray(_get(block, p).kernel[...], jnp.float32) for p in schemes}
  k_init, k_batch = jax.random.split(key)
  params, qstate = {}, {}
  for j, (p, scheme) in enumerate(schemes.items()):
    params[p], qstate[p] = method.init(w0[p], scheme.weight, jax.random.fold_in(k_init, j))
  counts = {p: methods_lib.num_params(params[p]) for p in schemes}

  def loss_fn(params, qstate, step, xb, tb):
    blk = nnx.merge(graphdef, state, copy=True)  # fresh variables of this trace
    new_state = {}
    for p, scheme in schemes.items():
      w_hat, new_state[p] = method.apply(w0[p], params[p], qstate[p], scheme.weight, step)
      _get(blk, p).kernel[...] = w_hat
    out = _forward(blk, xb)
    err = jnp.sum(jnp.square(out.astype(jnp.float32) - tb.astype(jnp.float32)), axis=-1)
    return jnp.mean(err), new_state

  losses = []
  if method.trainable and cfg.steps > 0:
    tx = _optimizer(method, params, cfg)
    opt_state = tx.init(params)

    @jax.jit
    def step_fn(params, opt_state, qstate, step, xb, tb):
      (loss, qstate), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, qstate, step, xb, tb)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, qstate, loss

    n = x_q.shape[0]
    bs = min(cfg.batch_size, n)
    order = np.asarray(jax.random.permutation(k_batch, n))
    for s in range(cfg.steps):
      lo = (s * bs) % n
      idx = order[lo:lo + bs] if lo + bs <= n else np.concatenate([order[lo:], order[:lo + bs - n]])
      params, opt_state, qstate, loss = step_fn(params, opt_state, qstate,
                                                jnp.int32(s), x_q[idx], target[idx])
      losses.append(loss)
  exports = {p: method.export(w0[p], params[p], qstate[p], scheme.weight)
             for p, scheme in schemes.items()}
  return BlockResult(exports, params, qstate, counts,
                     [float(v) for v in jax.device_get(losses)])


def block_loss(block, schemes, weights, x_q, target, *, act_quant: bool, act_scales,
               batch: int = 8) -> float:
  """Mean over tokens of the squared block-output error with the given weights."""
  sim = sim_block(block, schemes, act_quant=act_quant, act_scales=act_scales, weights=weights)
  out = _batched(lambda xb: _run_block(sim, xb), x_q, batch)
  return float(jnp.mean(jnp.sum(jnp.square(out - target), axis=-1)))


def reconstruct(model: nnx.Module, layer_schemes: dict[str, IntScheme], method,
                calib_tokens: jax.Array, cfg: ReconConfig = ReconConfig(), *,
                act_scales: dict[str, Any] | None = None, log=None):
  """Block-wise reconstruction of an unrolled `Decoder`'s selected Linears.

  Args:
    model: the float model (unrolled layout: `layers/<i>/...`).
    layer_schemes: {"layers/0/mlp/up_proj": IntScheme} of the Linears to quantize.
    method: a `jaxsun.quant.ptq.methods` object (or name).
    calib_tokens: i32[n, T] calibration sequences.
    cfg: reconstruction settings.
    act_scales: {layer name: calibrated static activation scale}.
    log: optional callable(str) for one line per block.

  Returns:
    ({layer name: export}, report) where the report has, per block, the reconstruction
    loss before (the method's initialisation) and after, the seconds it took, and per
    layer the learnable-parameter count.
  """
  method = methods_lib.make(method)
  act_scales = act_scales or {}
  tokens = jnp.asarray(calib_tokens, jnp.int32)
  x_fp = model.embed(tokens)
  x_q = x_fp
  key = jax.random.key(cfg.seed)
  exports, report = {}, {"blocks": [], "params": {}}
  for i, blk in enumerate(model.layers):
    local = {}
    for name, scheme in layer_schemes.items():
      p = _local(name, i)
      if p is not None:
        local[p] = scheme
    scales = {p: act_scales.get(f"layers/{i}/" + "/".join(map(str, p))) for p in local}
    scales = {p: v for p, v in scales.items() if v is not None}
    target = _batched(lambda xb, b=blk: _run_block(b, xb), x_fp, 8)
    t0 = time.perf_counter()
    if local:
      init = {p: methods_lib.weight_of(
          method.export(jnp.asarray(_get(blk, p).kernel[...], jnp.float32),
                        *method.init(jnp.asarray(_get(blk, p).kernel[...], jnp.float32),
                                     s.weight, jax.random.key(0)), s.weight), s.weight)
              for p, s in local.items()}
      before = block_loss(blk, local, init, x_q, target, act_quant=cfg.act_quant,
                          act_scales=scales)
      ex, _, _, counts, losses = reconstruct_block(blk, local, method, x_q, target, cfg,
                                                   jax.random.fold_in(key, i), scales)
      weights = {p: methods_lib.weight_of(e, local[p].weight) for p, e in ex.items()}
      after = block_loss(blk, local, weights, x_q, target, act_quant=cfg.act_quant,
                         act_scales=scales)
      for p, e in ex.items():
        name = f"layers/{i}/" + "/".join(map(str, p))
        exports[name] = e
        report["params"][name] = counts[p]
      qblk = sim_block(blk, local, act_quant=cfg.act_quant, act_scales=scales, weights=weights)
      x_q = _batched(lambda xb, b=qblk: _run_block(b, xb), x_q, 8)
      entry = {"block": i, "loss_init": before, "loss_final": after,
               "train_loss_first": losses[0] if losses else None,
               "train_loss_last": losses[-1] if losses else None,
               "seconds": time.perf_counter() - t0}
      report["blocks"].append(entry)
      if log is not None:
        log(f"block {i}: loss {before:.4g} -> {after:.4g} ({entry['seconds']:.1f} s)")
    else:
      x_q = _batched(lambda xb, b=blk: _run_block(b, xb), x_q, 8)
    x_fp = target
  return exports, report
