"""Engine API: prefill / insert / generate / free against `jaxsun.generate`, producer
checks, KV digests, prefix extension, slot reuse, per-row sampling; the prefix cache."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsun.serving import engine as engine_lib
from jaxsun.serving.engine import Engine, InsertError, KVCorrupted, Params
from jaxsun.serving.prefix_cache import PrefixCache
from jaxsun.serving.request import SamplingParams
from tests import serving_models as sm

ENG = dict(slots=4, capacity=96, chunk=4)  # one engine shape: compiled functions are shared


def run_engine(eng, pre: Params, dec: Params, prompts, max_tokens, *, valid=None, eos_id=None,
               sampling=None, slot_order=None):
  """Prefill each prompt, insert into slots, generate until done; tokens per prompt."""
  ds = eng.init_decode_state()
  outs, lengths = {}, {}
  slots = slot_order or list(range(len(prompts)))
  for i, p in enumerate(prompts):
    sp = sampling[i] if sampling else SamplingParams(max_tokens=max_tokens)
    prefix, first = eng.prefill(pre, p, model="m", sampling=sp)
    outs[slots[i]] = [] if first is None else [first]
    lengths[slots[i]] = prefix.length
    ds = eng.insert(prefix, ds, slots[i], sampling=sp, eos_id=eos_id,
                    valid_producers=valid or {pre.tree_id})
  for _ in range(64):
    ds, chunk = eng.generate(dec, ds, max_live_length=max(lengths.values()) + max_tokens)
    t = np.asarray(chunk.tokens)
    for s in outs:
      outs[s] += [int(x) for x in t[s] if x >= 0]
    if not bool(np.asarray(ds.active).any()):
      break
  return [outs[s] for s in slots]


@pytest.mark.parametrize("family", ["base", "sun", "prefillshare"])
def test_engine_greedy_equals_generate(family):
  model = {"base": sm.base(), "sun": sm.sun_models()["math"],
           "prefillshare": sm.prefillshare_models()["critic"]}[family]
  eng = Engine(sm.CFG, **ENG)
  prompts = sm.prompts(3, seed=1)
  got = run_engine(eng, Params.prefill_of(model), Params.decode_of(model), prompts, 20)
  assert got == sm.references(model, prompts, 20)


def test_sun_rows_of_different_models_share_one_decode_step():
  math, code = sm.sun_models()["math"], sm.sun_models()["code"]
  eng = Engine(sm.CFG, **ENG)
  dec = Params.decode_of(math)
  assert dec.tree_id == Params.decode_of(code).tree_id  # one frozen decode tree
  pre = {m: Params.prefill_of(s) for m, s in sm.sun_models().items()}
  valid = {p.tree_id for p in pre.values()}
  prompts = sm.prompts(4, seed=2)
  owners = ["math", "code", "code", "math"]
  ds = eng.init_decode_state()
  outs = []
  for i, (p, m) in enumerate(zip(prompts, owners)):
    prefix, first = eng.prefill(pre[m], p, model=m)
    outs.append([first])
    ds = eng.insert(prefix, ds, i, sampling=SamplingParams(max_tokens=12), valid_producers=valid)
  for _ in range(3):
    ds, chunk = eng.generate(dec, ds, max_live_length=60)
    for i, row in enumerate(np.asarray(chunk.tokens)):
      outs[i] += [int(x) for x in row if x >= 0]
  for m in ("math", "code"):
    rows = [i for i, o in enumerate(owners) if o == m]
    assert [outs[i] for i in rows] == sm.references(sm.sun_models()[m],
                                                    [prompts[i] for i in rows], 12)


def test_insert_refuses_kv_of_a_tree_the_decode_module_does_not_pair_with():
  math = sm.sun_models()["math"]
  eng = Engine(sm.CFG, **ENG)
  stranger = Params.prefill_of(sm.tree(7))  # not any task model's prefill tree
  prefix, _ = eng.prefill(stranger, sm.prompts(1)[0], model="math")
  ds = eng.init_decode_state()
  valid = {Params.prefill_of(m).tree_id for m in sm.sun_models().values()}
  with pytest.raises(InsertError, match="not valid for this decode module"):
    eng.insert(prefix, ds, 0, sampling=SamplingParams(max_tokens=4), valid_producers=valid)
  # Control: the paired tree's KV goes in.
  good, _ = eng.prefill(Params.prefill_of(math), sm.prompts(1)[0], model="math")
  eng.insert(good, ds, 0, sampling=SamplingParams(max_tokens=4), valid_producers=valid)


def test_prefillshare_decode_modules_accept_only_the_shared_prefill_tree():
  planner = sm.prefillshare_models()["planner"]
  eng = Engine(sm.CFG, **ENG)
  shared = Params.prefill_of(planner)
  assert shared.tree_id == Params.prefill_of(sm.prefillshare_models()["critic"]).tree_id
  own = Params.decode_of(planner)  # the task's decode tree producing prompt KV: a mistake
  p = sm.prompts(1, seed=3)[0]
  wrong, _ = eng.prefill(Params(own.tree_id, own.split), p)
  with pytest.raises(InsertError, match="not valid"):
    eng.insert(wrong, eng.init_decode_state(), 0, sampling=SamplingParams(max_tokens=3),
               valid_producers={shared.tree_id})


def test_digest_catches_a_changed_kv_element_and_passes_the_untouched_kv():
  model = sm.base()
  eng = Engine(sm.CFG, **ENG)
  pre = Params.prefill_of(model)
  prefix, _ = eng.prefill(pre, sm.prompts(1, seed=4)[0])
  assert prefix.verify()
  layer = prefix.kv.layers[1]
  bad_v = layer.v.at[0, prefix.length - 1, 0, 3].multiply(-1.0)
  bad = dataclasses.replace(prefix, kv=prefix.kv.replace(
      layers=(prefix.kv.layers[0], layer.replace(v=bad_v))))
  assert not bad.verify()
  with pytest.raises(KVCorrupted, match="digest"):
    eng.insert(bad, eng.init_decode_state(), 0, sampling=SamplingParams(max_tokens=3),
               valid_producers={pre.tree_id})
  # Slots past the length are scratch: changing them leaves the digest alone.
  scratch = layer.k.at[0, prefix.length, 0, 0].add(1.0)
  fine = dataclasses.replace(prefix, kv=prefix.kv.replace(
      layers=(prefix.kv.layers[0], layer.replace(k=scratch))))
  assert fine.verify()


@pytest.mark.parametrize("last_prompt_token", ["prefill", "decode"])
def test_prefill_on_a_cached_prefix_equals_a_full_prefill(last_prompt_token):
  model = sm.base().replace(last_prompt_token=last_prompt_token)
  eng = Engine(sm.CFG, **ENG)
  pre = Params.prefill_of(model)
  prompt = sm.prompts(1, seed=5, lo=40, hi=41)[0]
  full, first_full = eng.prefill(pre, prompt)
  head, _ = eng.prefill(pre, prompt[:17])
  ext, first_ext = eng.prefill(pre, prompt, existing_prefix=head)
  assert ext.length == full.length and first_ext == first_full
  n = full.length
  for a, b in zip(full.kv.layers, ext.kv.layers):
    np.testing.assert_allclose(np.asarray(a.k[0, :n]), np.asarray(b.k[0, :n]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.v[0, :n]), np.asarray(b.v[0, :n]), atol=1e-5)
  # A prefix from another tree is refused.
  with pytest.raises(InsertError, match="produced by tree"):
    eng.prefill(Params.prefill_of(sm.tree(5)), prompt, existing_prefix=head)


def test_eos_stop_ids_and_slot_reuse_keep_other_rows_exact():
  model = sm.base()
  eng = Engine(sm.CFG, **ENG)
  pre, dec = Params.prefill_of(model), Params.decode_of(model)
  prompts = sm.prompts(4, seed=6)
  ref = sm.references(model, prompts, 10)
  eos = ref[0][3]  # a token row 0 emits: that row stops there
  want = sm.references(model, prompts, 10, eos_id=eos)
  ds = eng.init_decode_state()
  outs: dict[int, list[int]] = {}
  queue, slot_of = list(range(4)), {}
  for _ in range(100):
    for s in range(2):  # admit into free slots (two of the four)
      if s not in slot_of.values() and queue:
        i = queue.pop(0)
        prefix, first = eng.prefill(pre, prompts[i])
        outs[i] = [first]
        ds = eng.free(ds, s)
        ds = eng.insert(prefix, ds, s, sampling=SamplingParams(max_tokens=10),
                        valid_producers={pre.tree_id}, eos_id=eos)
        slot_of[i] = s
        if first == eos:
          del slot_of[i]
    ds, chunk = eng.generate(dec, ds, max_live_length=60)
    t = np.asarray(chunk.tokens)
    for i, s in list(slot_of.items()):
      outs[i] += [int(x) for x in t[s] if x >= 0]
      if outs[i][-1] == eos or len(outs[i]) == 10:
        del slot_of[i]
    if not queue and not slot_of:
      break
  assert [outs[i] for i in range(4)] == want
  assert want[0] != ref[0] and want[0][-1] == eos  # the control: EOS did cut row 0


def test_sampling_depends_on_the_request_not_on_its_slot_or_neighbours():
  model = sm.base()
  eng = Engine(sm.CFG, **ENG)
  pre, dec = Params.prefill_of(model), Params.decode_of(model)
  prompts = sm.prompts(3, seed=7)
  hot = SamplingParams(max_tokens=12, temperature=1.3, top_p=0.9, top_k=20, seed=11)
  greedy = SamplingParams(max_tokens=12)
  alone = run_engine(eng, pre, dec, prompts[:1], 12, sampling=[hot])[0]
  mixed = run_engine(eng, pre, dec, prompts, 12, sampling=[hot, greedy, greedy],
                     slot_order=[3, 0, 1])[0]
  assert alone == mixed
  other_seed = run_engine(eng, pre, dec, prompts[:1], 12,
                          sampling=[dataclasses.replace(hot, seed=12)])[0]
  assert other_seed != alone  # control: the seed matters


def test_sample_rows_top_k_one_is_greedy_and_filters_follow_each_row():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)), jnp.float32)
  keys = jnp.asarray(np.stack([engine_lib.request_key(i) for i in range(3)]))
  got = engine_lib.sample_rows(logits, keys, jnp.zeros(3, jnp.int32),
                               jnp.asarray([0.0, 2.0, 2.0]), jnp.asarray([1.0, 1.0, 1e-6]),
                               jnp.asarray([0, 1, 0], jnp.int32))
  np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))


def test_engine_rejects_bad_arguments():
  with pytest.raises(ValueError, match="slots"):
    Engine(sm.CFG, slots=0)
  with pytest.raises(ValueError, match="capacity"):
    Engine(sm.CFG, capacity=sm.CFG.max_len + 1)
  eng = Engine(sm.CFG, **ENG)
  pre = Params.prefill_of(sm.base())
  with pytest.raises(TypeError, match="Params"):
    eng.prefill(sm.base(), [1, 2])
  with pytest.raises(ValueError, match="vocabulary"):
    eng.prefill(pre, [1, sm.CFG.vocab_size])
  prefix, _ = eng.prefill(pre, list(range(1, 61)))
  with pytest.raises(InsertError, match="max_tokens"):
    eng.insert(prefix, eng.init_decode_state(), 0, sampling=SamplingParams(max_tokens=60),
               valid_producers={pre.tree_id})


# ----------------------------------------------------------------------------- prefix cache


def test_prefix_cache_is_shared_by_tree_never_across_trees():
  eng = Engine(sm.CFG, **ENG)
  shared = Params.prefill_of(sm.prefillshare_models()["planner"])
  other = Params.prefill_of(sm.sun_models()["math"])
  cache = PrefixCache(budget_bytes=1 << 20, block=8)
  ctx = sm.prompts(1, seed=8, lo=35, hi=36)[0]
  prefix, _ = eng.prefill(shared, ctx)
  cache.put(prefix)
  follow_up = ctx + (5, 6, 7)
  # The critic (same shared prefill tree as the planner) hits the planner's entry ...
  critic_tree = Params.prefill_of(sm.prefillshare_models()["critic"]).tree_id
  hit = cache.lookup(critic_tree, follow_up)
  assert hit is not None and hit.length == prefix.length and hit.verify()
  # ... a model with another prefill tree never does, even on the same tokens.
  assert cache.lookup(other.tree_id, follow_up) is None
  # A partial match is cut at a block boundary and still verifies.
  partial = cache.lookup(shared.tree_id, ctx[:20] + (1, 1, 1))
  assert partial.length == 16 and partial.tokens == ctx[:16] and partial.verify()
  assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 1


def test_prefix_cache_evicts_least_recently_used_under_its_budget():
  eng = Engine(sm.CFG, **ENG)
  pre = Params.prefill_of(sm.base())
  ps = [eng.prefill(pre, p)[0] for p in sm.prompts(3, seed=9, lo=20, hi=21)]
  cache = PrefixCache(budget_bytes=2 * ps[0].nbytes, block=8)
  cache.put(ps[0])
  cache.put(ps[1])
  assert cache.lookup(pre.tree_id, ps[0].tokens) is not None  # 0 is now most recent
  cache.put(ps[2])  # evicts 1
  assert cache.bytes <= cache.budget_bytes and cache.evictions == 1
  assert cache.lookup(pre.tree_id, ps[1].tokens) is None
  assert cache.lookup(pre.tree_id, ps[0].tokens) is not None
  assert cache.lookup(pre.tree_id, ps[2].tokens) is not None


def test_affine_attention_serves_through_the_engine_and_a_truncated_prefix_cache_hit():
  """Affine attention keeps a running sum of V in the KV cache: the engine's decode steps,
  inserts and a prefix-cache hit cut shorter than its entry all keep it right."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jaxsun  # pylint: disable=import-outside-toplevel
  cfg = sm.CFG.replace(attention="affine")
  model = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(3)))
  # Move alpha_ma off its initial 0 so that beta (and the sum of V) matter.
  state = nnx.state(model.prefill_module())
  for i in range(cfg.n_layers):
    state["layers"][i]["attn"]["alpha_ma"][...] = jnp.full((cfg.n_heads,), 0.7)
  model = model.replace(prefill=state)
  eng = Engine(cfg, **ENG)
  pre, dec = Params.prefill_of(model), Params.decode_of(model)
  prompts = sm.prompts(3, seed=2)
  assert run_engine(eng, pre, dec, prompts, 12) == sm.references(model, prompts, 12)
  # A cached 40-token prefix, hit at 16 tokens by a prompt that diverges after them.
  long = sm.prompts(1, seed=6, lo=40, hi=41)[0]
  cache = PrefixCache(budget_bytes=1 << 30, block=16)
  entry, _ = eng.prefill(pre, long)
  cache.put(entry)
  prompt = list(long[:16]) + [(t + 1) % cfg.vocab_size for t in long[16:30]]
  hit = cache.lookup(pre.tree_id, prompt)
  assert hit is not None and hit.length == 16
  state_hit = hit.kv.layers[0].state["v_sum"]
  fresh, _ = eng.prefill(pre, prompt[:16])
  np.testing.assert_allclose(np.asarray(state_hit), np.asarray(fresh.kv.layers[0].state["v_sum"]),
                             rtol=1e-5, atol=1e-6)
  ext, first_ext = eng.prefill(pre, prompt, existing_prefix=hit)
  full, first_full = eng.prefill(pre, prompt)
  assert first_ext == first_full
  np.testing.assert_allclose(np.asarray(ext.kv.layers[1].state["v_sum"]),
                             np.asarray(full.kv.layers[1].state["v_sum"]), rtol=1e-5, atol=1e-6)
