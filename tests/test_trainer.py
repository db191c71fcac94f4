"""The trainer: trainability choices, accumulation, schedules, evaluation, resume."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsun
from jaxsun.train.checkpoints import Checkpointer
from jaxsun.train.metrics import JsonlWriter, read_jsonl
from jaxsun.train.optim import OptimizerConfig, make_schedule
from jaxsun.train.trainer import TrainConfig, Trainer
from tests.helpers import perturbed

ROOT = pathlib.Path(__file__).parents[1]


class Batches:
  """A checkpointable iterator of random (tokens, boundary, loss_mask) batches.

  Batch i depends only on (seed, i), so its state is just the next index.
  """

  def __init__(self, seed, vocab, batch=8, seq=24):
    self.seed, self.vocab, self.batch, self.seq, self.i = seed, vocab, batch, seq, 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.i])
    self.i += 1
    tokens = rng.integers(0, self.vocab, (self.batch, self.seq)).astype(np.int32)
    boundary = rng.integers(1, self.seq - 4, (self.batch,)).astype(np.int32)
    pos = np.arange(self.seq)[None]
    ends = rng.integers(boundary + 1, self.seq + 1)  # answers of different lengths
    mask = ((pos >= boundary[:, None]) & (pos < ends[:, None])).astype(np.float32)
    return {"tokens": tokens, "boundary": boundary, "loss_mask": mask}

  def get_state(self):
    return {"next_index": self.i}

  def set_state(self, state):
    self.i = int(state["next_index"])


@pytest.fixture
def base(cfg):
  return jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))


def _split_for(base, trainability):
  if trainability in ("prefill", "decode"):
    split = base.untie()
    return split.replace(decode=perturbed(split.decode, 3))
  return base


def _same(a, b):
  return all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("trainability", ["prefill", "decode", "both", "none"])
def test_one_step_per_trainability(base, trainability):
  split = _split_for(base, trainability)
  batch = next(Batches(0, split.cfg.vocab_size))
  expected_loss = float(jaxsun.next_token_loss(split, jnp.asarray(batch["tokens"]),
                                               jnp.asarray(batch["boundary"]),
                                               jnp.asarray(batch["loss_mask"])))
  trainer = Trainer(split, TrainConfig(steps=1, trainability=trainability,
                                       optimizer=OptimizerConfig(1e-2, schedule="constant")))
  m = trainer.train_step(batch)
  assert m["loss"] == pytest.approx(expected_loss, rel=1e-5)
  new = trainer.split
  changed = {"prefill": not _same(new.prefill, split.prefill),
             "decode": not _same(new.decode_state, split.decode_state)}
  want = {"prefill": trainability in ("prefill", "both"),
          "decode": trainability in ("decode", "both")}
  assert changed == want
  # The frozen tree is the caller's object, not a copy; the caller's arrays survive donation.
  if trainability == "prefill":
    assert new.decode is split.decode
  if trainability == "decode":
    assert new.prefill is split.prefill
  assert np.isfinite(np.asarray(jax.tree.leaves(split.prefill)[0])).all()
  assert trainer.num_trainable_params() == (
      0 if trainability == "none" else split.cfg.num_params())
  if trainability == "none":
    assert m["grad_norm"] == 0.0


def test_grad_norm_and_first_update_match_optax(base):
  batch = next(Batches(1, base.cfg.vocab_size))
  args = [jnp.asarray(batch[k]) for k in ("tokens", "boundary", "loss_mask")]
  opt = OptimizerConfig(3e-3, schedule="constant", weight_decay=0.0, grad_clip_norm=0.0)
  trainer = Trainer(base, TrainConfig(steps=1, optimizer=opt))
  m = trainer.train_step(batch)
  grads = jax.grad(lambda p: jaxsun.next_token_loss(base.replace(prefill=p), *args))(
      base.prefill)
  assert m["grad_norm"] == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)
  # Adam's first step moves every parameter by lr * sign(g) (up to eps).
  delta = jax.tree.map(lambda a, b: a - b, trainer.split.prefill, base.prefill)
  big = jax.tree.map(lambda g: jnp.abs(g) > 1e-4, grads)
  for d, g, keep in zip(jax.tree.leaves(delta), jax.tree.leaves(grads), jax.tree.leaves(big)):
    np.testing.assert_allclose(np.asarray(d)[np.asarray(keep)],
                               -3e-3 * np.sign(np.asarray(g))[np.asarray(keep)], rtol=2e-2)


def test_accumulation_equals_one_big_batch(base):
  batch = next(Batches(2, base.cfg.vocab_size, batch=8))
  # eps=1 makes Adam's first update ~ lr * g (linear in the gradient, not its sign), so
  # the parameters compare the accumulated gradients themselves.
  opt = OptimizerConfig(1.0, schedule="constant", eps=1.0, weight_decay=0.0)
  one = Trainer(base, TrainConfig(steps=2, optimizer=opt))
  four = Trainer(base, TrainConfig(steps=2, optimizer=opt, accum_steps=4))
  m1, m4 = one.train_step(batch), four.train_step(batch)
  # The micro-batches hold different numbers of target tokens: weighting must be by token.
  assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-5)
  assert m4["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
  moved = 0.0
  for a, b, p in zip(jax.tree.leaves(one.split.prefill), jax.tree.leaves(four.split.prefill),
                     jax.tree.leaves(base.prefill)):
    np.testing.assert_allclose(np.asarray(b) - np.asarray(p), np.asarray(a) - np.asarray(p),
                               rtol=1e-4, atol=3e-7)  # f32 rounding of the weights
    moved = max(moved, float(jnp.max(jnp.abs(a - p))))
  assert moved > 1e-4  # the step did move the parameters
  with pytest.raises(ValueError, match="accum_steps"):
    Trainer(base, TrainConfig(steps=1, accum_steps=3)).train_step(batch)


def test_schedules_follow_their_formulas():
  peak, total, warm = 1e-3, 100, 10
  cos = make_schedule(OptimizerConfig(peak, "cosine", warmup_steps=warm,
                                      end_lr_fraction=0.1), total)
  for s in (0, 5, 10, 40, 70, 100):
    if s <= warm:
      want = peak * s / warm
    else:
      frac = (s - warm) / (total - warm)
      want = 0.1 * peak + 0.9 * peak * 0.5 * (1 + np.cos(np.pi * frac))
    assert float(cos(s)) == pytest.approx(want, rel=1e-5, abs=1e-12), s
  wsd = make_schedule(OptimizerConfig(peak, "wsd", warmup_steps=warm, decay_fraction=0.2,
                                      end_lr_fraction=0.0), total)
  assert float(wsd(5)) == pytest.approx(peak / 2)
  assert float(wsd(10)) == pytest.approx(peak) and float(wsd(79)) == pytest.approx(peak)
  assert float(wsd(90)) == pytest.approx(peak / 2, rel=1e-5)
  assert float(wsd(100)) == pytest.approx(0.0, abs=1e-12)
  with pytest.raises(ValueError, match="schedule"):
    OptimizerConfig(schedule="linear")


def test_evaluate_is_the_token_weighted_mean(base):
  it = Batches(4, base.cfg.vocab_size)
  batches = [next(it) for _ in range(3)]
  trainer = Trainer(base, TrainConfig(steps=1))
  ev = trainer.evaluate(batches)
  sums = [jaxsun.split.next_token_loss_sums(base, *(jnp.asarray(b[k]) for k in
                                                    ("tokens", "boundary", "loss_mask")))
          for b in batches]
  want = sum(float(s) for s, _ in sums) / sum(float(c) for _, c in sums)
  assert ev["loss"] == pytest.approx(want, rel=1e-6) and ev["batches"] == 3


def _run(base, workdir, until=None, async_save=True):
  trainer = Trainer(base.untie(), TrainConfig(
      steps=8, trainability="prefill", checkpoint_every=2, log_every=1,
      optimizer=OptimizerConfig(1e-2, warmup_steps=2)))
  batches = Batches(7, base.cfg.vocab_size)
  workdir.mkdir(exist_ok=True)
  with JsonlWriter(workdir / "metrics.jsonl") as w, Checkpointer(
      workdir / "ckpt", keep=2, async_save=async_save) as ckpt:
    hist = trainer.fit(batches, writer=w, checkpointer=ckpt, until=until, progress=False)
  return trainer, [h["loss"] for h in hist]


def test_resume_reproduces_the_uninterrupted_run(base, tmp_path):
  full, losses = _run(base, tmp_path / "a")
  _, first = _run(base, tmp_path / "b", until=5)  # "preempted" after step 5
  assert Checkpointer(tmp_path / "b" / "ckpt").all_steps() == [4, 5]  # keep=2
  resumed, rest = _run(base, tmp_path / "b")       # resumes from step 5
  assert first + rest == losses                    # bitwise, on CPU
  assert _same(resumed.split.prefill, full.split.prefill)
  assert _same(resumed.state.opt_state, full.state.opt_state)
  assert np.array_equal(resumed.state.rng, full.state.rng)
  assert Checkpointer(tmp_path / "b" / "ckpt").all_steps() == [6, 8]  # keep=2
  steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "step" in r]
  assert steps == list(range(1, 9))


KILL_SCRIPT = r"""
import os, signal, sys, time, threading
import jax, jax.numpy as jnp, numpy as np
from jaxsun.train.checkpoints import Checkpointer
import orbax.checkpoint as ocp
state = {"w": jnp.arange(1000.0), "step": jnp.array(1)}
with Checkpointer(sys.argv[1], keep=3) as ck:
  ck.save(1, state, meta={"data": {"next_index": 1}})
