"""Shared test helpers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxsun


def perturbed(state, seed: int, scale: float = 0.5):
  """A copy of `state` with every array moved by N(0, scale * std(array)) noise."""
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [x + scale * (jnp.std(x) + 0.2 * jnp.mean(jnp.abs(x))) * jax.random.normal(k, x.shape, x.dtype)
         for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, out)


def untied_split(model, seed=1, last_prompt_token="prefill"):
  """A split whose decode tree differs from its prefill tree."""
  split = jaxsun.SplitModel.from_model(model, last_prompt_token=last_prompt_token).untie()
  return split.replace(decode=perturbed(split.decode, seed))


def random_tokens(seed, shape, vocab):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def jitted(model):
  """`model(tokens, **kw)` compiled once per shape (eager op-by-op dispatch is slow on CPU)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames=("mode",))
  def apply(state, tokens, mode="train", **kw):
    return nnx.merge(graphdef, state)(tokens, mode=mode, **kw)

  return lambda tokens, mode="train", **kw: apply(state, tokens, mode=mode, **kw)
