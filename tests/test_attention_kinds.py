"""The attention kinds (softmax, off-by-one, sink, gated, affine, affine+gated): each
equals an independent float64 formula, the fused path equals the naive one in train,
prefill and decode modes and through the prefill/decode split, padded batches included;
the limits, alpha_ma's update rule, gradients and config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.config import AffineConfig
from jaxsun.generation import SamplingConfig
from jaxsun.nn import attention as attention_lib
from tests.helpers import perturbed, random_tokens, rel_err, untied_split

KINDS = ("softmax", "off_by_one", "sink", "gated", "affine", "affine_gated")
TOL = 1e-5


def _models(cfg, seed=3, impl="xla"):
  """(fused, naive) decoders with the same random state (alpha_ma and sinks included).

  The fused one runs XLA's `dot_product_attention` (what GPUs fall back to; "auto" picks
  grouped einsums on a CPU, tested below). W_alpha is scaled up so alpha spans the clip
  range instead of sitting at 0.5.
  """
  graphdef, state = nnx.split(jaxsun.Decoder(cfg.replace(attention_impl=impl),
                                             rngs=nnx.Rngs(0)))
  state = perturbed(state, seed)
  if cfg.attention.startswith("affine"):
    for i in range(cfg.n_layers):
      kernel = state["layers"][i]["attn"]["alpha_proj"]["kernel"]
      kernel[...] = 40.0 * kernel[...]
  fused = nnx.merge(graphdef, state)
  naive_gd = nnx.split(jaxsun.Decoder(cfg.replace(attention_impl="naive"),
                                      rngs=nnx.Rngs(0)))[0]
  return fused, nnx.merge(naive_gd, state)


def _apply(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def train(state, tokens, segment_ids=None):
    return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)[0]

  @jax.jit
  def cached(state, tokens, cache, new_lengths=None):
    mode = "decode" if tokens.shape[1] == 1 else "prefill"
    return nnx.merge(graphdef, state)(tokens, mode=mode, cache=cache,
                                      new_lengths=new_lengths)

  return (lambda *a, **k: train(state, *a, **k)), (lambda *a, **k: cached(state, *a, **k))


@pytest.fixture(scope="module", params=KINDS)
def kind_models(request):
  cfg = jaxsun.ModelConfig.preset("tiny", init_std=0.25, attention=request.param)
  fused, naive = _models(cfg)
  return cfg, fused, naive, _apply(fused), _apply(naive)


# -- an independent float64 formula of each kind's weights --------------------------------


def _reference_weights(kind, q, k, mask, x, attn, max_len):
  """float64 numpy weights [B, H, T, S] from q [B, T, H, hd], k [B, S, H, hd] (k
  repeated per query head), mask [B, T, S], the block input x and the layer's params."""
  q, k, x = (np.asarray(a, np.float64) for a in (q, k, x))
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  m = mask[:, None]
  e = np.where(m, np.exp(scores - np.where(m, scores, -np.inf).max(-1, keepdims=True)), 0)
  p = e / e.sum(-1, keepdims=True)
  if kind in ("off_by_one", "sink"):
    s = np.zeros(q.shape[2]) if kind == "off_by_one" else np.asarray(attn.sink[...],
                                                                       np.float64)
    ex = np.where(m, np.exp(scores), 0.0)
    return ex / (ex.sum(-1, keepdims=True) + np.exp(s)[None, :, None, None])
  if kind in ("affine", "affine_gated"):
    w_alpha = np.asarray(attn.alpha_proj.kernel[...], np.float64)
    alpha = np.clip(0.1 * (x @ w_alpha) + 0.5, 0.0, 1.0).transpose(0, 2, 1)[..., None]
    alpha_ma = np.asarray(attn.alpha_ma[...], np.float64)[None, :, None, None]
    beta = (alpha_ma - alpha) / max_len  # AffineConfig.n = "full"
    return alpha * p + beta * m
  return p


def test_weights_equal_an_independent_float64_formula(kind_models):
  cfg, fused, _, _, _ = kind_models
  attn = fused.layers[0].attn
  x = jax.random.normal(jax.random.key(0), (2, 9, cfg.d_model))
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  q, k, _ = attn._qkv(x, positions, None)
  b, t, hkv, g, hd = q.shape
  q = q.reshape(b, t, hkv * g, hd)
  k = jnp.repeat(k, g, axis=2)
  mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
  want = _reference_weights(cfg.attention, q, k, mask, x, attn, cfg.max_len)
  got = attn.attention_weights(x)
  assert got.shape == (b, cfg.n_heads, t, t)
  assert rel_err(got, want) <= TOL
  # Control: the comparison sees a wrong mask.
  assert rel_err(got, _reference_weights(cfg.attention, q, k, np.ones_like(mask), x, attn,
                                         cfg.max_len)) > 1e-3


