"""lm-evaluation-harness adapter: closed forms on a uniform byte model, equality with the
decoder's own prefill/decode modes, and the eval_harness job end to end (offline)."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from configs import eval_harness as eval_config
from jaxsun import jobs
from jaxsun.data import tokenizers
from jaxsun.eval import harness

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top,wrong-import-position

TOK = tokenizers.ByteTokenizer()


def instance(kind, args, i=0):
  return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@pytest.fixture(scope="module")
def uniform_lm():
  cfg = jaxsun.ModelConfig.preset("tiny", vocab_size=259, max_len=128, tie_embeddings=False)
  model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
  model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])  # logits all 0
  return harness.JaxsunLM(jaxsun.SplitModel.from_model(model), TOK, batch_size=4)


@pytest.fixture(scope="module")
def task_split():
  """An untied SUN-like task model: a different prefill tree over a shared decode tree."""
  cfg = jaxsun.ModelConfig.preset("tiny", vocab_size=259, max_len=64, init_std=0.25)
  base = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))).untie()
  return base.replace(prefill=jax.tree.map(lambda x: x * 1.2, base.prefill))


def reference_ll(split, context, continuation):
  """log p(continuation | context): prefill tree on the context, decode tree after it."""
  pre, dec = split.prefill_module(), split.decode_module()
  ctx = jnp.asarray([context])
  logits_pre, cache = pre(ctx, mode="prefill", cache=pre.init_cache(1, split.cfg.max_len))
  logits_dec, _ = dec(jnp.asarray([continuation[:-1]]), mode="prefill", cache=cache) \
      if len(continuation) > 1 else (jnp.zeros((1, 0, split.cfg.vocab_size)), None)
  logits = jnp.concatenate([logits_pre[:, -1:], logits_dec], 1)[0]  # predicts continuation
  logp = jax.nn.log_softmax(logits)
  picked = logp[jnp.arange(len(continuation)), jnp.asarray(continuation)]
  greedy = bool(jnp.all(jnp.argmax(logp, -1) == jnp.asarray(continuation)))
  return float(jnp.sum(picked)), greedy


def test_uniform_model_closed_forms(uniform_lm):
  out = uniform_lm.loglikelihood([instance("loglikelihood", ("Q: hi\nA:", " abc")),
                                  instance("loglikelihood", ("", "xyz"))])
  assert out[0][0] == pytest.approx(-4 * math.log(259), rel=1e-6)
  # Empty context: the end-of-text id conditions all 3 bytes.
  assert out[1][0] == pytest.approx(-3 * math.log(259), rel=1e-6)
  text = "All the world's a stage, " * 12  # 300 bytes > max_length: several windows
  (rolling,) = uniform_lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
  assert rolling == pytest.approx(-len(text.encode()) * math.log(259), rel=1e-6)


def test_loglikelihood_runs_through_the_split(task_split):
  lm = harness.JaxsunLM(task_split, TOK, batch_size=3)
  rng = np.random.default_rng(0)
  pairs = [("Q: spell sun\nA:", " nus"), ("a", "bcdefgh"), ("x" * 20, " y"),
           ("How many?", " 12"), ("Q", "A")]
  reqs = [instance("loglikelihood", p, i) for i, p in enumerate(pairs)]
  got = lm.loglikelihood(reqs)
  for (ctx, cont), (ll, greedy) in zip(pairs, got):
    want_ll, want_greedy = reference_ll(task_split, TOK.encode(ctx), TOK.encode(cont))
    assert ll == pytest.approx(want_ll, rel=1e-4, abs=1e-4), (ctx, cont)
    assert greedy == want_greedy
  # The greedy continuation is greedy; the tied base model scores differently (control).
  ctx = TOK.encode("Q: spell sun\nA:")
  gen = jaxsun.generate(task_split, [ctx], max_new_tokens=3)
  cont = [int(t) for t in np.asarray(gen.tokens)[0]]
  (ll, greedy), = lm._loglikelihood_tokens([((None, None), ctx, cont)])
  assert greedy and ll == pytest.approx(reference_ll(task_split, ctx, cont)[0], rel=1e-4)
  base = harness.JaxsunLM(task_split.replace(prefill=task_split.decode, decode=None), TOK)
  assert abs(base.loglikelihood(reqs[:1])[0][0] - got[0][0]) > 1e-3
  del rng


def test_long_context_keeps_the_last_max_length_tokens(task_split):
  lm = harness.JaxsunLM(task_split, TOK, batch_size=2, max_length=32)
  ctx, cont = TOK.encode("abcdefghij" * 5), TOK.encode(" end")
  (ll, _), = lm._loglikelihood_tokens([((None, None), ctx, cont)])
  whole = (ctx + cont)[-33:]
  want, _ = reference_ll(task_split, whole[:-len(cont)], cont)
  assert ll == pytest.approx(want, rel=1e-4)
  with pytest.raises(ValueError, match="does not fit"):
    lm._loglikelihood_tokens([((None, None), [1], [5] * 40)])


def test_generate_until_matches_generate_and_cuts_at_stop(task_split):
  lm = harness.JaxsunLM(task_split, TOK, batch_size=2)
  prompts = ["Q: one\nA:", "Q: two words\nA:", "Q: three\nA:"]
  reqs = [instance("generate_until", (p, {"until": ["\n"], "max_gen_toks": 8}), i)
          for i, p in enumerate(prompts)]
  got = lm.generate_until(reqs)
  for p, text in zip(prompts, got):
    out = jaxsun.generate(task_split, [TOK.encode(p)], max_new_tokens=8, eos_id=TOK.eos_id)
    ids = [int(t) for t in np.asarray(out.tokens)[0, :int(out.lengths[0])] if t != TOK.eos_id]
    want = TOK.decode(ids).split("\n")[0]
    assert text == want
  with pytest.raises(ValueError, match="greedy only"):
    lm.generate_until([instance("generate_until", ("x", {"do_sample": True}))])


def _jsonl(name):
  with open(os.path.join(harness.TASK_DIR, name)) as f:
    return [json.loads(line) for line in f]


def test_shipped_tasks_end_to_end_on_a_uniform_model(uniform_lm):
  limit = 12
  res = harness.evaluate(uniform_lm, list(harness.SHIPPED_TASKS), limit=limit)["results"]
  # Rolling perplexity: every byte costs log(259) nats.
  ppl = res["jaxsun_shakespeare_ppl"]
  docs = [d["text"] for d in _jsonl("shakespeare_ppl.jsonl")[:limit]]
  n_bytes = sum(len(d.encode()) for d in docs)
  n_words = sum(len(re.split(r"\s+", d)) for d in docs)
  assert ppl["byte_perplexity,none"] == pytest.approx(259, rel=1e-6)
  assert ppl["bits_per_byte,none"] == pytest.approx(math.log2(259), rel=1e-6)
  assert ppl["word_perplexity,none"] == pytest.approx(259 ** (n_bytes / n_words), rel=1e-4)
  # Multiple choice: log p = -len(" " + choice) * log 259, so acc picks the first
  # shortest choice; acc_norm (per byte) ties everywhere and picks the first.
  items = _jsonl("letter_counting_mc.jsonl")[:limit]
  pick = [int(np.argmin([len(c) for c in it["choices"]])) for it in items]
  mc = res["jaxsun_letter_counting_mc"]
  assert mc["acc,none"] == pytest.approx(np.mean([p == it["label"] for p, it in
                                                  zip(pick, items)]))
  assert mc["acc_norm,none"] == pytest.approx(np.mean([it["label"] == 0 for it in items]))
  assert res["jaxsun_spell_backward_gen"]["exact_match,strip"] == 0.0


def test_eval_harness_job_on_the_committed_checkpoint(tmp_path, capsys):
  config = eval_config.get_config("tiny")
  with config.unlocked():
    config.limit = 4
  out = jobs.run(config, tmp_path)
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["results"] == out["results"]
  assert set(saved["results"]) == set(harness.SHIPPED_TASKS)
  assert saved["n_samples"]["jaxsun_letter_counting_mc"]["effective"] == 4
  assert saved["results"]["jaxsun_shakespeare_ppl"]["byte_perplexity,none"] > 1.0
  assert "byte_perplexity" in capsys.readouterr().out


def test_eval_harness_job_errors_name_the_key(tmp_path):
  config = eval_config.get_config()
  with pytest.raises(ValueError, match="config.checkpoint is empty"):
    jobs.run(config, tmp_path)
  with config.unlocked():
    config.checkpoint = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.checkpoint=.*not a directory"):
    jobs.run(config, tmp_path)
  with pytest.raises(ValueError, match="unknown variant"):
    eval_config.get_config("huge")
