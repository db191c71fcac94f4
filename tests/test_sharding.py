"""Sharded execution on 8 fake CPU devices equals one device (separate process: the
device count is fixed when JAX starts)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxsun import parallel

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def summary():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.sharding_check"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["(2, 2, 2)", "(1, 1, 8)", "(8, 1, 1)"])
def test_eight_devices_match_one(summary, mesh):
  res = summary[mesh]
  for name, err in res["rel_err"].items():
    assert err <= 1e-5, (name, err)
  assert res["tokens_equal"]


def test_parameters_are_really_sharded(summary):
  assert summary["(2, 2, 2)"]["q_proj_spec"] == str(P("fsdp", "tensor"))
  assert summary["(2, 2, 2)"]["q_proj_shards"] == 8
  assert summary["(1, 1, 8)"]["q_proj_spec"] == str(P(None, "tensor"))
  assert summary["(8, 1, 1)"]["q_proj_spec"] == str(P(None, None))  # data-parallel: replicated


def test_hf_checkpoint_loads_straight_into_a_sharded_layout(summary):
  res = summary["hf_load"]
  assert res["max_abs_dlogit"] <= 1e-4  # the transformers golden logits
  assert res["q_proj_spec"] == str(P("fsdp", "tensor"))
  # Each device read only its quarter of q_proj (fsdp=2 x tensor=2), never all of it.
  assert res["q_proj_read_max"] == res["q_proj_size"] // 4
  assert not res["any_full_read_of_sharded"]


def test_logical_rules_replicate_indivisible_dims():
  mesh = parallel.make_mesh()  # one device: every axis has size 1
  assert parallel.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P(None, None)
  fake = type("M", (), {"shape": {"data": 2, "fsdp": 2, "tensor": 4}})()
  assert parallel.logical_to_spec(("embed", "mlp"), (64, 128), fake) == P("fsdp", "tensor")
  assert parallel.logical_to_spec(("embed", "kv_heads"), (64, 6), fake) == P("fsdp", None)
  assert parallel.logical_to_spec(("batch", None), (8, 3), fake) == P(("data", "fsdp"), None)
  assert parallel.logical_to_spec(("batch",), (2,), fake) == P(None)
  with pytest.raises(ValueError, match="logical axis 'nope' has no rule"):
    parallel.logical_to_spec(("nope",), (4,), fake)
