"""Scanned layers (`ModelConfig.scan_layers`) and remat (`ModelConfig.remat`).

The scanned layout must compute what the unrolled one computes (logits, gradients,
caches, dropout), convert losslessly both ways, compile one block for any depth, and
keep every path-based feature working: LoRA, codebook quantization, Hugging Face
import/export, checkpoints, generation and the serving engine. Every remat policy must
leave the loss and the gradients unchanged.
"""

import functools
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun import lora
from jaxsun import parallel
from jaxsun import split as split_lib
from jaxsun.config import REMAT
from jaxsun.interop import hf
from jaxsun.nn import decoder as dec
from jaxsun.train import checkpoints as ckpt_lib
from jaxsun.train.optim import OptimizerConfig
from jaxsun.train.trainer import TrainConfig, Trainer
from tests.helpers import perturbed, random_tokens, untied_split

# Three layers, so the scan has a middle iteration; a large init for peaked logits.
CFG = jaxsun.ModelConfig.preset("tiny", n_layers=3, init_std=0.25, max_len=48)
SCFG = CFG.replace(scan_layers=True)
HF_DATA = pathlib.Path(__file__).parent / "testdata" / "hf"


def models(cfg=CFG, seed=0):
  """(unrolled, scanned) decoders with the same values."""
  return (jaxsun.Decoder(cfg, rngs=nnx.Rngs(seed)),
          jaxsun.Decoder(cfg.replace(scan_layers=True), rngs=nnx.Rngs(seed)))


