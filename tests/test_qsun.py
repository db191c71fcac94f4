"""QSUN: a quantized shared decode tree attached to SUN task models (jaxsun.quant.qsun,
jaxsun.jobs.qsun)."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.quant import api, qlinear, qsun
from tests.helpers import perturbed

ALL = qsun.ALL_LINEARS


@pytest.fixture(scope="module")
def base():
  cfg = jaxsun.ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                           d_ff=128, max_len=64, init_std=0.25)
  return jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))


def test_attach_quantized_decode_tree_equals_dequantized_float_tree(base):
  task = base.untie().replace(prefill=perturbed(base.prefill, seed=3))  # a "SUN" task model
  qdec, _ = qsun.shared_decode(base, [(ALL, "w3a16g32")])
  q_task = qsun.attach(task, qdec)
  assert isinstance(q_task.decode_module().layers[0].mlp.up_proj, qlinear.IntLinear)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), q_task.prefill,
                                   task.prefill))
  # The same task model with the dequantized weights in a float decode tree.
  dense = nnx.clone(base.decode_module())
  for path, m in nnx.iter_modules(qdec):
    if isinstance(m, qlinear.IntLinear):
      api._get(dense, path).kernel[...] = m.dequantized()  # pylint: disable=protected-access
  f_task = qsun.attach(task, dense)
  prompt = jax.random.randint(jax.random.key(1), (3, 9), 0, 64)
  a = jaxsun.generate(q_task, prompt, max_new_tokens=6)
  b = jaxsun.generate(f_task, prompt, max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  # Control: the float shared tree generates something else at 3 bits.
  c = jaxsun.generate(task, prompt, max_new_tokens=6)
  assert (np.asarray(c.tokens) != np.asarray(a.tokens)).any()


def test_weight_bytes_count_bits(base):
  dec = base.decode_module()
  fb = qsun.weight_bytes(dec)
  n = sum(m.kernel[...].size for _, m in nnx.iter_modules(dec)
          if type(m).__name__ == "Linear")
  assert fb == {"float": 4 * n, "quantized": 0, "total": 4 * n}
  qdec, _ = qsun.shared_decode(base, [(ALL, "w2a16g32")])
  qb = qsun.weight_bytes(qdec)
  # 2 bits per weight + (scale f32 + 2-bit zero) per group of 32 rows and column.
  groups = n // 32
  assert qb["quantized"] == n * 2 // 8 + 4 * groups + groups * 2 // 8
  assert qsun.weight_bytes(api.to_bcq(qdec))["quantized"] == n * 2 // 8 + 4 * 3 * groups


def test_qa_prefill_training_keeps_the_quantized_decode_tree(tmp_path, base):
  from jaxsun import data  # pylint: disable=g-import-not-at-top
  from jaxsun.jobs import finetune as ft  # pylint: disable=g-import-not-at-top
  tok = data.get_tokenizer("byte")
  cfg = base.cfg.replace(vocab_size=tok.vocab_size, max_len=128)
  b = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  qdec, _ = qsun.shared_decode(b, [(ALL, "w4a16g32")])
  start = qsun.qa_base(b, qdec)
  split, summary = ft.fit_task_model(
      start, "rotate_matrix", "prefill", tok, steps=3, batch_size=4,
      seq_len=ft.task_seq_len("rotate_matrix", tok), optimizer={"learning_rate": 1e-3},
      lora_cfg=None, seed=0, workdir=tmp_path, name="qa", identity={},
      data_dir=str(tmp_path / "tfds"))
  assert summary["shared_decode_tree_unchanged"] is True
  assert summary["trainable_params"] == cfg.num_params()
  assert not jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), split.prefill,
                                       b.prefill))  # the prefill tree did train


def test_job_config_contract():
  from configs import qsun as qsun_config  # pylint: disable=g-import-not-at-top
  from jaxsun.jobs import qsun as job  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="unknown variant"):
    qsun_config.get_config("huge")
  c = qsun_config.get_config("tiny")
  with pytest.raises(AttributeError):
    c.new_field = 1  # locked
  assert job.parse_variant("awq:w4a16g32") == ("awq", "w4a16g32")
  with pytest.raises(ValueError, match="config.qsun.variants"):
    job.parse_variant("w4a16")
  with pytest.raises(ValueError, match="config.qsun.variants"):
    job.parse_variant("rtn:w9a16")
  with pytest.raises(ValueError, match="config.qsun.variants"):
    job.parse_variant("gptx:w4a16")


def test_job_smoke(tmp_path):
  from configs import qsun as qsun_config  # pylint: disable=g-import-not-at-top
  from jaxsun import jobs  # pylint: disable=g-import-not-at-top
  res = jobs.run(qsun_config.get_config("smoke"), tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["summary"]["rotate_matrix"].keys() >= {
      "sun_accuracy", "qsun:rtn:w4a16g32_accuracy", "qsun_qa:rtn:w2a16g32_loss"}
  d = res["decode"]
  assert d["rtn:w2a16g32"]["bytes"] < d["rtn:w4a16g32"]["bytes"] < d["float"]["bytes"] / 5
  # Step times are wall-clock differences (may be <= 0 on a loaded machine): only finite.
  assert all(math.isfinite(v["step_s"]) for v in d.values())
  assert (tmp_path / "table.md").exists() and (tmp_path / "qsun.png").exists()
