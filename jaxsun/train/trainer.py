"""The trainer: the split's trainability choices, AdamW, accumulation, donated jit steps,
evaluation, metrics, progress and resumable checkpoints.

    trainer = Trainer(split, TrainConfig(steps=400, trainability="prefill",
                                         optimizer=OptimizerConfig(3e-3, warmup_steps=20)))
    history = trainer.fit(batches, writer=writer, checkpointer=ckpt, eval_batches=make_eval)
    split = trainer.split

`batches` yields dicts `{"tokens": i32[B, S], "boundary": i32[B], "loss_mask": f32[B, S]}`
(the `jaxsun.data.pipeline` iterators). If it has `get_state()`/`set_state()`, its
position is checkpointed with the arrays, and a resumed run continues with exactly the
batches, learning rates and PRNG keys the uninterrupted run would have used.

Only the trainable trees (`jaxsun.split.partition`) are optimizer state and donated to
the jitted step; the frozen trees (for SUN the decode tree every task shares) are passed
alongside, never donated and never modified. In a trained tree with LoRA adapters
(`jaxsun.lora`) only the adapters are trainable; each step gets its own dropout key.

Untied models train through a static `split_forward` window: from the task pipeline's
`boundary_range` (one compiled window per dataset), else per batch, rounded to
`jaxsun.split.WINDOW_BUCKET` so that few windows compile.

Knowledge distillation (the Affine-Scaled Attention paper pretrains its students from a
teacher): pass a teacher model and set `TrainConfig.distill_weight` w > 0,

    trainer = Trainer(student, TrainConfig(steps=..., distill_weight=0.5,
                                           distill_temperature=2.0), teacher=teacher)

and each step minimises, per target token (the same loss mask as the cross-entropy),

    (1 - w) * CE(student, token) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(`distill_kl`). The teacher runs inside the jitted step under `stop_gradient`; it is
passed alongside the state, never donated and never modified. The metrics then hold
"loss" (that objective), "ce_loss" and "distill_kl" (the KL per target token, without
the T^2 factor). With w = 0 a teacher is ignored and the step is the plain one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from jaxsun import parallel
from jaxsun.nn.step_state import StepState
from jaxsun.split import (TRAINABILITY, SplitModel, check_split, combine,
                          next_token_loss_sums, partition, prefill_window, split_forward)
from jaxsun.train.optim import OptimizerConfig, make_optimizer

BATCH_KEYS = ("tokens", "boundary", "loss_mask")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What `Trainer.fit` does.

  Attributes:
    steps: optimizer updates in the whole run (the schedule's length).
    trainability: which trees train: "prefill" (SUN), "decode" (PrefillShare), "both",
      "none" (see `jaxsun.split`).
    optimizer: AdamW, schedule and clipping settings.
    accum_steps: micro-batches per update; the batch is split along its first axis and
      the gradient is the token-weighted mean over all of them (equal to one big batch).
    log_every: write metrics every this many steps (and at the last step).
    eval_every: run the evaluation every this many steps (0: only at the end).
    checkpoint_every: save every this many steps (0: no checkpoints); the last step is
      always saved when a checkpointer is given.
    seed: seeds the trainer's PRNG key (split once per step, checkpointed).
    device_memory_gb: refuse to start (with the numbers) when the memory estimate per
      device (`jaxsun.train.memory`) exceeds this; 0: no check. The estimate is printed
      before the first step either way.
    distill_weight: w in [0, 1], the weight of the distillation term (see the module
      docstring); 0: no distillation. w > 0 needs a `Trainer(teacher=...)`.
    distill_temperature: T > 0, the softmax temperature of both distributions in the KL.
  """

  steps: int
  trainability: str = "both"
  optimizer: OptimizerConfig = OptimizerConfig()
  accum_steps: int = 1
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 0
  seed: int = 0
  device_memory_gb: float = 0.0
  distill_weight: float = 0.0
  distill_temperature: float = 1.0

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"TrainConfig.steps must be >= 1, got {self.steps}")
    if self.trainability not in TRAINABILITY:
      raise ValueError(f"TrainConfig.trainability={self.trainability!r} is not one of "
                       f"{TRAINABILITY}")
    for name in ("accum_steps", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("eval_every", "checkpoint_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
    w, t = self.distill_weight, self.distill_temperature
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
      raise ValueError(f"TrainConfig.distill_weight must be a number in [0, 1], got {w!r}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (
        t > 0 and math.isfinite(t)):
      raise ValueError(f"TrainConfig.distill_temperature must be a finite number > 0, got "
                       f"{t!r}")

  @property
  def distills(self) -> bool:
    return self.distill_weight > 0


@struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed).

  Attributes:
    step: i32[] updates done.
    params: the trainable trees, `{"prefill": State, "decode": State}` (a subset).
    opt_state: the optimizer state of `params`.
    rng: u32[2] raw PRNG key data (plain integers, so checkpoints need no key dtype).
  """

  step: jax.Array
  params: dict
  opt_state: Any
  rng: jax.Array


def _variable_mask(tree, predicate):
  """A tree shaped like `tree`'s arrays: predicate(variable) for each nnx Variable's leaves."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda v: jax.tree.map(lambda _: bool(predicate(v)), v), tree,
                      is_leaf=is_var)


