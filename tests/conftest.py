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


@pytest.fixture(autouse=True, scope="session")
def _tfds_dir_per_session(tmp_path_factory):
  """Datasets prepared by tests go to a temporary TFDS dir, not ~/.cache/jaxsun/tfds."""
  import os  # pylint: disable=g-import-not-at-top
  if "JAXSUN_TFDS_DIR" not in os.environ:
    os.environ["JAXSUN_TFDS_DIR"] = str(tmp_path_factory.mktemp("tfds"))
  yield
