"""Knowledge distillation in the trainer (`Trainer(teacher=...)`, `TrainConfig.distill_*`)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.train.optim import OptimizerConfig
from jaxsun.train.trainer import (TrainConfig, Trainer, distill_kl, distill_loss_sums,
                                  evaluate_loss)


def _split(cfg, seed):
  return jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(seed)))


def _batches(seed, vocab, batch=4, seq=16):
  """Random LM batches (every token a target, position 0 excluded by the loss)."""
  for i in itertools.count():
    rng = np.random.default_rng([seed, i])
    tokens = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = (rng.random((batch, seq)) < 0.8).astype(np.float32)
    yield {"tokens": tokens, "boundary": np.ones((batch,), np.int32), "loss_mask": mask}


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _leaves(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def _opt():
  return OptimizerConfig(1e-2, schedule="constant", weight_decay=0.0)


def test_kl_matches_float64_formula(cfg):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 7)) * 3, rng.normal(size=(2, 3, 7)) * 3
  for temp in (1.0, 2.5):
    got = np.asarray(distill_kl(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                temp))
    lp, lq = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
    want = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.allclose(np.asarray(distill_kl(jnp.asarray(s), jnp.asarray(s))), 0, atol=1e-6)

  # The objective's sums on a model batch against the same formula in float64.
  student, teacher = _split(cfg, 0), _split(cfg, 1)
  batch = next(_batches(3, cfg.vocab_size, batch=2, seq=12))
  tokens, boundary, mask = (jnp.asarray(batch[k]) for k in ("tokens", "boundary",
                                                             "loss_mask"))
  w, temp = 0.3, 2.0
  obj, aux = distill_loss_sums(student, teacher, tokens, boundary, mask, weight=w,
                               temperature=temp)
  ls = np.asarray(jaxsun.split_forward(student, tokens, boundary), np.float64)[:, :-1]
  lt = np.asarray(jaxsun.split_forward(teacher, tokens, boundary), np.float64)[:, :-1]
  m = batch["loss_mask"][:, 1:].astype(np.float64)
  ce = -np.take_along_axis(_np_log_softmax(ls), batch["tokens"][:, 1:, None], -1)[..., 0]
  lp, lq = _np_log_softmax(lt / temp), _np_log_softmax(ls / temp)
  kl = (np.exp(lp) * (lp - lq)).sum(-1)
  np.testing.assert_allclose(float(aux["count"]), m.sum())
  np.testing.assert_allclose(float(aux["ce_sum"]), (ce * m).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(aux["kl_sum"]), (kl * m).sum(), rtol=1e-5)
  np.testing.assert_allclose(float(obj), (1 - w) * (ce * m).sum() + w * temp ** 2 *
                             (kl * m).sum(), rtol=1e-5)


def test_weight_zero_is_the_plain_trainer_exactly(cfg):
  student, teacher = _split(cfg, 0), _split(cfg, 1)
  plain = Trainer(student, TrainConfig(steps=3, optimizer=_opt()))
  with_teacher = Trainer(student, TrainConfig(steps=3, optimizer=_opt(), distill_weight=0.0,
                                              distill_temperature=3.0), teacher=teacher)
  assert with_teacher.teacher is None  # ignored: the step never runs it
  for batch in itertools.islice(_batches(0, cfg.vocab_size), 3):
    a, b = plain.train_step(batch), with_teacher.train_step(batch)
    assert a == b
  assert all((x == y).all() for x, y in zip(_leaves(plain.state.params),
                                            _leaves(with_teacher.state.params)))


def test_distillation_moves_the_student_toward_the_teacher(cfg):
  # A teacher with peaked distributions (cfg's init_std 0.25); students from a plain
  # init, trained on one batch: distilled, the student's distributions on it approach
  # the teacher's; with cross-entropy alone (the control) they fit the batch's random
  # tokens instead and move away.
  teacher = _split(cfg, 1)
  student = _split(cfg.replace(init_std=0.02), 0)
  before = _leaves(teacher.prefill)
  batch = next(_batches(99, cfg.vocab_size, batch=4, seq=16))
  tokens, boundary = jnp.asarray(batch["tokens"]), jnp.asarray(batch["boundary"])
  t_logits = jaxsun.split_forward(teacher, tokens, boundary)

  target = jnp.asarray(batch["loss_mask"])[:, 1:]

  def kl_to_teacher(split):  # per target token, as the trainer's metric
    kl = distill_kl(jaxsun.split_forward(split, tokens, boundary)[:, :-1], t_logits[:, :-1])
    return float(jnp.sum(kl * target) / jnp.sum(target))

  start = kl_to_teacher(student)
  ends, kls = {}, []
  for w in (1.0, 0.0):
    trainer = Trainer(student, TrainConfig(steps=8, optimizer=_opt(), distill_weight=w),
                      teacher=teacher)
    for _ in range(8):
      m = trainer.train_step(batch)
      if w > 0:  # the objective and its parts: (1 - w) CE + w T^2 KL with w = 1, T = 1
        assert set(m) >= {"ce_loss", "distill_kl"}
        assert m["loss"] == pytest.approx(m["distill_kl"], rel=1e-5)
        kls.append(m["distill_kl"])
      else:
        assert "distill_kl" not in m
    ends[w] = kl_to_teacher(trainer.split)
  assert kls[0] == pytest.approx(start, rel=1e-4)  # the metric is the KL before the step
  assert all(b < a for a, b in zip(kls, kls[1:])), kls
  assert ends[1.0] < 0.8 * start, (start, ends)
  assert ends[1.0] < 0.7 * ends[0.0], (start, ends)
  # The teacher's arrays are untouched (and still alive: never donated).
  after = _leaves(teacher.prefill)
  assert all((x == y).all() for x, y in zip(before, after))
  assert not any(x.is_deleted() for x in jax.tree.leaves(teacher.prefill))


def test_accumulation_matches_one_batch(cfg):
  student, teacher = _split(cfg, 0), _split(cfg, 1)
  # eps=1 makes Adam's first update ~ lr * g (linear in the gradient, not its sign), so
  # the parameters compare the accumulated gradients themselves.
  opt = OptimizerConfig(1.0, schedule="constant", eps=1.0, weight_decay=0.0)
  one, two = (Trainer(student, TrainConfig(steps=1, optimizer=opt, distill_weight=0.4,
                                           distill_temperature=2.0, accum_steps=a),
                      teacher=teacher) for a in (1, 2))
  batch = next(_batches(5, cfg.vocab_size))
  a, b = one.train_step(batch), two.train_step(batch)
  for key in ("loss", "ce_loss", "distill_kl", "grad_norm"):
    assert b[key] == pytest.approx(a[key], rel=1e-4), key
  for x, y, p in zip(_leaves(one.state.params), _leaves(two.state.params),
                     _leaves(student.prefill)):
    np.testing.assert_allclose(y - p, x - p, rtol=1e-4, atol=3e-7)


def test_affine_student_keeps_its_step_state(cfg):
  # The affine kind's alpha EMA (a StepState) is still written by the step, not optimized.
  student = _split(cfg.replace(attention="affine"), 0)
  teacher = _split(cfg, 1)
  trainer = Trainer(student, TrainConfig(steps=2, optimizer=_opt(), distill_weight=0.5),
                    teacher=teacher)
  from jaxsun.nn.step_state import StepState  # pylint: disable=g-import-not-at-top
  ema = lambda s: [np.array(x) for x in jax.tree.leaves(nnx.filter_state(s, StepState))]
  init = ema(student.prefill)
  assert init and all((x == 0).all() for x in init)  # alpha_ma starts at 0 (the paper)
  trainer.train_step(next(_batches(0, cfg.vocab_size)))
  after = ema(trainer.split.prefill)
  assert all(((x > 0) & (x < 1)).all() for x in after)  # (1 - rho) * batch-mean alpha


def test_config_and_teacher_checks(cfg):
  with pytest.raises(ValueError, match="distill_weight"):
    TrainConfig(steps=1, distill_weight=1.5)
  with pytest.raises(ValueError, match="distill_weight"):
    TrainConfig(steps=1, distill_weight=-0.1)
  with pytest.raises(ValueError, match="distill_temperature"):
    TrainConfig(steps=1, distill_temperature=0.0)
  student = _split(cfg, 0)
  with pytest.raises(ValueError, match="distill_weight=0.5 > 0 needs a teacher"):
    Trainer(student, TrainConfig(steps=1, distill_weight=0.5))
  other_vocab = _split(cfg.replace(vocab_size=cfg.vocab_size + 1), 1)
  with pytest.raises(ValueError, match="vocab_size"):
    Trainer(student, TrainConfig(steps=1, distill_weight=0.5), teacher=other_vocab)
  with pytest.raises(TypeError, match="teacher"):
    Trainer(student, TrainConfig(steps=1, distill_weight=0.5), teacher="not a model")
  # A Decoder is accepted as a teacher (wrapped as a tied split).
  t = Trainer(student, TrainConfig(steps=1, distill_weight=0.5),
              teacher=jaxsun.Decoder(cfg, rngs=nnx.Rngs(2)))
  assert isinstance(t.teacher, jaxsun.SplitModel)


def test_teacher_from_an_lm_checkpoint(tmp_path):
  """A short `lm` job's checkpoint loads as a teacher (configs' `teacher.workdir`)."""
  from configs import lm as lm_config  # pylint: disable=g-import-not-at-top
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxsun import jobs  # pylint: disable=g-import-not-at-top
  from jaxsun.jobs import pretrain_attention as pa  # pylint: disable=g-import-not-at-top
  c = lm_config.get_config("tiny")
  c.tokenizer = "byte"
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=64)
  c.train.update(seq_len=32, batch_size=4, steps=3, eval_every=3, eval_batches=2,
                 log_every=1, checkpoint_every=3)
  c.sample_tokens = 2
  res = jobs.run(c, tmp_path / "lm")
  teacher, info = pa.load_teacher_from_workdir(tmp_path / "lm")
  assert info["run"] == "pretrain" and info["step"] == 3 and info["tokenizer"] == "byte"
  tok = data_lib.get_tokenizer("byte")
  ev = evaluate_loss(teacher, data_lib.lm_batches("shakespeare", tok, seq_len=32,
                                                  batch_size=4, split="validation"), 2)
  assert ev["loss"] == pytest.approx(res["validation_loss"], rel=1e-6)
  with pytest.raises(ValueError, match="teacher.run"):
    pa.load_teacher_from_workdir(tmp_path / "lm", run="nope")
  with pytest.raises(ValueError, match="checkpoints"):
    pa.load_teacher_from_workdir(tmp_path / "missing")
  # ... and teaches a student of the same vocabulary for a step.
  student = _split(teacher.cfg, 7)
  trainer = Trainer(student, TrainConfig(steps=1, distill_weight=0.5, distill_temperature=2.0),
                    teacher=teacher)
  m = trainer.train_step(next(data_lib.lm_batches("shakespeare", tok, seq_len=32,
                                                   batch_size=4)))
  assert np.isfinite(m["distill_kl"]) and m["distill_kl"] > 0
