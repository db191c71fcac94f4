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
  np.testing.assert_allclose(np.asarray(mg.mask(big, fmt, scale=True)), [1000, 500, 250],
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
])
def test_bad_configs_name_the_field(kw, match):
  with pytest.raises(ValueError, match=match):
    mg.MaskedGemm.parse(**kw)


def test_shape_errors():
  x, w = _xw()
  with pytest.raises(ValueError, match="masked_dot needs"):
    mg.masked_dot(x, w.T, mg.MaskedGemm())
