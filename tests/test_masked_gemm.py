"""Masked GEMMs (jaxsun.quant.masked_gemm): ExMy operands forward and backward."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.quant import float_sim, masked_gemm as mg


def _xw(m=6, k=32, n=5, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  return 3.0 * jax.random.normal(kx, (m, k)), 0.5 * jax.random.normal(kw, (k, n))


def test_forward_and_both_backward_gemms_use_their_formats():
  x, w = _xw()
  cfg = mg.MaskedGemm.parse("e4m7", weight="e5m2", grad="e8m3")
  y, vjp = jax.vjp(lambda a, b: mg.masked_dot(a, b, cfg), x, w)
  g = jax.random.normal(jax.random.key(7), y.shape)
  dx, dw = vjp(g)
  sim = float_sim.simulate
  A, W, G = (np.asarray(sim(v, f), np.float64) for v, f in
             ((x, cfg.activation), (w, cfg.weight), (g, cfg.grad)))
  np.testing.assert_allclose(np.asarray(y), A @ W, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), G @ W.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), A.T @ G, rtol=1e-5, atol=1e-5)
  # Control: the unmasked gradient differs from the masked one.
  assert not np.allclose(np.asarray(dw), np.asarray(x, np.float64).T @ np.asarray(g),
                         rtol=1e-3)


def test_bf16_nearest_equals_reduce_precision_and_ml_dtypes_bit_for_bit():
  x = jax.random.normal(jax.random.key(1), (4096,)) * jnp.exp(
      jax.random.uniform(jax.random.key(2), (4096,), minval=-20, maxval=20))
  got = np.asarray(mg.mask(x, mg.parse_format("e8m7")))
  want_rp = np.asarray(jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7))
  want_ml = np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(got.view(np.uint32), want_rp.view(np.uint32))
  np.testing.assert_array_equal(got.view(np.uint32), want_ml.view(np.uint32))
  # E4M3 (OCP, max 448) equals float8_e4m3fn on in-range values.
  small = np.asarray(x)[np.abs(np.asarray(x)) < 440]
  np.testing.assert_array_equal(
      np.asarray(mg.mask(jnp.asarray(small), mg.parse_format("e4m3"))),
      small.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_truncation_and_nearest_differ_where_they_should():
  fmt = mg.parse_format("e8m3")
  v = jnp.asarray([1.078, 1.1, 1.2, -1.078, 1.0625])
  near = np.asarray(mg.mask(v, fmt, rounding="nearest"))
  trunc = np.asarray(mg.mask(v, fmt, rounding="truncate"))
  assert near[0] == 1.125 and trunc[0] == 1.0  # the example, 3 mantissa bits
  assert near[3] == -1.125 and trunc[3] == -1.0  # truncation is toward zero
  assert near[4] == 1.0 and trunc[4] == 1.0  # a tie rounds to even
  assert (np.abs(trunc) <= np.abs(np.asarray(v))).all()


def test_exponent_masking_clamps_and_clips_before_the_cast():
  fmt = mg.parse_format("e4m3")  # max 448
  v = jnp.asarray([500.0, -1e6, 3e-3, 5e-4])
  out = np.asarray(mg.mask(v, fmt))
  assert out[0] == 448.0 and out[1] == -448.0  # no NaN (a raw float8 cast of 500 is)
  assert np.isnan(np.float32(np.float32(500.0).astype(ml_dtypes.float8_e4m3fn)))
  # E4M3's subnormal spacing is 2^-9: 3e-3 rounds to 2 * 2^-9, 5e-4 (< 2^-10) to 0.
  assert out[2] == 2.0 ** -8 and out[3] == 0.0
  # Per-tensor scaling keeps the shape of a large tensor instead of clamping it.
  big = jnp.asarray([1000.0, 500.0, 250.0])
  np.testing.assert_allclose(np.asarray(mg.mask(big, fmt, scale="current")), [1000, 500, 250],
                             rtol=0.07)


def test_identity_config_is_exact_float32():
  x, w = _xw(seed=3)
  cfg = mg.MaskedGemm()
  y, vjp = jax.vjp(lambda a, b: mg.masked_dot(a, b, cfg), x, w)
  ref, vjp_ref = jax.vjp(lambda a, b: jnp.dot(a, b, precision="highest"), x, w)
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6)
  for a, b in zip(vjp(jnp.ones_like(y)), vjp_ref(jnp.ones_like(y))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_apply_swaps_projections_and_the_trainer_trains_them():
  """Masked models train through the one Trainer; fewer mantissa bits learn slower."""
  from jaxsun.train.optim import OptimizerConfig  # pylint: disable=g-import-not-at-top
  from jaxsun.train.trainer import TrainConfig, Trainer  # pylint: disable=g-import-not-at-top
  cfg_model = jaxsun.ModelConfig.preset("tiny", init_std=0.25)
  ident = mg.apply(jaxsun.Decoder(cfg_model, rngs=nnx.Rngs(0)), mg.MaskedGemm())
  assert not any(isinstance(m, mg.MaskedLinear) for _, m in nnx.iter_modules(ident))
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, cfg_model.vocab_size, (8, 24)).astype(np.int32),
           "boundary": np.ones(8, np.int32), "loss_mask": np.ones((8, 24), np.float32)}
  final = {}
  for name in ("fp32", "e4m3", "e8m1"):
    model = jaxsun.Decoder(cfg_model, rngs=nnx.Rngs(0))
    mg.apply(model, mg.MaskedGemm.parse(name, grad="e5m2" if name == "e4m3" else None))
    swapped = [n for n, m in nnx.iter_modules(model) if isinstance(m, mg.MaskedLinear)]
    assert len(swapped) == (0 if name == "fp32" else 7 * cfg_model.n_layers)  # qkvo+mlp
    trainer = Trainer(jaxsun.SplitModel.from_model(model),
                      TrainConfig(steps=20, optimizer=OptimizerConfig(learning_rate=3e-3)))
    losses = [trainer.train_step(batch)["loss"] for _ in range(20)]  # memorise one batch
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], (name, losses)
    final[name] = losses[-1]
  # One mantissa bit (E8M1) slows learning far beyond the noise of the float run;
  # E4M3 with E5M2 gradients stays close to float.
  assert final["e8m1"] > 3 * final["fp32"], final
  assert final["e4m3"] < final["e8m1"], final


@pytest.mark.parametrize("kw, match", [
    (dict(name="e9m3"), r"format='e9m3'.*exponent_bits"),
    (dict(name="int8"), r"format='int8' is not a format"),
    (dict(name="e8m3", grad="e8m30"), r"grad='e8m30'"),
    (dict(name="e8m3", rounding="stochastic"), r"MaskedGemm.rounding='stochastic'"),
    (dict(name="fp8", scale="dynamic"), r"MaskedGemm.scale='dynamic'"),
    (dict(name="fp8_delayed", history=0), r"MaskedGemm.history=0"),
    (dict(name="e8m3", attention="yes"), r"MaskedGemm.attention='yes'"),
])
def test_bad_configs_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    mg.MaskedGemm.parse(**kw)


def test_shape_errors():
  x, w = _xw()
  with pytest.raises(ValueError, match="masked_dot needs"):
    mg.masked_dot(x, w.T, mg.MaskedGemm())


def test_recipes_parse_to_their_formats_and_scalings():
  fp8 = mg.MaskedGemm.parse("fp8")
  assert (fp8.activation, fp8.weight, fp8.grad, fp8.scale) == (
      float_sim.E4M3, float_sim.E4M3, float_sim.E5M2, "current")
  assert fp8 == mg.MaskedGemm.parse("e4m3", grad="e5m2", scale="current")
  assert mg.MaskedGemm.parse("FP8_delayed").scale == "delayed"
  g2 = mg.MaskedGemm.parse("fp8_gaudi2")
  assert g2.activation.max == 240.0 and g2.grad.max == 57344.0
  assert g2.name == "E4M3g2/E4M3g2/E5M2-current" and fp8.name == "E4M3/E4M3/E5M2-current"
  # The Gaudi-2 range saturates at 240 where OCP E4M3 keeps 256..448 (control).
  v = jnp.asarray([300.0, 200.0])
  np.testing.assert_array_equal(np.asarray(mg.mask(v, g2.activation)), [240.0, 192.0])
  np.testing.assert_array_equal(np.asarray(mg.mask(v, fp8.activation)), [288.0, 192.0])


def test_delayed_scaling_uses_last_steps_amax_and_returns_the_next_state():
  """The forward pass scales with the state it is given; the 'gradient' of the state is
  its next value (amax prepended, scale = history max / format max)."""
  x, w = _xw(seed=5)
  cfg = mg.MaskedGemm.parse("fp8_delayed", history=4)
  e4, e5 = float_sim.E4M3, float_sim.E5M2
  hist = jnp.asarray([2.0, 7.0, 0.0, 0.0])
  meta = (hist, jnp.float32(7.0 / 448), jnp.asarray([0.5, 0.0, 0.0, 0.0]),
          jnp.float32(0.5 / 448), jnp.zeros(4), jnp.float32(1.0))
  y, vjp = jax.vjp(lambda a, b, m: mg.masked_dot_delayed(a, b, m, cfg), x, w, meta)
  g = 1e-3 * jax.random.normal(jax.random.key(9), y.shape)
  dx, dw, dmeta = vjp(g)
  sim = lambda v, f, s: np.asarray(
      float_sim.simulate(jnp.clip(v / s, -f.max, f.max), f), np.float64) * float(s)
  A, W, G = sim(x, e4, meta[1]), sim(w, e4, meta[3]), sim(g, e5, meta[5])
  np.testing.assert_allclose(np.asarray(y), A @ W, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), G @ W.T, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(np.asarray(dw), A.T @ G, rtol=1e-5, atol=1e-9)
  ax, aw, ag = (float(jnp.max(jnp.abs(v))) for v in (x, w, g))
  np.testing.assert_allclose(np.asarray(dmeta[0]), [ax, 2.0, 7.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(float(dmeta[1]), max(ax, 7.0) / 448, rtol=1e-6)
  np.testing.assert_allclose(float(dmeta[3]), max(aw, 0.5) / 448, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dmeta[4]), [ag, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(float(dmeta[5]), ag / e5.max, rtol=1e-6)
  # Control: unit scales (the state before any step) give a different forward pass.
  ones = meta[:1] + (jnp.float32(1.0),) + meta[2:3] + (jnp.float32(1.0),) + meta[4:]
  assert not np.allclose(np.asarray(mg.masked_dot_delayed(x, w, ones, cfg)), A @ W,
                         rtol=1e-4)


def test_delayed_recipe_trains_and_its_state_follows_the_trainer():
  from jaxsun.train.optim import OptimizerConfig  # pylint: disable=g-import-not-at-top
  from jaxsun.train.trainer import TrainConfig, Trainer  # pylint: disable=g-import-not-at-top
  cfg_model = jaxsun.ModelConfig.preset("tiny", init_std=0.25)
  model = mg.apply(jaxsun.Decoder(cfg_model, rngs=nnx.Rngs(0)),
                   mg.MaskedGemm.parse("fp8_delayed", history=3))
  rng = np.random.default_rng(1)
  batch = {"tokens": rng.integers(0, cfg_model.vocab_size, (4, 16)).astype(np.int32),
           "boundary": np.ones(4, np.int32), "loss_mask": np.ones((4, 16), np.float32)}
  trainer = Trainer(jaxsun.SplitModel.from_model(model),
                    TrainConfig(steps=12, optimizer=OptimizerConfig(learning_rate=3e-3)))
  n_params = trainer.num_trainable_params()
  losses = [trainer.train_step(batch)["loss"] for _ in range(12)]
  assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses
  trained = nnx.merge(trainer.split.graphdef, trainer.split.prefill)
  layer = [m for _, m in nnx.iter_modules(trained) if isinstance(m, mg.MaskedLinear)][0]
  hist, scale = np.asarray(layer.x_history[...]), np.asarray(layer.x_scale[...])
  assert (hist > 0).all() and np.isclose(scale.max(), (hist.max(-1) / 448).max(), rtol=1e-5)
  # The state is not counted or optimized as parameters: histories were overwritten.
  assert n_params == trainer.num_trainable_params()


def test_masked_einsum_masks_both_operands_and_the_output_gradient():
  cfg = mg.MaskedGemm.parse("e5m4", grad="e4m3", scale="none")
  a = jax.random.normal(jax.random.key(3), (2, 3, 8))
  b = jax.random.normal(jax.random.key(4), (2, 5, 8))
  y, vjp = jax.vjp(lambda u, v: mg.masked_einsum("btd,bsd->bts", u, v, cfg), a, b)
  g = jax.random.normal(jax.random.key(5), y.shape)
  da, db = vjp(g)
  sim = lambda v, f: np.asarray(float_sim.simulate(v, f), np.float64)
  A, B, G = sim(a, cfg.activation), sim(b, cfg.activation), sim(g, cfg.grad)
  np.testing.assert_allclose(np.asarray(y), np.einsum("btd,bsd->bts", A, B), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(da), np.einsum("bts,bsd->btd", G, B), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(db), np.einsum("bts,btd->bsd", G, A), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("kind", ["softmax", "sink", "affine"])
def test_attention_products_are_masked_when_asked(kind):
  """At float32 precision (E8M23) masking attention is the naive path exactly; at E4M3
  the logits move; without `attention` the attention modules are untouched."""
  cfg_model = jaxsun.ModelConfig.preset("tiny", attention=kind, init_std=0.25)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg_model.vocab_size)
  base = jaxsun.Decoder(cfg_model, rngs=nnx.Rngs(0))
  ref = base(tokens)[0]
  exact = mg.apply(jaxsun.Decoder(cfg_model, rngs=nnx.Rngs(0)),
                   mg.MaskedGemm.parse("e8m23", attention=True))
  gemms = [m.gemm for _, m in nnx.iter_modules(exact) if hasattr(m, "gemm")]
  assert gemms and all(g is not None for g in gemms)
  np.testing.assert_allclose(np.asarray(exact(tokens)[0]), np.asarray(ref), rtol=2e-4,
                             atol=2e-4)
  coarse_cfg = mg.MaskedGemm(activation=float_sim.E4M3, attention=True)
  only_attn = mg.apply(jaxsun.Decoder(cfg_model, rngs=nnx.Rngs(0)), coarse_cfg,
                       layers_regex=r"$^")  # no projection: attention products only
  diff = np.abs(np.asarray(only_attn(tokens)[0]) - np.asarray(ref)).max()
  assert diff > 1e-3, diff
  untouched = mg.apply(jaxsun.Decoder(cfg_model, rngs=nnx.Rngs(0)),
                       mg.MaskedGemm.parse("e4m3"))
  assert all(m.gemm is None for _, m in nnx.iter_modules(untouched) if hasattr(m, "gemm"))
  # Gradients flow through the masked products.
  grads = nnx.grad(lambda m: jnp.mean(m(tokens)[0] ** 2))(only_attn)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
