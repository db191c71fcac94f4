"""Memory estimate: the formula's parts on a hand-counted config, sharding, the refusal
message, and the Trainer printing (and checking) it before the first step."""

import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.train import TrainConfig, Trainer, memory


def test_parts_by_hand():
  cfg = jaxsun.ModelConfig.preset("tiny")  # f32, d 64, 2 layers, 4 heads, kv 2 x 16
  n = cfg.num_params()
  est = memory.estimate_memory(cfg, trainability="prefill", untied=True, batch_size=8,
                               seq_len=32, accum_steps=2)
  assert est.params == 2 * n * 4 and est.trainable_state == 3 * n * 4
  per_layer = 4 * (6 * 64 + 2 * 64 + 2 * 32 + 3 * 128) + 4 * 4  # fused: lse per head
  head = 4 * 2 * 128 + 4 * 64
  assert est.activations == 2 * 4 * 32 * (2 * per_layer + head)  # 2 trees, micro-batch 4
  naive = memory.estimate_memory(cfg.replace(attention_impl="naive"), trainability="prefill",
                                 untied=True, batch_size=8, seq_len=32, accum_steps=2)
  naive_layer = per_layer - 4 * 4 + 4 * 2 * 4 * 32  # float32 scores and probabilities
  assert naive.activations == 2 * 4 * 32 * (2 * naive_layer + head)
  full = memory.estimate_memory(cfg.replace(remat="full"), trainability="prefill",
                                untied=True, batch_size=8, seq_len=32, accum_steps=2)
  assert full.activations == 2 * 4 * 32 * (2 * 4 * 64 + per_layer + head)
  assert est.total == est.params + est.trainable_state + est.activations
  sharded = memory.estimate_memory(cfg, trainability="prefill", untied=True, batch_size=8,
                                   seq_len=32, accum_steps=2, mesh_shape=(2, 2, 2))
  assert sharded.params == est.params // 4 and sharded.activations == est.activations // 8
  kv = memory.estimate_memory(cfg, trainability="none", untied=False, batch_size=1,
                              seq_len=8, kv_batch=4, kv_len=64)
  assert kv.kv_cache == 2 * 2 * 4 * 64 * 32 * 4 and kv.trainable_state == 0


def test_refusal_names_the_numbers():
  cfg = jaxsun.ModelConfig.preset("llama-3.1-8b", max_len=1024)
  est = memory.estimate_memory(cfg, trainability="both", untied=False, batch_size=16,
                               seq_len=1024)
  with pytest.raises(ValueError, match=r"needs about \d+\.\d GiB per device, more than 80"):
    est.check(80)
  est.check(0)  # no limit given: no check
  memory.estimate_memory(cfg, trainability="both", untied=False, batch_size=16,
                         seq_len=1024, mesh_shape=(1, 8, 1)).check(80)


def test_trainer_prints_and_checks_before_the_first_step(capsys):
  cfg = jaxsun.ModelConfig.preset("tiny")
  split = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))).untie()
  rng = np.random.default_rng(0)

  def batches():
    while True:
      yield {"tokens": rng.integers(0, 128, (4, 16), dtype=np.int32),
             "boundary": np.full((4,), 5, np.int32), "loss_mask": np.ones((4, 16), np.float32)}

  trainer = Trainer(split, TrainConfig(steps=1, trainability="prefill",
                                       device_memory_gb=1e-4))  # ~100 KiB: too small
  with pytest.raises(ValueError, match="GiB per device"):
    trainer.fit(batches(), progress=False)
  assert trainer.step == 0  # refused before any step
  ok = Trainer(split, TrainConfig(steps=1, trainability="prefill", device_memory_gb=1.0))
  ok.fit(batches(), progress=True)
  out = capsys.readouterr().out
  assert "memory estimate per device" in out and ok.step == 1
