import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxsun
from jaxsun import ModelConfig


def _count(cfg):
  abstract = nnx.eval_shape(lambda: jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))


@pytest.mark.parametrize("name", sorted(jaxsun.PRESETS))
def test_formula_matches_built_model(name):
  cfg = ModelConfig.preset(name)
  assert _count(cfg) == cfg.num_params()


@pytest.mark.parametrize("name,lo,hi", [("10m", 9e6, 12e6), ("125m", 110e6, 140e6)])
def test_small_presets_have_their_advertised_size(name, lo, hi):
  assert lo <= ModelConfig.preset(name).num_params() <= hi


@pytest.mark.parametrize("name,published", [
    # Parameter counts Meta publishes for these checkpoints (safetensors totals).
    ("llama-3.2-1b", 1_235_814_400),
    ("llama-3.1-8b", 8_030_261_248),
])
def test_llama_shapes_match_published_parameter_counts(name, published):
  assert _count(ModelConfig.preset(name)) == published


def test_config_is_hashable_and_frozen():
  cfg = ModelConfig.preset("tiny")
  assert hash(cfg) == hash(ModelConfig.preset("tiny"))
  with pytest.raises(Exception):
    cfg.d_model = 3


def test_replace_rederives_head_dim():
  cfg = ModelConfig.preset("tiny").replace(d_model=128)
  assert cfg.head_dim == 32


@pytest.mark.parametrize("changes,field", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=-8), "d_model"),
    (dict(n_layers=0), "n_layers"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(d_ff=2.5), "d_ff"),
    (dict(max_len=0), "max_len"),
    (dict(attention="no_such_attention"), "attention"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(compute_dtype="float64"), "compute_dtype"),
    (dict(head_dim=15), "head_dim"),
    (dict(rope_theta=0.0), "rope_theta"),
])
def test_invalid_configs_name_the_field(changes, field):
  with pytest.raises(ValueError, match=field):
    ModelConfig.preset("tiny", **changes)


def test_unknown_preset():
  with pytest.raises(ValueError, match="preset"):
    ModelConfig.preset("llama-9000")


def test_decoder_rejects_non_config():
  with pytest.raises(TypeError, match="cfg"):
    jaxsun.Decoder({"d_model": 4}, rngs=nnx.Rngs(0))


def test_flops_per_token_matches_xla_cost_analysis():
  """The analytic FLOP count (used for TFLOP/s reports) against XLA's own count."""
  cfg = ModelConfig.preset("tiny", d_model=256, n_heads=8, n_kv_heads=4, d_ff=768,
                           vocab_size=1024, max_len=128)
  graphdef, state = nnx.split(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, 128), jnp.int32)
  loss = lambda st, t: nnx.merge(graphdef, st)(t)[0].mean()
  fwd = jax.jit(loss).lower(state, tokens).compile().cost_analysis()["flops"]
  train = jax.jit(jax.grad(loss)).lower(state, tokens).compile().cost_analysis()["flops"]
  per_step = cfg.flops_per_token(128) * tokens.size
  assert fwd == pytest.approx(per_step / 3, rel=0.05)
  assert train == pytest.approx(per_step, rel=0.10)