# -- fused == naive in every mode ---------------------------------------------------------


def test_fused_equals_naive_in_train_mode_with_and_without_segments(kind_models):
  cfg, _, _, (train_f, _), (train_n, _) = kind_models
  tokens = random_tokens(1, (3, 24), cfg.vocab_size)
  assert rel_err(train_f(tokens), train_n(tokens)) <= TOL
  segments = jnp.array([[0] * 10 + [1] * 14, [0] * 24, [0] * 3 + [1] * 5 + [2] * 16])
  out_f = train_f(tokens, segment_ids=segments)
  assert rel_err(out_f, train_n(tokens, segment_ids=segments)) <= TOL
  # Row 0's first segment sees nothing after it: equal to its 10 tokens run alone.
  alone = train_f(tokens[:1, :10])
  assert rel_err(out_f[:1, :10], alone) <= TOL


def test_fused_and_naive_prefill_then_decode_equal_train_mode_on_padded_batches(
    kind_models):
  cfg, fused, naive, (train_f, cached_f), (_, cached_n) = kind_models
  tokens = random_tokens(2, (3, 20), cfg.vocab_size)
  lengths = jnp.array([4, 11, 1], jnp.int32)  # prompts of mixed lengths, padded to 11
  full = train_f(tokens)
  caches = [fused.init_cache(3, 24), naive.init_cache(3, 24)]
  outs = []
  for cached, cache in zip((cached_f, cached_n), caches):
    prompt_logits, cache = cached(tokens[:, :11], cache, lengths)
    steps = []
    for i in range(20 - 11):
      pos = lengths + i
      step, cache = cached(jnp.take_along_axis(tokens, pos[:, None], 1), cache)
      steps.append(step[:, 0])
    outs.append((prompt_logits, jnp.stack(steps, 1), cache))
  (pf, sf, cache_f), (pn, sn, _) = outs
  for row, n in enumerate(np.asarray(lengths)):  # valid prompt positions only
    assert rel_err(pf[row, :n], full[row, :n]) <= TOL
    assert rel_err(pn[row, :n], full[row, :n]) <= TOL
  pos = np.asarray(lengths)[:, None] + np.arange(20 - 11)
  want = full[np.arange(3)[:, None], pos]
  assert rel_err(sf, want) <= TOL and rel_err(sn, want) <= TOL
  if cfg.attention.startswith("affine"):  # the running sum is the sum of the cached V
    layer = cache_f.layers[1]
    valid = jnp.arange(24)[None, :, None, None] < cache_f.lengths[:, None, None, None]
    assert rel_err(layer.state["v_sum"], jnp.sum(jnp.where(valid, layer.v, 0), 1)) <= TOL


def test_split_forward_equals_prefill_then_decode_steps(kind_models):
  cfg, fused, naive, _, _ = kind_models
  tokens = random_tokens(4, (3, 16), cfg.vocab_size)
  boundary = jnp.array([2, 7, 11], jnp.int32)
  for model in (fused, naive):
    split = untied_split(model)
    expected = jax.jit(jaxsun.split_forward)(split, tokens, boundary)
    cache = split.prefill_module().init_cache(3, 16)
    _, cache = jaxsun.prefill(split, tokens[:, :11], boundary, cache)
    for i in range(16 - 11):
      pos = boundary + i
      tok = jnp.take_along_axis(tokens, pos[:, None], 1)[:, 0]
      _, logits, cache = jaxsun.decode_step(split, tok, cache, None, SamplingConfig())
      assert rel_err(logits, expected[jnp.arange(3), pos]) <= TOL


