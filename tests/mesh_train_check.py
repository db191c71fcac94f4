"""Training on a mesh, run in its own processes (test_mesh_training.py starts them).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.mesh_train_check \
        single <checkpoint dir>
    # two processes with 4 CPU devices each, joined by jax.distributed (gloo collectives):
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.mesh_train_check \
        multi <process id> <port> <checkpoint dir>

Prints one JSON line: per-step losses for each setting (and checkpoint checks).
"""

import json
import sys

import jax
import numpy as np

STEPS = 6


def batches(vocab: int, seed: int = 0):
  """Deterministic global batches (the same in every process): prompt + answer rows."""
  rng = np.random.default_rng(seed)
  while True:
    tokens = rng.integers(0, vocab, size=(8, 24), dtype=np.int32)
    boundary = rng.integers(4, 16, size=(8,), dtype=np.int32)
    mask = (np.arange(24)[None, :] >= boundary[:, None]).astype(np.float32)
    yield {"tokens": tokens, "boundary": boundary, "loss_mask": mask}


def make(trainability: str, mesh=None):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jaxsun  # pylint: disable=g-import-not-at-top
  from jaxsun.train import OptimizerConfig, TrainConfig, Trainer  # pylint: disable=g-import-not-at-top
  cfg = jaxsun.ModelConfig.preset("tiny", init_std=0.1)
  split = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  if trainability != "both":
    split = split.untie()
  config = TrainConfig(steps=STEPS, trainability=trainability, log_every=100,
                       optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1))
  return Trainer(split, config, mesh=mesh), cfg


def losses(trainer, cfg, n=STEPS, data=None):
  data = batches(cfg.vocab_size) if data is None else data
  return [trainer.train_step(next(data))["loss"] for _ in range(n)]


def q_spec(trainer):
  tree = trainer.state.params.get("prefill") or trainer.state.params.get("decode")
  sharding = tree["layers"][0]["attn"]["q_proj"]["kernel"][...].sharding
  return str(getattr(sharding, "spec", "single device"))


def single(ckpt_dir: str) -> dict:
  from jaxsun import parallel  # pylint: disable=g-import-not-at-top
  from jaxsun.train.checkpoints import Checkpointer  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8, jax.devices()
  out = {}
  for trainability in ("both", "prefill"):
    ref_trainer, cfg = make(trainability)
    ref = losses(ref_trainer, cfg)
    res = {"one_device": ref}
    for shape in ((2, 2, 2), (1, 4, 2), (8, 1, 1)):
      trainer, _ = make(trainability, parallel.make_mesh(*shape))
      res[str(shape)] = losses(trainer, cfg)
      res[f"{shape} q_proj"] = q_spec(trainer)
      res[f"{shape} eval"] = trainer.evaluate([next(batches(cfg.vocab_size, 1))])["loss"]
    res["one_device eval"] = ref_trainer.evaluate([next(batches(cfg.vocab_size, 1))])["loss"]
    out[trainability] = res

  # Save on a (2, 2, 2) mesh after 3 steps, restore onto (1, 2, 4) and onto one device,
  # continue: the same losses as an uninterrupted run.
  trainer, cfg = make("prefill", parallel.make_mesh(2, 2, 2))
  data = batches(cfg.vocab_size)
  first = losses(trainer, cfg, 3, data)
  with Checkpointer(ckpt_dir, keep=1, async_save=False) as ckpt:
    trainer.save(ckpt)
  rest_ref = losses(trainer, cfg, 3, data)
  resumed = {}
  for name, mesh in (("(1, 2, 4)", parallel.make_mesh(1, 2, 4)), ("one_device", None)):
    other, _ = make("prefill", mesh)
    with Checkpointer(ckpt_dir, keep=1, async_save=False) as ckpt:
      other.restore(ckpt)
    data2 = batches(cfg.vocab_size)
    for _ in range(3):
      next(data2)
    resumed[name] = {"losses": losses(other, cfg, 3, data2), "step": other.step,
                     "q_proj": q_spec(other)}
  out["restore"] = {"before": first, "uninterrupted": rest_ref, "resumed": resumed}
  return out


def multi(pid: int, port: int, ckpt_dir: str) -> dict:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=pid)
  from jaxsun import parallel  # pylint: disable=g-import-not-at-top
  from jaxsun.train.checkpoints import Checkpointer  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  trainer, cfg = make("prefill", parallel.make_mesh(2, 2, 2))
  got = losses(trainer, cfg)
  with Checkpointer(ckpt_dir, keep=1, async_save=False) as ckpt:
    trainer.save(ckpt)
  return {"process": pid, "losses": got, "local_devices": jax.local_device_count(),
          "q_proj": q_spec(trainer), "step": trainer.step}


def main(argv):
  if argv[1] == "single":
    print(json.dumps(single(argv[2])))
  else:
    print(json.dumps(multi(int(argv[2]), int(argv[3]), argv[4])))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