# Step 2: a big state, killed while the async write is under way.
big = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4000, 4000)), jnp.float32),
       "step": jnp.array(2)}
ck = Checkpointer(sys.argv[1], keep=3)
ck.save(2, big, meta={"data": {"next_index": 2}})
print("saving", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
  proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "ck")],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == -9 and "saving" in proc.stdout, proc.stderr[-2000:]
  leftovers = [p.name for p in (tmp_path / "ck").iterdir()]
  ck = Checkpointer(tmp_path / "ck")
  assert ck.latest_step() == 1, leftovers
  state, meta = ck.restore({"w": jnp.zeros(1000), "step": jnp.array(0)})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(1000.0))
  assert meta["data"] == {"next_index": 1}
  ck.close()


def test_bad_inputs_name_the_thing(base, tmp_path):
  with pytest.raises(ValueError, match="trainability"):
    TrainConfig(steps=1, trainability="decoder")
  with pytest.raises(ValueError, match="untie"):
    Trainer(base, TrainConfig(steps=1, trainability="prefill"))
  with pytest.raises(ValueError, match="missing"):
    Trainer(base, TrainConfig(steps=1)).train_step({"tokens": np.zeros((2, 4), np.int32)})
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="cannot be created"):
    Checkpointer(blocker / "ckpt")
