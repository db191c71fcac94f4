"""Named trainability choices: the optimizer partition and frozen trees stay bitwise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsun
from tests.helpers import random_tokens, untied_split

BOUNDARY = jnp.array([3, 6, 8, 10], jnp.int32)
STEPS = 3


def _train(split, trainability, steps=STEPS):
  tx = optax.adamw(1e-2)
  step = jaxsun.make_train_step(tx, trainability)
  opt_state = jaxsun.make_optimizer(tx, split, trainability).init(split)
  tokens = random_tokens(0, (4, 16), split.cfg.vocab_size)
  losses = []
  for _ in range(steps):
    split, opt_state, loss = step(split, opt_state, tokens, BOUNDARY)
    losses.append(float(loss))
  return split, opt_state, losses


def _bitwise_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _all_changed(a, b):
  return all(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("trainability,prefill_changes,decode_changes", [
    ("prefill", True, False),  # SUN
    ("decode", False, True),  # PrefillShare
    ("both", True, True),
    ("none", False, False),
])
def test_frozen_trees_are_bitwise_unchanged(model, trainability, prefill_changes,
                                            decode_changes):
  split = untied_split(model)
  # A negative zero in a frozen tree: `x + 0` would flip its sign bit.
  split = split.replace(decode=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(-0.0),
                                            split.decode))
  trained, _, losses = _train(split, trainability)
  for tree, changes in (("prefill", prefill_changes), ("decode", decode_changes)):
    before, after = getattr(split, tree), getattr(trained, tree)
    if changes:
      assert _all_changed(before, after), f"{tree} tree should have been trained"
    else:
      assert _bitwise_equal(before, after), f"{tree} tree should be frozen"
  if trainability != "none":
    assert losses[-1] < losses[0]


def test_frozen_trees_get_no_optimizer_state(model):
  split = untied_split(model)
  n_params = len(jax.tree.leaves(split.prefill))
  tx = optax.adam(1e-3)
  for trainability, moments in (("prefill", 2 * n_params), ("both", 4 * n_params),
                                ("none", 0)):
    state = jaxsun.make_optimizer(tx, split, trainability).init(split)
    n_arrays = sum(x.size > 1 for x in jax.tree.leaves(state))
    assert n_arrays == moments, trainability


def test_tied_model_trains_its_single_tree_with_both(model):
  tied = jaxsun.SplitModel.from_model(model)
  trained, _, losses = _train(tied, "both")
  assert trained.tied and _all_changed(tied.prefill, trained.prefill)
  assert losses[-1] < losses[0]


def test_param_labels(model):
  split = untied_split(model)
  labels = jaxsun.param_labels(split, "prefill")
  assert set(jax.tree.leaves(labels.prefill)) == {"trainable"}
  assert set(jax.tree.leaves(labels.decode)) == {"frozen"}


@pytest.mark.parametrize("trainability", ["prefill", "decode"])
def test_one_tree_trainability_on_a_tied_model_is_an_error(model, trainability):
  with pytest.raises(ValueError, match="untie"):
    jaxsun.param_labels(jaxsun.SplitModel.from_model(model), trainability)


def test_unknown_trainability(model):
  with pytest.raises(ValueError, match="trainability"):
    jaxsun.make_train_step(optax.sgd(1.0), "encoder")
  with pytest.raises(ValueError, match="trainability"):
    jaxsun.param_labels(jaxsun.SplitModel.from_model(model), "all")
