"""Bad inputs raise errors that name the argument."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun import parallel
from jaxsun.generation import SamplingConfig
from tests.helpers import random_tokens


@pytest.fixture
def split(model):
  return jaxsun.SplitModel.from_model(model)


def test_token_ids_outside_the_vocabulary(model, split, cfg):
  bad = np.array([[1, 2, cfg.vocab_size]], np.int32)
  with pytest.raises(ValueError, match=r"tokens contains token id 128 outside"):
    model(bad)
  with pytest.raises(ValueError, match=r"prompts contains token id -1 outside"):
    jaxsun.generate(split, np.array([[3, -1]], np.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match=r"tokens contains token id"):
    jaxsun.split_forward(split, bad, jnp.array([1]))


def test_wrong_dtype_or_rank(model, split):
  with pytest.raises(TypeError, match="tokens must have an integer dtype"):
    model(jnp.ones((1, 4), jnp.float32))
  with pytest.raises(ValueError, match=r"tokens must have rank 2"):
    model(jnp.ones((4,), jnp.int32))
  with pytest.raises(ValueError, match=r"prompts must have rank 2"):
    jaxsun.generate(split, jnp.ones((1, 2, 3), jnp.int32), max_new_tokens=1)
  with pytest.raises(TypeError, match="boundary must have an integer dtype"):
    jaxsun.split_forward(split, jnp.ones((1, 4), jnp.int32), jnp.array([1.5]))
  with pytest.raises(ValueError, match=r"boundary must have shape \(2,\)"):
    jaxsun.split_forward(split, jnp.ones((2, 4), jnp.int32), jnp.array([1, 2, 3]))


def test_prompt_longer_than_max_len(split, cfg):
  long = random_tokens(0, (1, cfg.max_len + 1), cfg.vocab_size)
  with pytest.raises(ValueError, match="max_len"):
    jaxsun.generate(split, long, max_new_tokens=1)
  with pytest.raises(ValueError, match="max_new_tokens"):
    jaxsun.generate(split, random_tokens(0, (1, cfg.max_len - 2), cfg.vocab_size),
                    max_new_tokens=3)
  with pytest.raises(ValueError, match=r"tokens has length 65 > ModelConfig.max_len=64"):
    jaxsun.split_forward(split, long, jnp.array([1]))


@pytest.mark.parametrize("boundary", [0, 9, -1])
def test_boundary_outside_the_sequence(split, cfg, boundary):
  tokens = random_tokens(0, (2, 8), cfg.vocab_size)
  with pytest.raises(ValueError, match=r"boundary must lie in \[1, 8\]"):
    jaxsun.split_forward(split, tokens, jnp.array([3, boundary]))


def test_mode_misuse(model, cfg):
  tokens = random_tokens(0, (2, 4), cfg.vocab_size)
  cache = model.init_cache(2, 8)
  with pytest.raises(ValueError, match="mode='decode' takes one token per row"):
    model(tokens, mode="decode", cache=cache)
  with pytest.raises(ValueError, match="mode='train' runs without a KV cache"):
    model(tokens, mode="train", cache=cache)
  with pytest.raises(ValueError, match="mode='prefill' needs a KV cache"):
    model(tokens, mode="prefill")
  with pytest.raises(ValueError, match="mode='generate' is not one of"):
    model(tokens, mode="generate")
  with pytest.raises(ValueError, match="cache has batch 2 but tokens has batch 3"):
    model(random_tokens(0, (3, 1), cfg.vocab_size), mode="decode", cache=cache)
  with pytest.raises(ValueError, match="max_len=65 exceeds ModelConfig.max_len=64"):
    model.init_cache(1, 65)
  with pytest.raises(ValueError, match="batch=0"):
    model.init_cache(0, 8)


def test_generate_arguments(split, cfg):
  prompts = random_tokens(0, (2, 4), cfg.vocab_size)
  with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, 4\]"):
    jaxsun.generate(split, prompts, jnp.array([0, 4]), max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    jaxsun.generate(split, prompts, max_new_tokens=0)
  with pytest.raises(ValueError, match="key"):
    jaxsun.generate(split, prompts, max_new_tokens=2, sampling=SamplingConfig(temperature=1.0))
  with pytest.raises(ValueError, match="eos_id"):
    jaxsun.generate(split, prompts, max_new_tokens=2, eos_id=cfg.vocab_size)
  with pytest.raises(ValueError, match="pad_id"):
    jaxsun.generate(split, prompts, max_new_tokens=2, pad_id=-1)
  with pytest.raises(ValueError, match="prompts must be a non-empty list"):
    jaxsun.generate(split, [[1, 2], []], max_new_tokens=2)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_sampling_config(kwargs, field):
  with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
    SamplingConfig(**kwargs)


def test_split_construction(model, cfg):
  with pytest.raises(ValueError, match="last_prompt_token"):
    jaxsun.SplitModel.from_model(model, last_prompt_token="middle")
  other = jaxsun.Decoder(cfg.replace(n_layers=3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="same architecture"):
    jaxsun.SplitModel.from_models(model, other)
  with pytest.raises(TypeError, match="model must be a jaxsun Decoder"):
    jaxsun.SplitModel.from_model("not a model")


def test_loss_mask_shape(split, cfg):
  tokens = random_tokens(0, (2, 8), cfg.vocab_size)
  with pytest.raises(ValueError, match="loss_mask must have shape"):
    jaxsun.next_token_loss(split, tokens, jnp.array([2, 3]), jnp.ones((2, 7)))


def test_mesh_arguments():
  with pytest.raises(ValueError, match="tensor=0"):
    parallel.make_mesh(tensor=0)
  with pytest.raises(ValueError, match="needs more than"):
    parallel.make_mesh(data=1024)