def test_gradients_of_fused_equal_naive_and_reach_the_variant_parameters(kind_models):
  cfg, fused, naive, _, _ = kind_models
  tokens = random_tokens(5, (2, 16), cfg.vocab_size)

  def grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      logits = nnx.merge(graphdef, params, rest)(tokens)[0]
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

    return jax.jit(jax.grad(loss))(params)

  gf, gn = grads(fused), grads(naive)
  for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gn)):
    assert rel_err(a, b) <= 1e-4
  attn = gf["layers"][0]["attn"]
  if cfg.attention == "sink":
    assert float(jnp.max(jnp.abs(attn["sink"][...]))) > 0
  if cfg.attention.startswith("affine"):
    assert float(jnp.max(jnp.abs(attn["alpha_proj"]["kernel"][...]))) > 0
  if cfg.attention.endswith("gated"):
    assert float(jnp.max(jnp.abs(attn["gate"]["gate_proj"]["kernel"][...]))) > 0


# -- limits ---------------------------------------------------------------------------------


def _with_state(cfg, state):
  return nnx.merge(nnx.split(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))[0], state)


def test_sink_and_off_by_one_reduce_to_softmax_in_their_limits():
  cfg = jaxsun.ModelConfig.preset("tiny", init_std=0.25, attention="sink")
  tokens = random_tokens(6, (2, 16), cfg.vocab_size)
  graphdef, state = nnx.split(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  softmax_state = jax.tree.map(lambda x: x, state)
  for i in range(cfg.n_layers):
    del softmax_state["layers"][i]["attn"]["sink"]
  softmax = _with_state(cfg.replace(attention="softmax"), softmax_state)(tokens)[0]
  for i in range(cfg.n_layers):
    state["layers"][i]["attn"]["sink"][...] = jnp.full((cfg.n_heads,), -40.0)
  sink_far = nnx.merge(graphdef, state)(tokens)[0]
  assert rel_err(sink_far, softmax) <= TOL  # s -> -inf: softmax
  for i in range(cfg.n_layers):
    state["layers"][i]["attn"]["sink"][...] = jnp.zeros((cfg.n_heads,))
  sink_zero = nnx.merge(graphdef, state)(tokens)[0]
  off_by_one = _with_state(cfg.replace(attention="off_by_one"), softmax_state)(tokens)[0]
  assert rel_err(sink_zero, off_by_one) <= TOL  # s = 0 is off-by-one
  assert rel_err(off_by_one, softmax) > 1e-3  # control: the sink does change the output
  # Off-by-one's own limit: scores shifted by +c -> softmax (the "+1" vanishes).
  q = jax.random.normal(jax.random.key(1), (1, 5, 2, 2, 8))
  k = jax.random.normal(jax.random.key(2), (1, 5, 2, 8))
  mask = jnp.tril(jnp.ones((5, 5), bool))[None]
  big = jnp.concatenate([k, jnp.ones_like(k[..., :1])], -1)
  shift = jnp.concatenate([q, jnp.full(q.shape[:-1] + (1,), 60.0 * 3.0)], -1)  # + c
  one = attention_lib.sink_probs(shift, big, mask, jnp.zeros((2, 2)))
  soft = attention_lib.softmax_probs(shift, big, mask)
  assert rel_err(one, soft) <= TOL


def test_affine_with_alpha_equal_to_alpha_ma_is_alpha_times_softmax():
  cfg = jaxsun.ModelConfig.preset("tiny", init_std=0.25, attention="affine",
                                  affine=AffineConfig(w_init="zeros", alpha_ma_init=0.5))
  model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))  # alpha = phi(0) = 0.5 = alpha_ma: beta = 0
  tokens = random_tokens(7, (2, 16), cfg.vocab_size)
  state = nnx.state(model)
  softmax_state = jax.tree.map(lambda x: x, state)
  for i in range(cfg.n_layers):
    attn = softmax_state["layers"][i]["attn"]
    del attn["alpha_proj"], attn["alpha_ma"]
    attn["o_proj"]["kernel"][...] = 0.5 * attn["o_proj"]["kernel"][...]  # 0.5 * softmax
  softmax = _with_state(cfg.replace(attention="softmax"), softmax_state)
  for impl in ("auto", "naive"):
    affine = _with_state(cfg.replace(attention_impl=impl), state)
    assert rel_err(affine(tokens)[0], softmax(tokens)[0]) <= TOL
  x = jax.random.normal(jax.random.key(3), (1, 6, cfg.d_model))
  w = model.layers[0].attn.attention_weights(x)
  assert np.allclose(np.asarray(w).sum(-1), 0.5, atol=1e-6)  # rows sum to alpha = 0.5


