"""The Trainer on a mesh: 8 fake CPU devices train the same loss curve as one device, a
checkpoint restores onto a different mesh, and two processes joined by
`jax.distributed.initialize` (gloo CPU collectives) train the same steps as one process.

Each setting runs in its own processes (tests/mesh_train_check.py): the device count is
fixed when JAX starts.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import mesh_train_check

ROOT = pathlib.Path(__file__).parents[1]
RTOL = 1e-5


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  ckpt = tmp_path_factory.mktemp("mesh_ckpt")
  proc = subprocess.run([sys.executable, "-m", "tests.mesh_train_check", "single", str(ckpt)],
                        cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
  ckpt = tmp_path_factory.mktemp("multi_ckpt")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "tests.mesh_train_check", "multi", str(i),
                             str(port), str(ckpt)], cwd=ROOT, env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=900)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, err[-4000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  return outs, ckpt


@pytest.mark.parametrize("trainability", ["both", "prefill"])
@pytest.mark.parametrize("mesh", ["(2, 2, 2)", "(1, 4, 2)", "(8, 1, 1)"])
def test_eight_devices_train_the_one_device_curve(single, trainability, mesh):
  res = single[trainability]
  np.testing.assert_allclose(res[mesh], res["one_device"], rtol=RTOL)
  assert res[f"{mesh} eval"] == pytest.approx(res["one_device eval"], rel=RTOL)
  # The loss moved (the curve is a curve, not a constant the comparison would pass on).
  assert max(res["one_device"]) - min(res["one_device"]) > 1e-2


def test_parameters_and_state_are_sharded(single):
  assert single["prefill"]["(2, 2, 2) q_proj"] == "P('fsdp', 'tensor')"
  assert single["prefill"]["(8, 1, 1) q_proj"] == "P()"  # data parallel: replicated


def test_checkpoint_restores_onto_another_mesh(single):
  res = single["restore"]
  for name in ("(1, 2, 4)", "one_device"):
    got = res["resumed"][name]
    assert got["step"] == 2 * len(res["before"])
    np.testing.assert_allclose(got["losses"], res["uninterrupted"], rtol=RTOL)
  assert res["resumed"]["(1, 2, 4)"]["q_proj"] == "P('fsdp', 'tensor')"


def test_two_processes_train_the_one_process_curve(multi, single):
  outs, _ = multi
  assert [o["process"] for o in outs] == [0, 1]
  assert all(o["local_devices"] == 4 and o["step"] == mesh_train_check.STEPS for o in outs)
  np.testing.assert_array_equal(outs[0]["losses"], outs[1]["losses"])
  np.testing.assert_allclose(outs[0]["losses"], single["prefill"]["one_device"], rtol=RTOL)
  assert outs[0]["q_proj"] == "P('fsdp', 'tensor')"


def test_two_process_checkpoint_restores_in_one_process(multi, single):
  """The checkpoint both processes wrote, read back here on one device."""
  _, ckpt = multi
  from jaxsun.train.checkpoints import Checkpointer  # pylint: disable=g-import-not-at-top
  trainer, cfg = mesh_train_check.make("prefill")
  with Checkpointer(ckpt, keep=1, async_save=False) as c:
    trainer.restore(c)
  assert trainer.step == mesh_train_check.STEPS
  ev = trainer.evaluate([next(mesh_train_check.batches(cfg.vocab_size, 1))])["loss"]
  # The 8-device runs evaluate after the same 6 steps on the same batch.
  assert ev == pytest.approx(single["prefill"]["(2, 2, 2) eval"], rel=RTOL)
