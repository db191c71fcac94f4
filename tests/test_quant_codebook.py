"""The codebook quantizer and CodebookLinear: error falls, beats RTN, plugs into a model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.quant import codebook as cq
from jaxsun.quant import layers as ql
from jaxsun.train.trainer import evaluate_loss
from pallas_kernels.psumbook_gemm import CodebookFormat, dequantize_reference

QUICK = cq.QuantizerConfig(kmeans_iterations=10, iterations=3, adam_steps=25)


def _layer(k=256, n=128, t=512, seed=0):
  kw, ka, kx = jax.random.split(jax.random.key(seed), 3)
  # Heavy-tailed weights and correlated inputs, as in real layers.
  w = 0.05 * jax.random.t(kw, 4.0, (k, n))
  mix = jnp.eye(k) + jax.random.normal(ka, (k, k)) / np.sqrt(k)
  x = jax.random.normal(kx, (t, k)) @ mix
  return w, x


@pytest.mark.parametrize("name", ["m1v4g128", "m2v8g128", "m1v4g32"])
def test_error_falls_over_iterations_and_beats_rtn(name):
  fmt = CodebookFormat.parse(name)
  w, x = _layer()
  q, history = cq.quantize_linear(w, x, fmt, QUICK)
  assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:])), history
  assert history[-1] < 0.8 * history[0], history
  h = cq.hessian(x)
  final = float(cq.output_error(w, dequantize_reference(q), h))
  assert final == pytest.approx(history[-1], rel=1e-5)
  # Scalar round-to-nearest at the same bits per weight (2 bits + a 16-bit scale per g).
  assert fmt.b * fmt.m / fmt.v == 2
  rtn = float(cq.output_error(w, cq.rtn_quantize(w, 2, fmt.g), h))
  assert final < 0.7 * rtn, (final, rtn)


def test_kmeans_codes_are_nearest_centroids():
  fmt = CodebookFormat(m=1, b=4, v=4, g=16)
  w, _ = _layer(k=64, n=32)
  q = cq.initialize(w, fmt, QUICK)
  scaled = np.asarray(w) / np.repeat(np.asarray(q.scales), fmt.g, axis=0)
  cb, codes = np.asarray(q.codebooks[0]), np.asarray(q.codes[0])
  for j, n in itertools.product(range(0, 64 // 4, 5), range(0, 32, 7)):
    chunk = scaled[j * 4:(j + 1) * 4, n]
    assert codes[j, n] == np.argmin(((cb - chunk) ** 2).sum(1))


def test_code_sweep_finds_the_exact_best_single_code():
  """With m=1 and one chunk left free, the sweep picks the argmin over all centroids."""
  fmt = CodebookFormat(m=1, b=4, v=4, g=4)
  w, x = _layer(k=4, n=8, t=64)
  h = cq.hessian(x)
  q = cq.initialize(w, fmt, QUICK)
  q = q._replace(codes=jnp.zeros_like(q.codes))  # a bad start
  swept = cq.code_sweep(w, h, q, fmt=fmt, beam=1)
  for n in range(8):
    errs = []
    for c in range(16):
      trial = q._replace(codes=q.codes.at[0, 0, n].set(c))
      d = np.asarray(w - dequantize_reference(trial))[:, n]
      errs.append(d @ np.asarray(h) @ d)
    assert int(swept.codes[0, 0, n]) == int(np.argmin(errs))


def test_quantize_model_replaces_the_selected_layers(cfg):
  model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, cfg.vocab_size)
  fmt = CodebookFormat.parse("m1v4g32")
  qmodel, report = ql.quantize_model(model, tokens, pattern=r"layers/\d+/mlp/.*", fmt=fmt,
                                     cfg=cq.QuantizerConfig(kmeans_iterations=5,
                                                            iterations=1, adam_steps=5))
  assert sorted(report) == [f"layers/{i}/mlp/{p}" for i in range(cfg.n_layers)
                            for p in ("down_proj", "gate_proj", "up_proj")]
  assert isinstance(qmodel.layers[0].mlp.up_proj, ql.CodebookLinear)
  assert type(qmodel.layers[0].attn.q_proj).__name__ == "Linear"
  assert type(model.layers[0].mlp.up_proj).__name__ == "Linear"  # the original is kept
  # The quantized model equals the float model with the dequantized weights put in.
  dense = nnx.clone(model)
  for name in report:
    i, _, proj = name.split("/")[1:]
    layer = getattr(qmodel.layers[int(i)].mlp, proj)
    getattr(dense.layers[int(i)].mlp, proj).kernel[...] = dequantize_reference(layer.weight)
  np.testing.assert_allclose(np.asarray(qmodel(tokens)[0]), np.asarray(dense(tokens)[0]),
                             rtol=2e-4, atol=2e-4)
  # It runs through the split: prefill (batch 4 x 8 tokens) and decode steps.
  out = jaxsun.generate(jaxsun.SplitModel.from_model(qmodel), tokens[:, :8],
                        max_new_tokens=3)
  assert out.tokens.shape == (4, 3)
  with pytest.raises(ValueError, match="matches no Linear"):
    ql.select_linears(model, r"layers/\d+/mlp/upproj")


def test_perplexity_before_and_after_on_held_out_text():
  """A small LM trained on Shakespeare bytes, quantized at 2.5 bits: perplexity on the
  validation split rises a little, and less than with round-to-nearest at the same bits."""
  from jaxsun import data  # pylint: disable=g-import-not-at-top
  from jaxsun.train import OptimizerConfig, TrainConfig, Trainer  # pylint: disable=g-import-not-at-top
  tok = data.get_tokenizer("byte")
  cfg = jaxsun.ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                           n_kv_heads=2, d_ff=128, max_len=64)
  split = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  trainer = Trainer(split, TrainConfig(steps=80, optimizer=OptimizerConfig(
      3e-3, warmup_steps=8)))
  trainer.fit(data.lm_batches("shakespeare", tok, seq_len=64, batch_size=16, seed=0),
              progress=False)
  model = trainer.split.prefill_module()
  held_out = list(itertools.islice(data.lm_batches("shakespeare", tok, seq_len=64,
                                                   batch_size=16, split="validation"), 4))
  calib = next(data.lm_batches("shakespeare", tok, seq_len=64, batch_size=8, seed=1))
  ppl = lambda m: evaluate_loss(jaxsun.SplitModel.from_model(m), held_out)["perplexity"]
  before = ppl(model)
  fmt = CodebookFormat.parse("m1v4g32")
  pattern = r"layers/\d+/(attn|mlp)/.*"
  qmodel, _ = ql.quantize_model(model, jnp.asarray(calib["tokens"]), pattern=pattern,
                                fmt=fmt, cfg=QUICK)
  after = ppl(qmodel)
  rtn = nnx.clone(model)
  for name, path in ql.select_linears(rtn, pattern).items():
    mod = rtn
    for p in path:
      mod = mod[p] if isinstance(p, int) else getattr(mod, p)
    mod.kernel[...] = cq.rtn_quantize(mod.kernel[...], 2, fmt.g)
  after_rtn = ppl(rtn)
  print(f"perplexity: float {before:.2f}, codebook {fmt.name} {after:.2f}, "
        f"round-to-nearest {after_rtn:.2f}")
  assert before < 50  # it learned something (a uniform byte model is ~259)
  assert before < after < 1.5 * before, (before, after)
  assert after < after_rtn, (after, after_rtn)