def test_affine_visible_n_makes_every_row_sum_to_alpha_ma():
  cfg = jaxsun.ModelConfig.preset("tiny", init_std=0.25, attention="affine",
                                  affine=AffineConfig(n="visible", alpha_ma_init=0.3))
  fused, naive = _models(cfg)
  x = jax.random.normal(jax.random.key(4), (2, 7, cfg.d_model))
  attn = fused.layers[1].attn
  w = np.asarray(attn.attention_weights(x))
  alpha_ma = np.asarray(attn.alpha_ma[...])[None, :, None]
  assert np.allclose(w.sum(-1), np.broadcast_to(alpha_ma, w.shape[:3]), atol=1e-5)
  tokens = random_tokens(8, (2, 16), cfg.vocab_size)
  assert rel_err(fused(tokens)[0], naive(tokens)[0]) <= TOL
  # "full" N: the per-query mass alpha + beta (t + 1) varies with t (paper's Fig. 3).
  full = jaxsun.Decoder(cfg.replace(affine=AffineConfig()), rngs=nnx.Rngs(0))
  mass = np.asarray(full.layers[0].attn.attention_weights(x)).sum(-1)
  assert np.ptp(mass[0, 0]) > 1e-3


# -- alpha_ma: trained state ----------------------------------------------------------------


def _batches(cfg, n, seed=0, batch=4, seq=16):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    yield {"tokens": rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32),
           "boundary": np.ones((batch,), np.int32),
           "loss_mask": np.ones((batch, seq), np.float32)}


def _alpha_mean(model, tokens):
  """The batch-mean alpha of every layer, computed outside the model: f32[L, H]."""
  x = model.embed(tokens)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  out = []
  for blk in model.layers:
    h = blk.attn_norm(x)
    out.append(jnp.mean(attention_lib.linear_clip(h @ blk.attn.alpha_proj.kernel[...]),
                        axis=(0, 1)))
    x, _ = blk(x, positions)
  return jnp.stack(out)


