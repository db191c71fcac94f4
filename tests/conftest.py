import pytest
from flax import nnx

import jaxsun


@pytest.fixture
def cfg():
  # A larger init scale than the preset's 0.02 gives peaked attention and logits, so
  # that a wrong mask, position or tree would move the numbers the tests compare.
  return jaxsun.ModelConfig.preset("tiny", init_std=0.25)


@pytest.fixture
def model(cfg):
  return jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