def arrays(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same(a, b, rtol=0.0, atol=0.0):
  """Same structure (including variable metadata) and values (bitwise by default)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(arrays(a), arrays(b)):
    if rtol or atol:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
    else:
      np.testing.assert_array_equal(x, y)


def loss_and_grads(model, tokens, **kw):
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state):
    logits = nnx.merge(graphdef, state)(tokens, **kw)[0]
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2), logits

  (loss, logits), grads = jax.value_and_grad(f, has_aux=True)(state)
  return loss, logits, grads


# --- layout ---------------------------------------------------------------------------


def test_scanned_init_is_the_stacked_unrolled_model():
  plain, scanned = models()
  assert isinstance(scanned.layers, dec.Block)
  kernel = scanned.layers.attn.q_proj.kernel
  assert kernel.shape == (CFG.n_layers, CFG.d_model, CFG.q_dim)
  assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
  # The same rngs give the same values in both layouts.
  assert_same(nnx.state(scanned), nnx.state(dec.stack_layers(plain)))
  assert scanned.cfg == SCFG and dec.stack_layers(plain).cfg == SCFG


def test_stack_unstack_round_trips_are_exact():
  plain, scanned = models(CFG.replace(tie_embeddings=False, qkv_bias=True))
  back = dec.unstack_layers(dec.stack_layers(plain))
  assert back.cfg == plain.cfg
  assert_same(nnx.state(back), nnx.state(plain))
  assert nnx.graphdef(back) == nnx.graphdef(plain)
  # The state helpers agree with the module conversions (checkpoints use them).
  assert_same(dec.stack_state(nnx.state(plain)), nnx.state(scanned))
  assert_same(dec.unstack_state(nnx.state(scanned)), nnx.state(plain))
  # Abstract templates convert too (restoring a checkpoint of the other layout).
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(plain))
  shapes = jax.tree.map(lambda x: x.shape, dec.stack_state(abstract))
  assert shapes == jax.tree.map(lambda x: x.shape, nnx.state(scanned))
  # The stacking is not shared with the source: the source model still works unchanged.
  assert_same(nnx.state(dec.unstack_layers(scanned)), nnx.state(plain))
  with pytest.raises(ValueError, match="already in the scanned layout"):
    dec.stack_layers(scanned)
  with pytest.raises(ValueError, match="already in the unrolled layout"):
    dec.unstack_layers(plain)


def test_split_with_layout_keeps_roles_and_graphs():
  plain, _ = models()
  split = untied_split(plain, last_prompt_token="decode")
  scanned = split_lib.with_layout(split, True)
  assert scanned.cfg.scan_layers and not scanned.tied
  assert scanned.last_prompt_token == "decode" and scanned.decode_graphdef is None
  assert split_lib.with_layout(scanned, True) is scanned
  back = split_lib.with_layout(scanned, False)
  assert_same(back.prefill, split.prefill)
  assert_same(back.decode, split.decode)
  tied = split_lib.with_layout(jaxsun.SplitModel.from_model(plain), True)
  assert tied.tied


def test_layers_of_different_structure_cannot_be_stacked():
  plain, _ = models()
  adapted = lora.adapt_module(plain, lora.LoRAConfig(targets=r"layers/0/attn/q_proj"),
                              jax.random.key(0))
  with pytest.raises(ValueError, match="layer 1 differs in structure from layer 0"):
    dec.stack_layers(adapted)


def test_sharding_rules_cover_the_layer_axis():
  _, scanned = models()
  mesh = parallel.make_mesh()
  shardings = parallel.state_shardings(nnx.state(scanned), mesh)
  q = shardings["layers"]["attn"]["q_proj"]["kernel"].get_value()
  assert q.spec == jax.sharding.PartitionSpec(None, None, None)
  # With a larger mesh the layer axis stays replicated while embed/heads shard.
  big = types.SimpleNamespace(shape={"data": 1, "fsdp": 2, "tensor": 2})  # shape only
  spec = parallel.logical_to_spec(("layers", "embed", "heads"), (3, 64, 64), big)
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


# --- numerics -------------------------------------------------------------------------


def test_train_logits_and_gradients_match_the_unrolled_layout():
  plain, scanned = models()
  tokens = random_tokens(0, (2, 16), CFG.vocab_size)
  segments = jnp.array([[0] * 8 + [1] * 8, [0] * 16], jnp.int32)
  for kw in ({}, {"segment_ids": segments}):
    loss_a, logits_a, grads_a = loss_and_grads(plain, tokens, **kw)
    loss_b, logits_b, grads_b = loss_and_grads(scanned, tokens, **kw)
    np.testing.assert_allclose(np.asarray(logits_b), np.asarray(logits_a), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5)
    assert_same(dec.unstack_state(grads_b), grads_a, rtol=1e-4, atol=1e-7)


def test_prefill_then_decode_matches_the_unrolled_layout():
  plain, scanned = models()
  tokens = random_tokens(1, (2, 12), CFG.vocab_size)

  @jax.jit
  def run(model):
    cache = model.init_cache(2, 16)
    logits, cache = model(tokens[:, :8], mode="prefill", cache=cache,
                          new_lengths=jnp.array([8, 5]))
    steps = []
    for t in range(8, 12):
      step, cache = model(tokens[:, t:t + 1], mode="decode", cache=cache)
      steps.append(step)
    return logits, jnp.concatenate(steps, axis=1), cache

  pa, da, ca = run(plain)
  pb, db, cb = run(scanned)
  np.testing.assert_allclose(np.asarray(pb), np.asarray(pa), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(db), np.asarray(da), rtol=1e-5, atol=1e-5)
  # The cache keeps its per-layer layout in both: generation code is layout-free.
  assert len(cb.layers) == CFG.n_layers
  assert_same(cb, ca, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(jaxsun.nn.ATTENTION_KINDS))
def test_attention_variants_match_in_both_layouts(kind):
  cfg = CFG.replace(attention=kind, n_layers=2)
  plain = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
  plain = nnx.merge(nnx.graphdef(plain), perturbed(nnx.state(plain), 4))  # non-zero extras
  scanned = dec.stack_layers(plain)
  tokens = random_tokens(2, (2, 10), cfg.vocab_size)

  @jax.jit
  def run(model):
    full = model(tokens)[0]
    cache = model.init_cache(2, 12)
    pre, cache = model(tokens[:, :6], mode="prefill", cache=cache)
    return full, pre, cache

  fa, pa, ca = run(plain)
  fb, pb, cb = run(scanned)
  np.testing.assert_allclose(np.asarray(fb), np.asarray(fa), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(pb), np.asarray(pa), rtol=1e-5, atol=1e-5)
  assert_same(cb, ca, rtol=1e-5, atol=1e-6)  # incl. the variant's cache state


def test_fp8_state_gradients_match_per_layer():
  cfg = CFG.replace(fp8="delayed", init_std=0.1, n_layers=2)
  plain, scanned = models(cfg)
  tokens = random_tokens(3, (2, 8), cfg.vocab_size)
  _, la, ga = loss_and_grads(plain, tokens)
  _, lb, gb = loss_and_grads(scanned, tokens)
  np.testing.assert_allclose(np.asarray(lb), np.asarray(la), rtol=1e-5, atol=1e-5)
  # The Fp8Meta "gradients" (next amax histories) come back per layer in both layouts.
  assert gb["layers"]["mlp"]["up_proj"]["x_history"][...].shape[0] == cfg.n_layers
  assert_same(dec.unstack_state(gb), ga, rtol=1e-4, atol=1e-6)


@functools.lru_cache(maxsize=None)
def _remat_run(scan: bool, remat: str):
  cfg = CFG.replace(scan_layers=scan, remat=remat, n_layers=2)
  return loss_and_grads(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)),
                        random_tokens(4, (2, 12), CFG.vocab_size))


@pytest.mark.parametrize("remat", [r for r in REMAT if r != "none"])
def test_remat_policies_keep_loss_and_gradients(remat):
  for scan in (False, True):
    loss_a, _, grads_a = _remat_run(scan, "none")
    loss_b, _, grads_b = _remat_run(scan, remat)
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-6)
    assert_same(grads_b, grads_a, rtol=1e-5, atol=1e-8)


def _residuals(model, tokens, capsys):
  graphdef, state = nnx.split(model)
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(
      lambda s: jnp.mean(nnx.merge(graphdef, s)(tokens)[0]), state)
  return capsys.readouterr().out


def test_remat_policies_save_less_and_minimal_saves_the_named_activations(capsys):
  tokens = random_tokens(5, (1, 8), CFG.vocab_size)
  for scan in (False, True):
    count = {}
    for remat in ("none", "minimal", "full"):
      cfg = CFG.replace(scan_layers=scan, remat=remat)
      out = _residuals(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)), tokens, capsys)
      count[remat] = len(out.strip().splitlines())
      if remat == "minimal" and not scan:  # names are visible outside a scan
        assert "named 'mlp_gate'" in out and "named 'mlp_up'" in out
    assert count["full"] < count["minimal"] < count["none"], (scan, count)


def test_one_compiled_block_for_any_depth():
  def lowered(cfg):
    model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 8), jnp.int32)
    f = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens)[0])
    return f.lower(state).as_text()

  s2, s8 = (lowered(SCFG.replace(n_layers=n)) for n in (2, 8))
  u2, u8 = (lowered(CFG.replace(n_layers=n)) for n in (2, 8))
  assert s2.count("stablehlo.while") == s8.count("stablehlo.while") == 1
  assert len(s8) < 1.05 * len(s2)  # only the stacked shapes' leading dimension changes
  assert len(u8) > 2 * len(u2)  # control: the unrolled program grows with depth


def test_invalid_remat_names_the_field():
  with pytest.raises(ValueError, match=r"ModelConfig\.remat='bogus'"):
    jaxsun.ModelConfig.preset("tiny", remat="bogus")
  with pytest.raises(ValueError, match=r"ModelConfig\.scan_layers"):
    jaxsun.ModelConfig.preset("tiny", scan_layers=1)
  assert set(dec.REMAT_POLICIES) == set(REMAT)


# --- features that address parameters by path ----------------------------------------


LORA = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.3,
                       targets=r"layers/\d+/(attn|mlp)/\w+_proj|lm_head")


def test_lora_in_the_scanned_layout_equals_the_unrolled_layout():
  plain, scanned = models(CFG.replace(tie_embeddings=False))
  a = lora.add_adapters(jaxsun.SplitModel.from_model(plain), "both", LORA, jax.random.key(1))
  b = lora.add_adapters(jaxsun.SplitModel.from_model(scanned), "both", LORA,
                        jax.random.key(1))
  # Stacked adapters with the unrolled layout's values; base arrays shared, not copied.
  assert b.prefill["layers"]["attn"]["q_proj"]["lora_a"][...].shape == (CFG.n_layers,
                                                                      CFG.d_model, 4)
  assert_same(split_lib.with_layout(b, False).prefill, a.prefill)
  rest = nnx.filter_state(b.prefill, nnx.Not(nnx.LoRAParam))
  assert {id(x) for x in jax.tree.leaves(rest)} == {
      id(x) for x in jax.tree.leaves(nnx.state(scanned))}
  assert lora.adapter_count(a) == lora.adapter_count(b)
  # Random adapters (B != 0), then: dropout keys per layer agree, and merging agrees.
  a = a.replace(prefill=random_adapters(a.prefill, 7))
  b = split_lib.with_layout(a, True)
  tokens = random_tokens(6, (2, 16), CFG.vocab_size)
  fwd = jax.jit(lambda s, k: s.prefill_module()(tokens, dropout_key=k)[0])
  key = jax.random.key(3)
  np.testing.assert_allclose(np.asarray(fwd(b, key)), np.asarray(fwd(a, key)), rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(np.asarray(fwd(a, key)), np.asarray(fwd(a, None)))  # dropout on
  merged = lora.merge_adapters(b)
  assert merged.cfg.scan_layers and lora.adapter_count(merged) == 0
  np.testing.assert_allclose(np.asarray(fwd(merged, None)), np.asarray(fwd(a, None)),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="matches layers/attn/q_proj in 1 of 3 layers"):
    lora.add_adapters(jaxsun.SplitModel.from_model(scanned), "both",
                      lora.LoRAConfig(targets=r"layers/1/attn/q_proj"), jax.random.key(0))


def random_adapters(tree, seed, scale=0.3):
  """`tree` with every adapter array replaced by random values (so B != 0)."""
  adapters = nnx.filter_state(tree, nnx.LoRAParam)
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  return nnx.merge_state(nnx.filter_state(tree, nnx.Not(nnx.LoRAParam)), new)


def _task_batches(seed=0):
  rng = np.random.default_rng(seed)
  while True:
    tokens = rng.integers(3, CFG.vocab_size, (4, 24)).astype(np.int32)
    boundary = rng.integers(6, 14, (4,)).astype(np.int32)
    mask = (np.arange(24)[None] >= boundary[:, None]).astype(np.float32)
    yield {"tokens": tokens, "boundary": boundary, "loss_mask": mask}


def test_training_only_the_adapters_of_a_scanned_model():
  _, scanned = models()
  split = jaxsun.SplitModel.from_model(scanned).untie()
  split = lora.add_adapters(split, "prefill", lora.LoRAConfig(rank=4), jax.random.key(0))
  before = jax.tree.map(np.asarray, (split.prefill, split.decode))
  trainer = Trainer(split, TrainConfig(steps=2, trainability="prefill", log_every=1,
                                       optimizer=OptimizerConfig(1e-2, warmup_steps=0)))
  trainer.fit(_task_batches(), progress=False)
  assert trainer.num_trainable_params() == lora.adapter_count(trainer.split) > 0
  for new, old in zip((trainer.split.prefill, trainer.split.decode), before):
    rest = [nnx.filter_state(t, nnx.Not(nnx.LoRAParam)) for t in (new, old)]
    for x, y in zip(jax.tree.leaves(rest[0]), jax.tree.leaves(rest[1])):
      np.testing.assert_array_equal(np.asarray(x), y)  # every base array stays frozen
  moved = [not np.array_equal(np.asarray(x), y) for x, y in zip(
      jax.tree.leaves(nnx.filter_state(trainer.split.prefill, nnx.LoRAParam)),
      jax.tree.leaves(nnx.filter_state(before[0], nnx.LoRAParam)))]
  assert all(moved)  # the stacked adapters of every layer trained


def test_quantize_model_in_the_scanned_layout():
  from jaxsun.quant import codebook as cq  # pylint: disable=g-import-not-at-top
  from jaxsun.quant import layers as ql  # pylint: disable=g-import-not-at-top
  from pallas_kernels.psumbook_gemm import CodebookFormat  # pylint: disable=g-import-not-at-top
  plain, scanned = models(CFG.replace(n_layers=2, remat="full"))
  tokens = random_tokens(7, (2, 16), CFG.vocab_size)
  kw = dict(pattern=r"layers/\d+/mlp/up_proj", fmt=CodebookFormat.parse("m1v4g32"),
            cfg=cq.QuantizerConfig(kmeans_iterations=3, iterations=1, adam_steps=2))
  qa, report_a = ql.quantize_model(plain, tokens, **kw)
  qb, report_b = ql.quantize_model(scanned, tokens, **kw)
  assert sorted(report_b) == sorted(report_a) == ["layers/0/mlp/up_proj",
                                                  "layers/1/mlp/up_proj"]
  assert qb.cfg.scan_layers and isinstance(qb.layers.mlp.up_proj, ql.CodebookLinear)
  assert qb.layers.mlp.up_proj.codes.shape[0] == 2
  assert_same(nnx.state(qb), nnx.state(dec.stack_layers(qa)))
  np.testing.assert_allclose(np.asarray(jax.jit(lambda m: m(tokens)[0])(qb)),
                             np.asarray(jax.jit(lambda m: m(tokens)[0])(qa)),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unstack_layers"):
    ql.select_linears(scanned, r"layers/\d+/mlp/up_proj")


def test_hf_import_export_in_the_scanned_layout(tmp_path):
  src = HF_DATA / "llama_untied"
  plain = hf.load_hf(src)
  scanned = hf.load_hf(src, scan_layers=True, remat="dots")
  assert scanned.cfg == plain.cfg.replace(scan_layers=True, remat="dots")
  assert_same(scanned.prefill, dec.stack_state(plain.prefill))
  golden = np.load(src / "golden.npz")
  tokens = jnp.asarray(golden["tokens"])
  logits = jax.jit(lambda s: s.prefill_module()(tokens)[0])
  np.testing.assert_allclose(np.asarray(logits(scanned)), np.asarray(logits(plain)),
                             rtol=1e-5, atol=1e-5)
  # Export writes the same per-layer tensors as the unrolled model.
  want = hf.decoder_tensors(plain.prefill)
  got = hf.decoder_tensors(scanned.prefill)
  assert list(got) == list(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  out = hf.save_hf(scanned, str(tmp_path / "out"))
  again = hf.load_hf(out)
  assert_same(again.prefill, plain.prefill)
  # An untied scanned split exports as two checkpoints and reads back scanned.
  untied = split_lib.with_layout(untied_split(plain.prefill_module()), True)
  hf.save_hf_split(untied, str(tmp_path / "split"))
  back = hf.load_hf_split(str(tmp_path / "split"), scan_layers=True)
  assert_same(back.prefill, untied.prefill)
  assert_same(back.decode, untied.decode)


def test_checkpoints_of_a_scanned_run_and_across_layouts(tmp_path):
  plain, scanned = models()
  cfg = TrainConfig(steps=2, trainability="both", optimizer=OptimizerConfig(1e-2))
  batch = next(_task_batches(1))
  trainers = {}
  for name, model in (("plain", plain), ("scanned", scanned)):
    trainers[name] = Trainer(jaxsun.SplitModel.from_model(model), cfg)
    trainers[name].train_step(batch)
  ts = trainers["scanned"]
  with ckpt_lib.Checkpointer(tmp_path / "scanned", async_save=False) as ck:
    ts.save(ck)
  # Same layout: a fresh scanned trainer resumes bitwise.
  fresh = Trainer(jaxsun.SplitModel.from_model(scanned), cfg)
  with ckpt_lib.Checkpointer(tmp_path / "scanned") as ck:
    fresh.restore(ck)
  assert_same(fresh.state, ts.state)
  # The other layout: restore the scanned checkpoint into an unrolled run.
  tp = Trainer(jaxsun.SplitModel.from_model(plain), cfg)
  assert ckpt_lib.scan_layout(tp.state) is False
  with ckpt_lib.Checkpointer(tmp_path / "scanned") as ck:
    tp.restore(ck, saved_scan_layers=True)
  assert_same(tp.state, ckpt_lib.convert_layout(ts.state, False))
  # ... which is what the unrolled run itself computed (params and Adam moments).
  assert_same(tp.state, trainers["plain"].state, rtol=1e-4, atol=1e-6)
  tp.train_step(batch)  # and training goes on from it


@functools.lru_cache(maxsize=None)
def _untied_splits():
  """(unrolled, scanned) untied PrefillShare-style splits (the decode tree picks the
  first token), and greedy generations of the unrolled one."""
  split = untied_split(models()[0], last_prompt_token="decode")
  prompts = random_tokens(8, (3, 9), CFG.vocab_size)
  lengths = jnp.array([9, 4, 1], jnp.int32)
  want = jaxsun.generate(split, prompts, lengths, max_new_tokens=8)
  return split, split_lib.with_layout(split, True), prompts, lengths, want


def test_generation_with_a_scanned_model():
  split, scanned, prompts, lengths, want = _untied_splits()
  got = jaxsun.generate(scanned, prompts, lengths, max_new_tokens=8)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  # Teacher-forced training through the split agrees too (prefill + decode trees).
  loss = jax.jit(split_lib.next_token_loss)
  np.testing.assert_allclose(float(loss(scanned, prompts, lengths)),
                             float(loss(split, prompts, lengths)), rtol=1e-5)


def test_serving_engine_with_a_scanned_model():
  from jaxsun.serving.engine import Engine, Params  # pylint: disable=g-import-not-at-top
  from jaxsun.serving.request import SamplingParams  # pylint: disable=g-import-not-at-top
  _, scanned, prompts, _, want = _untied_splits()
  eng = Engine(SCFG, slots=1, capacity=32, chunk=8)
  ds = eng.init_decode_state()
  sp = SamplingParams(max_tokens=6)
  prompt = tuple(int(t) for t in np.asarray(prompts[0]))  # all 9 tokens are prompt
  pre = Params.prefill_of(scanned)
  prefix, first = eng.prefill(pre, prompt, model="m", sampling=sp)
  ds = eng.insert(prefix, ds, 0, sampling=sp, valid_producers={pre.tree_id})
  tokens = [] if first is None else [first]
  for _ in range(3):
    ds, chunk = eng.generate(Params.decode_of(scanned), ds, max_live_length=len(prompt) + 6)
    tokens += [int(x) for x in np.asarray(chunk.tokens)[0] if x >= 0]
    if not bool(np.asarray(ds.active).any()):
      break
  assert tokens == [int(t) for t in np.asarray(want.tokens[0, :6])]
