"""Shared-module inference: SUN's mixed-model decode batch, PrefillShare's shared prompt KV."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun import generation
from jaxsun import lora
from jaxsun import shared_inference as si
from tests.helpers import perturbed

CFG = jaxsun.ModelConfig.preset("tiny", init_std=0.25)  # far from the identity map
EOS = 2


@pytest.fixture(scope="module")
def base():
  return jaxsun.SplitModel.from_model(jaxsun.Decoder(CFG, rngs=nnx.Rngs(0)))


def prompts_of(n, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(3, CFG.vocab_size, int(rng.integers(3, 14)))) for _ in range(n)]


def sun_models(base, last="prefill"):
  """Three SUN task models: own prefill trees (one with LoRA adapters), one decode tree."""
  u = base.replace(last_prompt_token=last).untie()
  models = [u.replace(prefill=perturbed(u.prefill, s)) for s in (1, 2)]
  adapted = lora.add_adapters(u, "prefill", lora.LoRAConfig(rank=4), jax.random.key(0))
  lo = nnx.filter_state(adapted.prefill, nnx.LoRAParam)
  lo = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(9), x.shape), lo)
  rest = nnx.filter_state(adapted.prefill, nnx.Not(nnx.LoRAParam))
  models.append(adapted.replace(prefill=nnx.merge_state(rest, lo)))
  return models


def solo(model, prompt, n, **kw):
  return np.asarray(jaxsun.generate(model, [prompt], max_new_tokens=n, **kw).tokens[0])


@pytest.mark.parametrize("last", ["prefill", "decode"])
def test_mixed_model_decode_batch_equals_each_model_alone(base, last):
  models = sun_models(base, last)
  prompts = prompts_of(7)
  ids = [0, 2, 1, 0, 2, 2, 1]
  out = si.sun_generate(models, prompts, model_ids=ids, max_new_tokens=10)
  for r, (p, m) in enumerate(zip(prompts, ids)):
    np.testing.assert_array_equal(np.asarray(out.tokens[r]), solo(models[m], p, 10))
  # The task models do differ: on these prompts each one writes other tokens.
  outs = [tuple(tuple(solo(m, p, 10)) for p in prompts) for m in models]
  assert len(set(outs)) == 3


def test_wrong_prefill_tree_for_one_row_is_caught(base):
  """Control: the check above fails when one row's KV comes from another task's tree."""
  models = sun_models(base)
  prompts = prompts_of(4, seed=1)
  ids = np.array([0, 1, 0, 1])
  swapped = [models[1], models[0]]  # row 1 (model 1) gets model 0's prefill tree, etc.
  out = si.sun_generate(swapped, prompts, model_ids=ids, max_new_tokens=10)
  mismatched = [not np.array_equal(np.asarray(out.tokens[r]), solo(models[m], p, 10))
                for r, (p, m) in enumerate(zip(prompts, ids))]
  assert all(mismatched)


def test_the_decode_step_is_one_compiled_function_for_every_mix(base):
  models = sun_models(base)
  prompts = prompts_of(6, seed=2)
  si.sun_generate(models, prompts, model_ids=[0] * 6, max_new_tokens=5)
  compiled = (generation.decode_step._cache_size(), generation.decode_slots._cache_size())
  for ids in ([0, 1, 2, 0, 1, 2], [2, 2, 2, 2, 2, 1], [1, 0, 0, 0, 0, 0]):
    si.sun_generate(models, prompts, model_ids=ids, max_new_tokens=5)
    # no retrace per mix: the same decode steps (on-device chunks) serve every mix
    assert (generation.decode_step._cache_size(),
            generation.decode_slots._cache_size()) == compiled


def test_sampling_and_eos_follow_generate(base):
  models = sun_models(base)
  prompts = prompts_of(5, seed=3)
  ids = [1, 0, 2, 1, 0]
  sampling = jaxsun.SamplingConfig(temperature=0.9, top_k=20)
  key = jax.random.key(4)
  out = si.sun_generate(models, prompts, model_ids=ids, max_new_tokens=8,
                        sampling=sampling, key=key, eos_id=EOS)
  # Each row's draw depends on its own logits and the step key only (Gumbel noise of the
  # batch's shape): so a batch served by one model alone gives row r the same tokens.
  for r, m in enumerate(ids):
    same = si.sun_generate([models[m]], prompts, model_ids=[0] * 5, max_new_tokens=8,
                           sampling=sampling, key=key, eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(out.tokens[r]), np.asarray(same.tokens[r]))
    assert int(out.lengths[r]) == int(same.lengths[r])


def test_sun_errors(base):
  models = sun_models(base)
  other = models[0].replace(decode=perturbed(models[0].decode, 11))
  with pytest.raises(ValueError, match=r"task_models\[1\] has a different decode tree"):
    si.sun_generate([models[0], other], prompts_of(2), model_ids=[0, 1], max_new_tokens=2)
  with pytest.raises(ValueError, match="model_ids must index task_models"):
    si.sun_generate(models, prompts_of(2), model_ids=[0, 3], max_new_tokens=2)
  with pytest.raises(ValueError, match="model_ids must be 2 integers"):
    si.sun_generate(models, prompts_of(2), model_ids=[0], max_new_tokens=2)
  with pytest.raises(ValueError, match="last_prompt_token"):
    si.sun_generate([models[0], models[1].replace(last_prompt_token="decode")],
                    prompts_of(2), model_ids=[0, 1], max_new_tokens=2)
  with pytest.raises(TypeError, match="got a Decoder"):
    si.sun_generate([models[0].prefill_module()], prompts_of(1), model_ids=[0],
                    max_new_tokens=2)
  with pytest.raises(ValueError, match="task_models is empty"):
    si.sun_generate([], prompts_of(1), model_ids=[0], max_new_tokens=2)


# ----------------------------------------------------------------------------- PrefillShare


def ps_models(base, last="decode", n=3):
  """PrefillShare task models: the base prefill tree, own decode trees."""
  u = base.replace(last_prompt_token=last).untie()
  return [u.replace(decode=perturbed(u.decode, 20 + i)) for i in range(n)]


@pytest.mark.parametrize("last", ["decode", "prefill"])
def test_one_prompt_kv_serves_several_decode_trees(base, last):
  models = ps_models(base, last)
  contexts = prompts_of(3, seed=5)
  ctx = si.SharedContext.prefill(models[0], contexts, capacity=48)
  outs = ctx.generate(models, max_new_tokens=9, eos_id=EOS)
  for m, out in zip(models, outs):
    for r, c in enumerate(contexts):
      np.testing.assert_array_equal(np.asarray(out.tokens[r]), solo(m, c, 9, eos_id=EOS))
  # The decode trees differ, so the shared KV did serve different continuations.
  assert len({tuple(np.asarray(o.tokens[0])) for o in outs}) == len(models)
  cfg = base.cfg
  n_cached = [len(c) - (1 if last == "decode" else 0) for c in contexts]
  one = sum(si.forward_flops(cfg, 0, n) for n in n_cached)
  assert ctx.flops["prefill_run"] == pytest.approx(one)
  assert ctx.flops["separate_prefill"] == pytest.approx(len(models) * one)
  assert ctx.flops_saved == pytest.approx((len(models) - 1) * one)
  assert ctx.flops["consumers"] == len(models)


def test_suffix_only_prefill_equals_full_prefill(base):
  models = ps_models(base)
  rng = np.random.default_rng(6)
  turns = [[list(rng.integers(3, CFG.vocab_size, n)) for n in (6, 9)],
           [list(rng.integers(3, CFG.vocab_size, n)) for n in (4, 2)],
           [list(rng.integers(3, CFG.vocab_size, n)) for n in (1, 5)]]
  ctx = si.SharedContext.prefill(models[0], turns[0], capacity=56)
  history = [list(t) for t in turns[0]]
  for suffix in turns[1:]:
    ctx = ctx.extend(models[0], suffix)
    history = [h + s for h, s in zip(history, suffix)]
    full = si.SharedContext.prefill(models[0], history, capacity=56)
    n = np.asarray(full.cache.lengths)
    np.testing.assert_array_equal(np.asarray(ctx.cache.lengths), n)
    for lay_a, lay_b in zip(ctx.cache.layers, full.cache.layers):
      for r in range(len(history)):  # the valid slots hold the same keys and values
        np.testing.assert_allclose(lay_a.k[r, :n[r]], lay_b.k[r, :n[r]], atol=1e-5)
        np.testing.assert_allclose(lay_a.v[r, :n[r]], lay_b.v[r, :n[r]], atol=1e-5)
    outs = ctx.generate(models, max_new_tokens=6)
    for m, out in zip(models, outs):
      for r, h in enumerate(history):
        np.testing.assert_array_equal(np.asarray(out.tokens[r]), solo(m, h, 6))
  # Each turn ran only its new tokens: the prefill spent is that of the final context,
  # once, however many turns it took.
  final = sum(si.forward_flops(CFG, 0, len(h) - 1) for h in history)
  assert ctx.flops["prefill_run"] == pytest.approx(final)


def test_prefillshare_errors(base):
  models = ps_models(base)
  ctx = si.SharedContext.prefill(models[0], prompts_of(1), capacity=24)
  stranger = models[0].replace(prefill=perturbed(models[0].prefill, 30))
  with pytest.raises(ValueError, match="different prefill tree from the shared one"):
    ctx.generate([models[1], stranger], max_new_tokens=2)
  with pytest.raises(ValueError, match="different prefill tree from the one that built"):
    ctx.extend(stranger, [[5, 6]])
  with pytest.raises(ValueError, match="last_prompt_token"):
    ctx.generate([models[0].replace(last_prompt_token="prefill")], max_new_tokens=2)
  with pytest.raises(ValueError, match="exceeds capacity"):
    ctx.generate(models, max_new_tokens=30)
  with pytest.raises(ValueError, match="exceeds capacity"):
    ctx.extend(models[0], [list(range(3, 30))])
  with pytest.raises(ValueError, match="capacity=4 must hold the longest context"):
    si.SharedContext.prefill(models[0], [list(range(3, 10))], capacity=4)
  # A context is not consumed by use: it serves later consumers the same way.
  a = ctx.generate(models[:1], max_new_tokens=4)[0]
  b = ctx.generate(models[:1], max_new_tokens=4)[0]
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