def _to_device_batch(batch: Mapping[str, Any], mesh=None, rules=parallel.DEFAULT_RULES
                     ) -> dict:
  """The batch as device arrays; with a mesh, split along the batch axis over it.

  With several processes every process passes the same global batch and each places
  only its own devices' rows.
  """
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"a training batch needs keys {BATCH_KEYS}; missing {missing}")
  out = {"tokens": np.asarray(batch["tokens"], np.int32),
         "boundary": np.asarray(batch["boundary"], np.int32),
         "loss_mask": np.asarray(batch["loss_mask"], np.float32)}
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in out.items()}
  return {k: parallel.global_array(v, parallel.batch_sharding(v.shape, mesh, rules))
          for k, v in out.items()}


@functools.partial(jax.jit, static_argnames="window")
def _loss_sums_jit(split: SplitModel, batch: dict, window=None):
  return next_token_loss_sums(split, batch["tokens"], batch["boundary"], batch["loss_mask"],
                              window=window)


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array,
               temperature: float = 1.0) -> jax.Array:
  """KL(softmax(teacher / T) || softmax(student / T)) over the last (vocabulary) axis.

  Args:
    student_logits, teacher_logits: f32[..., V] (any float dtype; computed in float32).
    temperature: T > 0.

  Returns:
    f32[...], one KL (nats) per position.
  """
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                     f"{tuple(teacher_logits.shape)} must have the same shape")
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def distill_loss_sums(split: SplitModel, teacher: SplitModel, tokens: jax.Array,
                      boundary: jax.Array, loss_mask: jax.Array, *, weight: float,
                      temperature: float, window=None, teacher_window=None,
                      dropout_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """The distillation objective's sums over the target tokens of a batch.

  Per target token t (weight `loss_mask[:, t]`, position 0 never a target), predicted
  at position t - 1: (1 - w) CE + w T^2 KL(p_teacher^T || q_student^T).

  Args:
    split: the student.
    teacher: the teacher (same vocabulary); its logits are under `stop_gradient`.
    tokens, boundary, loss_mask: the batch (`jaxsun.split.next_token_loss_sums`).
    weight, temperature: w and T.
    window, teacher_window: the static `split_forward` windows of student and teacher.
    dropout_key: the student's dropout key (the teacher runs without dropout).

  Returns:
    (sum of the objective, {"count": sum of the mask, "ce_sum", "kl_sum"}), f32 scalars.
  """
  logits = split_forward(split, tokens, boundary, window=window, dropout_key=dropout_key)
  t_logits = jax.lax.stop_gradient(
      split_forward(teacher, tokens, boundary, window=teacher_window))
  mask = loss_mask[:, 1:].astype(jnp.float32)
  student = logits[:, :-1].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(student, tokens[:, 1:])
  kl = distill_kl(student, t_logits[:, :-1], temperature)
  ce_sum, kl_sum = jnp.sum(ce * mask), jnp.sum(kl * mask)
  objective = (1.0 - weight) * ce_sum + weight * temperature ** 2 * kl_sum
  return objective, {"count": jnp.sum(mask), "ce_sum": ce_sum, "kl_sum": kl_sum}


def check_teacher(teacher, student: SplitModel) -> SplitModel:
  """`teacher` as a SplitModel (a Decoder is wrapped) if it can teach `student`."""
  from jaxsun.nn.decoder import Decoder  # pylint: disable=g-import-not-at-top
  if isinstance(teacher, Decoder):
    teacher = SplitModel.from_model(teacher)
  teacher = check_split(teacher, "teacher")
  tv, sv = teacher.cfg.vocab_size, student.cfg.vocab_size
  if tv != sv:
    raise ValueError(f"teacher ModelConfig.vocab_size={tv} differs from the student's "
                     f"ModelConfig.vocab_size={sv}; distillation compares distributions "
                     "over one vocabulary (use the same tokenizer)")
  return teacher


def batch_window(split: SplitModel, boundary, seq_len: int, fixed=None):
  """The static `split_forward` window for a batch's host-side `boundary`: `fixed` (a
  dataset-wide window) when every row's prefill boundary lies inside it, else one for
  this batch (None for a tied model)."""
  boundary = np.asarray(boundary)
  if split.tied:
    return None
  own = prefill_window(split, boundary, seq_len)
  if fixed is not None and fixed[0] <= own[0] and own[1] <= fixed[1] <= seq_len:
    return tuple(fixed)
  return own


def evaluate_loss(split: SplitModel, batches: Iterable[Mapping[str, Any]],
                  max_batches: int | None = None, *, mesh=None,
                  rules=parallel.DEFAULT_RULES) -> dict:
  """Token-weighted mean next-token loss of `split` over `batches` (at most `max_batches`).

  With `mesh`, batches are split over it along the batch axis (`split` should already
  be placed on it, e.g. a mesh `Trainer`'s model).

  Returns:
    {"loss", "perplexity", "tokens" (target tokens counted), "batches"}.
  """
  total, count, n = 0.0, 0.0, 0
  for batch in batches:
    if max_batches is not None and n >= max_batches:
      break
    window = batch_window(split, batch["boundary"], np.shape(batch["tokens"])[1])
    s, c = _loss_sums_jit(split, _to_device_batch(batch, mesh, rules), window)
    total, count, n = (total + float(parallel.host_value(s)),
                       count + float(parallel.host_value(c)), n + 1)
  if n == 0:
    raise ValueError("evaluate_loss got no batches")
  loss = total / max(count, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count,
          "batches": n}


class Trainer:
  """Trains the trainable trees of a `SplitModel` (see the module docstring).

  Args:
    split: the model; its frozen trees are kept by reference and never modified, its
      trainable trees are copied (the copies are donated to the jitted step).
    config: the `TrainConfig`.
    teacher: a SplitModel (or Decoder) to distill from when
      `config.distill_weight > 0` (see the module docstring); kept by reference, never
      donated or modified. Ignored when the weight is 0.
    mesh: a `jaxsun.parallel.make_mesh` (data, fsdp, tensor) mesh, or None (one device).
      Parameters and optimizer state are sharded by their logical axes and `rules`,
      batches along the batch axis; with several processes (`jax.distributed`), each
      process runs the same program on the same global batches.
    rules: logical-axis rules for `mesh`.
  """

  def __init__(self, split: SplitModel, config: TrainConfig, *, teacher=None, mesh=None,
               rules=parallel.DEFAULT_RULES):
    if not isinstance(split, SplitModel):
      raise TypeError(f"split must be a jaxsun SplitModel, got {type(split).__name__}")
    if not isinstance(config, TrainConfig):
      raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    self.config = config
    self.mesh, self.rules = mesh, rules
    if teacher is not None:
      teacher = check_teacher(teacher, split)
    elif config.distills:
      raise ValueError(f"TrainConfig.distill_weight={config.distill_weight} > 0 needs a "
                       "teacher: Trainer(split, config, teacher=teacher_split)")
    self.teacher = teacher if config.distills else None
    if mesh is not None:
      split = parallel.shard_split_model(split, mesh, rules)
      if self.teacher is not None:
        self.teacher = parallel.shard_split_model(self.teacher, mesh, rules)
    self._template = split
    trainable, self.frozen = partition(split, config.trainability)
    # Donation deletes the input buffers; the caller's model may share these arrays.
    trainable = jax.tree.map(jnp.copy, trainable)
    # Step state (FP8 scales, affine attention's alpha EMA: `jaxsun.nn.step_state`) is
    # overwritten with its "gradient", never optimized.
    self._is_meta = _variable_mask(trainable, lambda v: isinstance(v, StepState))
    self._meta_mean = _variable_mask(
        trainable, lambda v: isinstance(v, StepState) and v.combine == "mean")
    tx, self.schedule = make_optimizer(config.optimizer, config.steps)
    labels = jax.tree.map(lambda m: "meta" if m else "param", self._is_meta)
    self.tx = optax.multi_transform({"param": tx, "meta": optax.set_to_zero()}, labels)
    step = np.zeros((), np.int32)
    rng = np.asarray(jax.random.key_data(jax.random.key(config.seed)))
    if mesh is None:
      self._param_shardings = None
      step, rng, opt_state = jnp.asarray(step), jnp.asarray(rng), self.tx.init(trainable)
    else:
      replicated = NamedSharding(mesh, PartitionSpec())
      step, rng = parallel.global_array(step, replicated), parallel.global_array(rng, replicated)
      self._param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
      # Moments made by zeros_like inherit their parameters' shardings; whatever is
      # created from scratch (step counts) is local and gets replicated on the mesh.
      def on_mesh(x):
        if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
          return x
        return parallel.global_array(parallel.host_value(x), replicated)
      opt_state = jax.tree.map(on_mesh, self.tx.init(trainable))
    self.state = TrainState(step=step, params=trainable, opt_state=opt_state, rng=rng)
    self._train_step = jax.jit(self._step_impl, donate_argnums=0,
                               static_argnames=("window", "teacher_window"))
    self._window = None  # a dataset-wide prefill window, set by `fit`
    self.model_cfg = split.cfg

  # -- the model ------------------------------------------------------------------------

  @property
  def split(self) -> SplitModel:
    """The current model: trained trees from the state, frozen trees as given."""
    return combine(self._template, self.state.params, self.frozen)

  @property
  def step(self) -> int:
    return int(parallel.host_value(self.state.step))

  def memory_estimate(self, batch_size: int, seq_len: int):
    """`jaxsun.train.memory.MemoryEstimate` of this run for batches of this shape."""
    from jaxsun.train import memory  # pylint: disable=g-import-not-at-top
    shape = (1, 1, 1) if self.mesh is None else tuple(
        self.mesh.shape[a] for a in parallel.MESH_AXES)
    return memory.estimate_memory(
        self.model_cfg, trainability=self.config.trainability,
        untied=not self._template.tied, batch_size=batch_size, seq_len=seq_len,
        accum_steps=self.config.accum_steps, mesh_shape=shape,
        trainable_params=self.num_trainable_params())

  def num_trainable_params(self) -> int:
    return int(sum(x.size for x in jax.tree.leaves(self.state.params)))

  # -- jitted steps -----------------------------------------------------------------------

  def _loss_sums(self, params, frozen, batch, key, window, teacher=None,
                 teacher_window=None):
    """(sum of the objective, aux sums: "count" and, distilling, "ce_sum"/"kl_sum")."""
    split = combine(self._template, params, frozen)
    if teacher is None:
      loss_sum, count = next_token_loss_sums(split, batch["tokens"], batch["boundary"],
                                             batch["loss_mask"], window=window,
                                             dropout_key=key)
      return loss_sum, {"count": count}
    return distill_loss_sums(split, teacher, batch["tokens"], batch["boundary"],
                             batch["loss_mask"], weight=self.config.distill_weight,
                             temperature=self.config.distill_temperature, window=window,
                             teacher_window=teacher_window, dropout_key=key)

  def _step_impl(self, state: TrainState, frozen: dict, batch: dict, window=None,
                 teacher=None, teacher_window=None):
    accum = self.config.accum_steps
    rng, dropout_key = jax.random.split(jax.random.wrap_key_data(state.rng))
    grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)
    if accum == 1:
      (loss_sum, aux), grad_sum = grad_fn(state.params, frozen, batch, dropout_key, window,
                                          teacher, teacher_window)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]),
                           batch)
      micro["key"] = jax.random.split(dropout_key, accum)

      def body(carry, mb):
        g_acc, l_acc, aux_acc = carry
        mb = dict(mb)
        (l, aux), g = grad_fn(state.params, frozen, mb, mb.pop("key"), window, teacher,
                              teacher_window)
        # Step state of micro-batches combines by its rule (max, or sum then mean),
        # gradients with sum.
        g_acc = jax.tree.map(lambda m, mean, a, b: jnp.maximum(a, b) if m and not mean
                             else a + b, self._is_meta, self._meta_mean, g_acc, g)
        return (g_acc, l_acc + l, jax.tree.map(jnp.add, aux_acc, aux)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      aux_keys = ("count",) + (("ce_sum", "kl_sum") if teacher is not None else ())
      (grad_sum, loss_sum, aux), _ = jax.lax.scan(
          body, (zeros, jnp.zeros(()), {k: jnp.zeros(()) for k in aux_keys}), micro)
      grad_sum = jax.tree.map(lambda mean, g: g / accum if mean else g, self._meta_mean,
                              grad_sum)
    count = aux["count"]
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda m, g: g if m else g / denom, self._is_meta, grad_sum)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda m, p, u, g: g.astype(p.dtype) if m else
                          (p + u).astype(p.dtype), self._is_meta, state.params, updates, grads)
    grads = jax.tree.map(lambda m, g: jnp.zeros_like(g) if m else g, self._is_meta, grads)
    rng = jax.random.key_data(rng)
    if self._param_shardings is not None:  # keep the layout step after step
      params = jax.lax.with_sharding_constraint(params, self._param_shardings)
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
               "learning_rate": self.schedule(state.step), "target_tokens": count}
    if teacher is not None:
      metrics.update(ce_loss=aux["ce_sum"] / denom, distill_kl=aux["kl_sum"] / denom)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      rng=rng), metrics

  def train_step(self, batch: Mapping[str, Any]) -> dict:
    """One update on `batch`; returns the step's metrics as Python floats."""
    host_batch, batch = batch, _to_device_batch(batch, self.mesh, self.rules)
    window = batch_window(self._template, host_batch["boundary"],
                          batch["tokens"].shape[1], self._window)
    b = batch["tokens"].shape[0]
    if b % self.config.accum_steps:
      raise ValueError(f"batch size {b} is not divisible by TrainConfig.accum_steps="
                       f"{self.config.accum_steps}")
    teacher_window = None
    if self.teacher is not None:
      teacher_window = batch_window(self.teacher, host_batch["boundary"],
                                    batch["tokens"].shape[1])
    self.state, metrics = self._train_step(self.state, self.frozen, batch, window=window,
                                           teacher=self.teacher,
                                           teacher_window=teacher_window)
    return {k: float(parallel.host_value(v)) for k, v in metrics.items()}

  def evaluate(self, batches: Iterable[Mapping[str, Any]], max_batches: int | None = None
               ) -> dict:
    """Token-weighted mean loss of the current model over `batches` (`evaluate_loss`)."""
    return evaluate_loss(self.split, batches, max_batches, mesh=self.mesh, rules=self.rules)

  # -- checkpoints ------------------------------------------------------------------------

  def save(self, checkpointer, batches=None, *, meta: Mapping | None = None) -> None:
    """Saves the state and the data position (if `batches` has `get_state`)."""
    meta = dict(meta or {})
    meta["step"] = self.step
    if hasattr(batches, "get_state"):
      meta["data"] = batches.get_state()
    # The next step donates the state's buffers; give the async save its own copy.
    state = jax.tree.map(jnp.copy, self.state)
    checkpointer.save(self.step, state, meta=meta)

  def restore(self, checkpointer, batches=None, step: int | None = None, *,
              saved_scan_layers: bool | None = None) -> dict | None:
    """Restores the latest (or `step`) checkpoint and the data position; returns its meta.

    `saved_scan_layers`: the layer layout the checkpoint was written in when it differs
    from this run's `ModelConfig.scan_layers` (parameters and optimizer moments are
    converted, `Checkpointer.restore`); None: the same layout.
    """
    out = checkpointer.restore(self.state, step=step, saved_scan_layers=saved_scan_layers)
    if out is None:
      return None
    self.state, meta = out
    if "data" in meta:
      if not hasattr(batches, "set_state"):
        raise ValueError("the checkpoint holds a data position but `batches` has no "
                         "set_state(); pass the same kind of iterator to resume")
      batches.set_state(meta["data"])
    return meta

  # -- the loop ---------------------------------------------------------------------------

  def fit(self, batches: Iterator[Mapping[str, Any]], *, writer=None, checkpointer=None,
          eval_batches: Callable[[], Iterable] | None = None, until: int | None = None,
          progress: bool | Any = True, label: str = "train") -> list[dict]:
    """Trains until step `until` (default `config.steps`), resuming from a checkpoint.

    Args:
      batches: iterator of training batches (see the module docstring).
      writer: a `jaxsun.train.metrics.MetricWriter` (JSONL, TensorBoard, ...).
      checkpointer: a `jaxsun.train.checkpoints.Checkpointer`; if it holds a checkpoint,
        training resumes from it (state, data position, PRNG).
      eval_batches: returns a fresh iterable of evaluation batches; evaluated every
        `config.eval_every` steps and at the end.
      until: stop after this step (for tests and preemption drills); the schedule still
        spans `config.steps`.
      progress: show a progress bar (or pass a `jaxsun.train.progress.Progress`).
      label: prefix of the progress lines.

    Returns:
      Per-step metrics of the steps run here: step, loss, grad_norm, learning_rate,
      step_time_s, tokens_per_s, model_tflops_per_s (+ eval_loss where evaluated;
      + ce_loss and distill_kl when distilling, "loss" being the objective).
    """
    cfg = self.config
    until = cfg.steps if until is None else min(until, cfg.steps)
    if getattr(batches, "boundary_range", None) is not None and not self._template.tied:
      lo, hi = batches.boundary_range  # one compiled window for the whole dataset
      self._window = prefill_window(self._template, np.array([lo, hi]),
                                    int(batches.spec["seq_len"]))
    if checkpointer is not None:
      meta = self.restore(checkpointer, batches)
      if meta is not None:
        print(f"[{label}] resumed from step {self.step} in {checkpointer.directory}",
              flush=True)
    if writer is not None and self.step == 0:
      writer.write_hparams({"trainability": cfg.trainability, "steps": cfg.steps,
                            "accum_steps": cfg.accum_steps,
                            "distill_weight": cfg.distill_weight,
                            "distill_temperature": cfg.distill_temperature,
                            "trainable_params": self.num_trainable_params(),
                            **{f"optimizer.{k}": v for k, v in
                               dataclasses.asdict(cfg.optimizer).items()}})
    bar = None if progress is True or not progress else progress
    history = []
    try:
      while self.step < until:
        batch = next(batches)
        tokens = int(np.prod(np.shape(batch["tokens"])))
        seq_len = int(np.shape(batch["tokens"])[1])
        flops = self.model_cfg.flops_per_token(seq_len) * tokens
        if not history:  # before the first step of this call: the batch shape is known
          est = self.memory_estimate(*np.shape(batch["tokens"]))
          if progress:
            print(f"[{label}] {est.report()}", flush=True)
          est.check(cfg.device_memory_gb)
        if bar is None and progress is True:  # made here: it needs the batch shape
          from jaxsun.train.progress import Progress  # pylint: disable=g-import-not-at-top
          bar = Progress(total=until, initial=self.step, desc=label, log_every=cfg.log_every,
                         tokens_per_step=tokens, flops_per_step=flops, file=sys.stdout)
        t0 = time.perf_counter()
        metrics = self.train_step(batch)  # floats: waits for the device
        dt = time.perf_counter() - t0
        step = self.step
        metrics.update(step=step, step_time_s=dt, tokens_per_s=tokens / dt,
                       model_tflops_per_s=flops / dt / 1e12)
        if eval_batches is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                         or step == until):
          ev = self.evaluate(eval_batches())
          metrics.update(eval_loss=ev["loss"], eval_perplexity=ev["perplexity"])
        history.append(metrics)
        if writer is not None and (step % cfg.log_every == 0 or step == until
                                   or "eval_loss" in metrics):
          writer.write_scalars(step, {k: v for k, v in metrics.items() if k != "step"})
        if bar is not None:
          bar.update(step, loss=metrics["loss"])
        if checkpointer is not None and ((cfg.checkpoint_every
                                          and step % cfg.checkpoint_every == 0)
                                         or step == until):
          self.save(checkpointer, batches)
    finally:
      if bar is not None:
        bar.close()
      if checkpointer is not None:
        checkpointer.wait_until_finished()
      if writer is not None:
        writer.flush()
    return history
