"""The attention interface: a variant adds per-head parameters and per-sequence cache
state by subclassing `Attention` only (no change to the block), and the modes and the
split still agree for it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsun
from jaxsun.generation import SamplingConfig
from jaxsun.nn import Attention, layers, register_attention
from tests.helpers import jitted, random_tokens, rel_err, untied_split

TOL = 1e-5


@register_attention("test_running_mean")
class RunningMeanAttention(Attention):
  """softmax attention + gate[kv_head] * mean of the values seen so far (running state)."""

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs)
    self.gate = layers.param(rngs, (cfg.n_kv_heads,), (None,), dtype=cfg.params_dtype,
                             std=1.0)

  def init_state(self, batch, max_len):
    return {"v_sum": jnp.zeros((batch, self.n_kv_heads, self.head_dim), jnp.float32)}

  def attend(self, a):
    out, _ = super().attend(a)  # [B, T, Hkv, G, hd]
    fresh = jnp.where(a.is_new[..., None, None], a.fresh_v.astype(jnp.float32), 0.0)
    before = a.state["v_sum"][:, None] if a.state else 0.0  # f32[B, 1, Hkv, hd]
    running = before + jnp.cumsum(fresh, axis=1)  # f32[B, T, Hkv, hd]
    mean = running / (a.positions[..., None, None] + 1.0)
    out = out + (self.gate[...][:, None] * mean[:, :, :, None, :]).astype(out.dtype)
    new_state = {"v_sum": a.state["v_sum"] + fresh.sum(axis=1)} if a.state else {}
    return out, new_state


@pytest.fixture
def variant_cfg(cfg):
  return cfg.replace(attention="test_running_mean")


@pytest.fixture
def variant_model(variant_cfg):
  return jaxsun.Decoder(variant_cfg, rngs=nnx.Rngs(0))


def test_variant_params_and_cache_state_exist(variant_model, variant_cfg):
  state = nnx.state(variant_model)
  assert state["layers"][0]["attn"]["gate"][...].shape == (variant_cfg.n_kv_heads,)
  cache = variant_model.init_cache(3, 8)
  assert cache.layers[0].state["v_sum"].shape == (3, variant_cfg.n_kv_heads,
                                                  variant_cfg.head_dim)


def test_variant_changes_the_output(variant_model, variant_cfg, model):
  tokens = random_tokens(0, (2, 12), variant_cfg.vocab_size)
  # The same model with its gates zeroed is plain softmax attention.
  graphdef, state = nnx.split(variant_model)
  zeroed = jax.tree.map(lambda x: x, state)
  for i in range(variant_cfg.n_layers):
    zeroed["layers"][i]["attn"]["gate"] = nnx.Param(jnp.zeros(variant_cfg.n_kv_heads))
  with_gate = jitted(variant_model)(tokens)[0]
  without = jitted(nnx.merge(graphdef, zeroed))(tokens)[0]
  assert rel_err(with_gate, without) > 1e-2


def test_variant_full_forward_equals_prefill_then_decode(variant_model, variant_cfg):
  apply = jitted(variant_model)
  tokens = random_tokens(1, (3, 20), variant_cfg.vocab_size)
  lengths = jnp.array([4, 9, 1], jnp.int32)
  full, _ = apply(tokens)
  cache = variant_model.init_cache(3, 20)
  _, cache = apply(tokens[:, :9], mode="prefill", cache=cache, new_lengths=lengths)
  for i in range(20 - 9):
    pos = lengths + i
    step, cache = apply(jnp.take_along_axis(tokens, pos[:, None], 1), mode="decode",
                        cache=cache)
    assert rel_err(step, jnp.take_along_axis(full, pos[:, None, None], 1)) <= TOL


def test_variant_split_forward_equals_prefill_cache_then_decode_steps(variant_model,
                                                                      variant_cfg):
  split = untied_split(variant_model)
  tokens = random_tokens(2, (3, 16), variant_cfg.vocab_size)
  boundary = jnp.array([2, 7, 11], jnp.int32)
  expected = jax.jit(jaxsun.split_forward)(split, tokens, boundary)
  cache = split.prefill_module().init_cache(3, 16)
  _, cache = jaxsun.prefill(split, tokens[:, :11], boundary, cache)
  for i in range(16 - 11):
    pos = boundary + i
    tok = jnp.take_along_axis(tokens, pos[:, None], 1)[:, 0]
    _, logits, cache = jaxsun.decode_step(split, tok, cache, None, SamplingConfig())
    assert rel_err(logits, expected[jnp.arange(3), pos]) <= TOL