def test_alpha_ma_changes_only_in_training_and_is_restored_from_checkpoints(tmp_path):
  from jaxsun.train import Checkpointer, Trainer, TrainConfig  # pylint: disable=import-outside-toplevel
  cfg = jaxsun.ModelConfig.preset("tiny", attention="affine",
                                  affine=AffineConfig(alpha_ma_init=0.2))
  model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
  split = jaxsun.SplitModel.from_model(model)
  batch = next(_batches(cfg, 1))
  tokens = jnp.asarray(batch["tokens"])
  before = np.asarray(jnp.stack([b.attn.alpha_ma[...] for b in model.layers]))
  # Inference never moves it: forward, evaluation, generation.
  jaxsun.split_forward(split, tokens, jnp.ones((4,), jnp.int32))
  trainer = Trainer(split, TrainConfig(steps=3, trainability="both"))
  trainer.evaluate(_batches(cfg, 2))
  jaxsun.generate(split, tokens[:, :4], max_new_tokens=3)
  def alpha_ma(tr):
    return np.asarray(jnp.stack([b.attn.alpha_ma[...] for b in tr.split.prefill_module().layers]))
  np.testing.assert_array_equal(alpha_ma(trainer), before)
  # One training step: alpha_ma <- rho alpha_ma + (1 - rho) mean(alpha) (pre-step params).
  want = 0.9 * before + 0.1 * np.asarray(_alpha_mean(model, tokens))
  trainer.train_step(batch)
  np.testing.assert_allclose(alpha_ma(trainer), want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(alpha_ma(trainer), before)  # control
  # Accumulation over 2 equal micro-batches gives the same update.
  acc = Trainer(jaxsun.SplitModel.from_model(model),
                       TrainConfig(steps=3, trainability="both", accum_steps=2))
  acc.train_step(batch)
  np.testing.assert_allclose(alpha_ma(acc), want, rtol=1e-5, atol=1e-6)
  # Checkpoints: saved and restored with the parameters.
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    trainer.save(ckpt)
    ckpt.wait_until_finished()
    saved = alpha_ma(trainer)
    trainer.train_step(next(_batches(cfg, 1, seed=1)))
    assert not np.allclose(alpha_ma(trainer), saved)
    trainer.restore(ckpt)
  np.testing.assert_array_equal(alpha_ma(trainer), saved)


def test_num_params_counts_each_kinds_extra_parameters():
  for kind in KINDS:
    cfg = jaxsun.ModelConfig.preset("tiny", attention=kind)
    params = nnx.state(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params(), kind
  cfg = jaxsun.ModelConfig.preset("llama-3.2-1b", attention="affine")
  assert cfg.attention_params() * cfg.n_layers == 2048 * 32 * 16  # the paper's +1.0M
  cfg = cfg.replace(attention="gated")
  assert cfg.attention_params() * cfg.n_layers == 2048 * 2048 * 16  # the paper's +67.1M


@pytest.mark.parametrize("field,value,match", [
    ("attention_impl", "flash", "ModelConfig.attention_impl"),
    ("attention", "affinee", "ModelConfig.attention"),
    ("affine", {"n": "full"}, "ModelConfig.affine"),
])
def test_model_config_errors_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    jaxsun.ModelConfig.preset("tiny", **{field: value})


@pytest.mark.parametrize("field,value", [("n", "keys"), ("alpha_ma", "token"),
                                         ("rho", 1.0), ("w_init", "ones"),
                                         ("phi", "tanh"), ("alpha_ma_init", "0")])
def test_affine_config_errors_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"AffineConfig.{field}"):
    AffineConfig(**{field: value})


def test_decoder_attention_weights_match_the_forward_in_both_layouts():
  """Decoder.attention_weights(tokens) @ V reproduces each layer's attention output."""
  from jaxsun.nn.decoder import stack_layers  # pylint: disable=import-outside-toplevel
  cfg = jaxsun.ModelConfig.preset("tiny", init_std=0.25, attention="affine")
  model, _ = _models(cfg)
  tokens = random_tokens(9, (2, 12), cfg.vocab_size)
  maps = model.attention_weights(tokens)
  assert maps.shape == (cfg.n_layers, 2, cfg.n_heads, 12, 12)
  np.testing.assert_allclose(np.asarray(stack_layers(model).attention_weights(tokens)),
                             np.asarray(maps), rtol=1e-5, atol=1e-6)
  # Layer 0 by hand: weights @ V (through o_proj) equals the block's attention output.
  blk = model.layers[0]
  x = blk.attn_norm(model.embed(tokens))
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  _, _, v = blk.attn._qkv(x, positions, None)
  v = jnp.repeat(v, cfg.n_heads // cfg.n_kv_heads, axis=2)  # [B, S, H, hd]
  out = jnp.einsum("bhts,bshd->bthd", maps[0], v).reshape(2, 12, -1)
  want = blk.attn(x, positions)[0]
  assert rel_err(blk.attn.o_proj(out), want) <= TOL


@pytest.mark.parametrize("kind", ["sink", "affine_gated"])
def test_cpu_einsum_path_equals_naive_in_train_and_decode(kind):
  """On a CPU "auto" runs the fused path's rewrites around grouped einsums."""
  assert attention_lib.resolve_impl("auto", jnp.float32, 16, "causal") == "einsum"
  cfg = jaxsun.ModelConfig.preset("tiny", init_std=0.25, attention=kind)
  fused, naive = _models(cfg, impl="auto")
  tokens = random_tokens(10, (2, 12), cfg.vocab_size)
  assert rel_err(fused(tokens)[0], naive(tokens)[0]) <= TOL
  outs = []
  for model in (fused, naive):
    cache = model.init_cache(2, 16)
    _, cache = model(tokens[:, :8], mode="prefill", cache=cache)
    outs.append(model(tokens[:, 8:9], mode="decode", cache=cache)[0])
  assert rel_err(outs[0], outs[1]) <= TOL


def test_every_kind_in_bfloat16_compute_stays_close_to_float32():
  """bf16 matmuls, float32 softmax statistics and logits, on the fused path."""
  for kind in KINDS:
    cfg = jaxsun.ModelConfig.preset("tiny", init_std=0.25, attention=kind)
    fused = jaxsun.Decoder(cfg.replace(attention_impl="xla"), rngs=nnx.Rngs(0))
    bf16 = jaxsun.Decoder(cfg.replace(attention_impl="xla", compute_dtype="bfloat16"),
                          rngs=nnx.Rngs(0))
    tokens = random_tokens(11, (2, 16), cfg.vocab_size)
    out = bf16(tokens)[0]
    assert out.dtype == jnp.float32, kind
    assert 1e-4 < rel_err(out, fused(tokens)[0]) < 5e-2, kind  # bf16 ran, and is close
