"""Fp8Linear: delayed scaling (E4M3 forward, E5M2 gradients), current scaling, the
decoder by config, and the trainer's overwrite-with-gradient handling of its state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.nn import fp8_linear as fl
from jaxsun.quant import fp8
from jaxsun.train import OptimizerConfig, TrainConfig, Trainer
from pallas_kernels.fp8_matmul import fp8_matmul_reference


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _xw(seed=0, m=64, k=128, n=96):
  kx, kw = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (m, k)) * 3.0, jax.random.normal(kw, (k, n)) * 0.02


def _metas(x_amax, w_amax, g_amax, h=4):
  out = []
  for a, fmt in ((x_amax, "e4m3"), (w_amax, "e4m3"), (g_amax, "e5m2")):
    st = fp8.DelayedScaling.create(h).update(jnp.float32(a), fmt)
    out += [st.history, st.scale]
  return out


def test_delayed_forward_backward_and_state_cotangents():
  x, w = _xw()
  g = jax.random.normal(jax.random.key(5), (64, 96))
  metas = _metas(jnp.max(jnp.abs(x)), jnp.max(jnp.abs(w)), jnp.max(jnp.abs(x @ w)))
  y, vjp = jax.vjp(lambda x, w, *m: fl.fp8_dot_delayed(x, w, *m), x, w, *metas)
  # Forward: E4M3 operands with the stored (delayed) scales, float32 accumulation.
  qx = fl._q(x, metas[1], fp8.FP8_FORMATS["e4m3"])
  qw = fl._q(w, metas[3], fp8.FP8_FORMATS["e4m3"])
  want = fp8_matmul_reference(qx, metas[1].reshape(1, 1), qw, metas[3].reshape(1, 1))
  assert _rel(y, want) < 1e-6 and _rel(y, x @ w) < 0.06
  dx, dw, *new = vjp(g)
  assert _rel(dx, g @ w.T) < 0.15 and _rel(dw, x.T @ g) < 0.15  # E5M2 gradients
  # The state's cotangents are its next values: this step's amax pushed into the history.
  for (hist, scale), (a, fmt) in zip(zip(new[::2], new[1::2]),
                                     ((jnp.max(jnp.abs(x)), "e4m3"),
                                      (jnp.max(jnp.abs(w)), "e4m3"),
                                      (jnp.max(jnp.abs(g)), "e5m2"))):
    assert float(hist[0]) == pytest.approx(float(a))
    assert float(scale) == pytest.approx(float(jnp.max(hist)) / fp8.FP8_FORMATS[fmt].max)


def test_current_scaling_forward():
  x, w = _xw(1)
  layer = fl.Fp8Linear(128, 96, ("embed", "mlp"), std=0.02, param_dtype=jnp.float32,
                       dtype=jnp.float32, rngs=nnx.Rngs(0), mode="current")
  layer.kernel[...] = w
  qx, sx = fp8.quantize(x, "e4m3", block=(1, 128))
  qw, sw = fp8.quantize(w, "e4m3", block=(128, 1))
  y = layer(x)
  assert _rel(y, fp8_matmul_reference(qx, sx, qw, sw)) < 1e-6
  assert _rel(y, x @ w) < 0.06
  with pytest.raises(ValueError, match="mode='e4m3'"):
    fl.Fp8Linear(4, 4, ("embed", "mlp"), std=0.02, param_dtype=jnp.float32,
                 dtype=jnp.float32, rngs=nnx.Rngs(0), mode="e4m3")


@pytest.mark.parametrize("mode", ["delayed", "current"])
def test_decoder_by_config_prefill_and_decode_agree(mode):
  cfg = jaxsun.ModelConfig.preset("tiny", fp8=mode, init_std=0.1)
  model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
  assert isinstance(model.layers[0].attn.q_proj, fl.Fp8Linear)
  assert isinstance(model.layers[1].mlp.down_proj, fl.Fp8Linear)
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
  full = jax.jit(lambda t: model(t)[0])(tokens)
  split = jaxsun.SplitModel.from_model(model)
  logits, cache = jaxsun.prefill(split, tokens[:, :8], jnp.array([8, 8]),
                                 model.init_cache(2, 12))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, 7]), rtol=2e-4,
                             atol=2e-4)
  with pytest.raises(ValueError, match="ModelConfig.fp8"):
    jaxsun.ModelConfig.preset("tiny", fp8="e4m3")


def _batches(vocab):
  rng = np.random.default_rng(0)
  while True:
    t = rng.integers(0, vocab, (8, 24)).astype(np.int32)
    yield {"tokens": t, "boundary": np.ones(8, np.int32),
           "loss_mask": np.ones((8, 24), np.float32)}


def test_trainer_overwrites_fp8_state_and_combines_microbatches_with_max():
  cfg = jaxsun.ModelConfig.preset("tiny", fp8="delayed")
  split = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  batch = next(_batches(cfg.vocab_size))
  after = {}
  for accum in (1, 2):
    tr = Trainer(split, TrainConfig(steps=2, accum_steps=accum,
                                    optimizer=OptimizerConfig(1e-3, schedule="constant")))
    tr.train_step(batch)
    up = tr.split.prefill_module().layers[0].mlp.up_proj
    after[accum] = {k: np.asarray(getattr(up, k)[...]) for k in
                    ("x_history", "x_scale", "w_history", "g_history")}
  # One step wrote one history entry (not an Adam update of it) ...
  assert after[1]["x_history"][0] > 0 and np.all(after[1]["x_history"][1:] == 0)
  assert after[1]["x_scale"] == pytest.approx(after[1]["x_history"][0] / 448, rel=1e-6)
  # ... and the amax of two micro-batches is their max (= the whole batch's), not the sum.
  np.testing.assert_allclose(after[2]["x_history"], after[1]["x_history"], rtol=1e-6)
  np.testing.assert_allclose(after[2]["w_history"], after[1]["w_history"], rtol=1e-6)
  # The step differentiates the loss *sum* (normalised once at the end), so each token's
  # output gradient is the same in a micro-batch as in the whole batch: equal amax too.
  assert after[2]["g_history"][0] > 0
  np.testing.assert_allclose(after[2]["g_history"], after[1]["g_history"], rtol=1e-5)


def test_fp8_training_tracks_float32_training():
  losses = {}
  for mode in ("none", "delayed"):
    cfg = jaxsun.ModelConfig.preset("tiny", fp8=mode)
    split = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
    tr = Trainer(split, TrainConfig(steps=12, optimizer=OptimizerConfig(3e-3,
                                                                        warmup_steps=2)))
    losses[mode] = [h["loss"] for h in tr.fit(_batches(cfg.vocab_size), progress=False)]
  assert losses["delayed"][-1] < losses["delayed"][0]
  np.testing.assert_allclose(losses["delayed"], losses["none"], rtol=0.02)
