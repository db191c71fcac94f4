"""LoRA adapters on the trainable tree: shared base arrays, merge == on the fly, training
changes only the adapters, dropout only with a key, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun import lora
from jaxsun import split as split_lib
from jaxsun.jobs import finetune as ft
from jaxsun.train.trainer import TrainConfig, Trainer
from jaxsun.train.optim import OptimizerConfig

from tests.helpers import random_tokens, rel_err

CFG = jaxsun.ModelConfig.preset("tiny", max_len=48)


@pytest.fixture(scope="module")
def base():
  return jaxsun.SplitModel.from_model(jaxsun.Decoder(CFG, rngs=nnx.Rngs(0)))


def leaf_ids(tree):
  return {id(x) for x in jax.tree.leaves(tree)}


def randomized_adapters(split, seed=3, scale=0.3):
  """The split with every adapter array replaced by fresh random values (B != 0)."""
  trainable, frozen = split_lib.partition(split, "both" if split.tied else "prefill")
  leaves, treedef = jax.tree.flatten(nnx.filter_state(split.prefill, nnx.LoRAParam))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for x, k in
                                     zip(leaves, keys)])
  rest = nnx.filter_state(split.prefill, nnx.Not(nnx.LoRAParam))
  return split.replace(prefill=nnx.merge_state(rest, new))


def batch(seed=0, b=4, s=32):
  tokens = random_tokens(seed, (b, s), CFG.vocab_size)
  boundary = jnp.array([7, 12, 16, 20][:b])
  return tokens, boundary


@pytest.mark.parametrize("slot", ["prefill", "decode", "both"])
def test_adapters_share_the_base_arrays_and_start_equal(base, slot):
  split = base.untie() if slot != "both" else base
  adapted = lora.add_adapters(split, slot, lora.LoRAConfig(rank=4), jax.random.key(1))
  for name in ("prefill", "decode"):
    tree = getattr(adapted, name)
    if tree is None:
      continue
    rest = nnx.filter_state(tree, nnx.Not(nnx.LoRAParam))
    # Not copied: the adapted tree's base arrays are the base model's own objects.
    assert leaf_ids(rest) == leaf_ids(base.prefill)
  assert lora.adapter_count(adapted) > 0
  tokens, boundary = batch()
  want = split_lib.split_forward(base, tokens, boundary)
  got = split_lib.split_forward(adapted, tokens, boundary)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # B = 0 at init


@pytest.mark.parametrize("slot,last", [("prefill", "prefill"), ("decode", "decode"),
                                       ("both", "prefill")])
def test_merged_equals_on_the_fly(base, slot, last):
  split = base.replace(last_prompt_token=last)
  split = split.untie() if slot != "both" else split
  cfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=r"(layers/\d+/(attn|mlp)/\w+_proj)")
  adapted = lora.add_adapters(split, slot, cfg, jax.random.key(2))
  # Random adapters on the adapted tree(s), so the update is far from zero.
  def rand(tree, seed):
    lo = nnx.filter_state(tree, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(lo)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    lo = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])
    return nnx.merge_state(nnx.filter_state(tree, nnx.Not(nnx.LoRAParam)), lo)
  if slot in ("prefill", "both"):
    adapted = adapted.replace(prefill=rand(adapted.prefill, 5))
  if slot == "decode":
    adapted = adapted.replace(decode=rand(adapted.decode, 6))
  merged = lora.merge_adapters(adapted)
  assert lora.adapter_count(merged) == 0
  tokens, boundary = batch(1)
  on_the_fly = split_lib.split_forward(adapted, tokens, boundary)
  folded = split_lib.split_forward(merged, tokens, boundary)
  plain = split_lib.split_forward(split, tokens, boundary)
  assert rel_err(folded, on_the_fly) < 5e-5  # float32 reassociation only
  assert rel_err(plain, on_the_fly) > 1e-2  # control: the adapters do change the logits
  out_a = jaxsun.generate(adapted, tokens[:, :10], max_new_tokens=6)
  out_m = jaxsun.generate(merged, tokens[:, :10], max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(out_a.tokens), np.asarray(out_m.tokens))


def task_batches(seed=0, n=1000):
  rng = np.random.default_rng(seed)
  while True:
    tokens = rng.integers(3, CFG.vocab_size, (4, 32)).astype(np.int32)
    boundary = rng.integers(8, 20, (4,)).astype(np.int32)
    mask = (np.arange(32)[None] >= boundary[:, None]).astype(np.float32)
    yield {"tokens": tokens, "boundary": boundary, "loss_mask": mask}


@pytest.mark.parametrize("regime", ["full_lora", "prefill_lora", "decode_lora"])
def test_training_changes_only_the_adapters(base, regime):
  split, trainability = ft.regime_split(base, regime, lora.LoRAConfig(rank=4, dropout=0.1),
                                        jax.random.key(0))
  before = jax.tree.map(np.asarray, (split.prefill, split.decode))
  trainer = Trainer(split, TrainConfig(steps=3, trainability=trainability, log_every=1,
                                       optimizer=OptimizerConfig(1e-2, warmup_steps=0)))
  trainer.fit(task_batches(), progress=False)
  after = trainer.split
  adapted = "decode" if regime == "decode_lora" else "prefill"
  n_adapter = lora.adapter_count(after)
  assert trainer.num_trainable_params() == n_adapter > 0
  for name, old in zip(("prefill", "decode"), before):
    new = getattr(after, name)
    if new is None:
      continue
    rest_new = nnx.filter_state(new, nnx.Not(nnx.LoRAParam))
    rest_old = nnx.filter_state(old, nnx.Not(nnx.LoRAParam))
    # Every base array, of the adapted tree too, is bitwise what it was.
    for a, b in zip(jax.tree.leaves(rest_new), jax.tree.leaves(rest_old)):
      np.testing.assert_array_equal(np.asarray(a), b)
    if name == adapted:
      moved = [not np.array_equal(np.asarray(a), b) for a, b in zip(
          jax.tree.leaves(nnx.filter_state(new, nnx.LoRAParam)),
          jax.tree.leaves(nnx.filter_state(old, nnx.LoRAParam)))]
      assert all(moved)  # A and B of every adapter trained (B leaves zero at step 1)
  # The base model's own arrays were neither donated nor changed.
  assert all(not x.is_deleted() for x in jax.tree.leaves(base.prefill))


def test_dropout_acts_only_with_a_key(base):
  cfg = lora.LoRAConfig(rank=4, dropout=0.5)
  adapted = randomized_adapters(lora.add_adapters(base, "both", cfg, jax.random.key(0)))
  tokens, boundary = batch(2)
  no_key = split_lib.split_forward(adapted, tokens, boundary)
  again = split_lib.split_forward(adapted, tokens, boundary)
  np.testing.assert_array_equal(np.asarray(no_key), np.asarray(again))
  k1 = split_lib.split_forward(adapted, tokens, boundary, dropout_key=jax.random.key(1))
  k1b = split_lib.split_forward(adapted, tokens, boundary, dropout_key=jax.random.key(1))
  k2 = split_lib.split_forward(adapted, tokens, boundary, dropout_key=jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(k1), np.asarray(k1b))  # deterministic per key
  assert rel_err(k1, no_key) > 1e-3 and rel_err(k1, k2) > 1e-3
  # Without adapters a key changes nothing (plain layers ignore it).
  plain = split_lib.split_forward(base, tokens, boundary, dropout_key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(plain),
                                np.asarray(split_lib.split_forward(base, tokens, boundary)))


def test_bad_configs_and_targets_are_clear_errors(base):
  with pytest.raises(ValueError, match="LoRAConfig.rank"):
    lora.LoRAConfig(rank=0)
  with pytest.raises(ValueError, match="LoRAConfig.dropout"):
    lora.LoRAConfig(dropout=1.0)
  with pytest.raises(ValueError, match="LoRAConfig.alpha"):
    lora.LoRAConfig(alpha=0)
  with pytest.raises(ValueError, match="not a regular expression"):
    lora.LoRAConfig(targets="layers/(")
  with pytest.raises(ValueError, match="matches no dense layer"):
    lora.add_adapters(base, "both", lora.LoRAConfig(targets="nothing"), jax.random.key(0))
  with pytest.raises(ValueError, match="untie"):
    lora.add_adapters(base, "prefill", lora.LoRAConfig(), jax.random.key(0))
  with pytest.raises(ValueError, match="slot"):
    lora.add_adapters(base.untie(), "middle", lora.LoRAConfig(), jax.random.key(0))
  adapted = lora.add_adapters(base, "both", lora.LoRAConfig(), jax.random.key(0))
  with pytest.raises(ValueError, match="already carries"):
    lora.add_adapters(adapted, "both", lora.LoRAConfig(), jax.random.key(0))
  with pytest.raises(ValueError, match="unknown regime"):
    ft.regime_split(base, "sun_lora")


def test_lm_head_can_be_targeted(base):
  cfg = jaxsun.ModelConfig.preset("tiny", tie_embeddings=False)
  split = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  adapted = lora.add_adapters(split, "both", lora.LoRAConfig(rank=2, targets="lm_head"),
                              jax.random.key(0))
  assert lora.adapter_count(adapted) == 2 * (cfg.d_model + cfg.vocab_size)
