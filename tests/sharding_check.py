"""Run in its own process with 8 fake CPU devices (see test_sharding.py):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharding_check

Compares logits, split logits, generated tokens and a training step on meshes of 8
devices against one device, and prints a JSON summary.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxsun
from jaxsun import parallel


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = jaxsun.ModelConfig.preset("tiny", init_std=0.25)
  one_device = jax.devices()[0]
  base = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))).untie()
  base = base.replace(decode=jax.tree.map(lambda x: x * 1.1, base.decode))
  base = jax.device_put(base, one_device)
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size)
  boundary = jnp.array([3, 7, 1, 12], jnp.int32)

  tx = optax.adamw(1e-2)
  step = jaxsun.make_train_step(tx, "prefill")

  def run(split, mesh=None):
    toks, bnd = tokens, boundary
    if mesh is not None:
      toks = jax.device_put(tokens, parallel.batch_sharding(tokens.shape, mesh))
      bnd = jax.device_put(boundary, parallel.batch_sharding(boundary.shape, mesh))
    logits = jax.jit(lambda s, t: s.prefill_module()(t)[0])(split, toks)
    split_logits = jax.jit(jaxsun.split_forward)(split, toks, bnd)
    out = jaxsun.generate(split, toks[:, :8], max_new_tokens=6, mesh=mesh)
    opt_state = jaxsun.make_optimizer(tx, split, "prefill").init(split)
    trained, _, loss = step(split, opt_state, toks, bnd)
    return dict(logits=logits, split_logits=split_logits, tokens=out.tokens, loss=loss,
                q_proj=trained.prefill["layers"][0]["attn"]["q_proj"]["kernel"][...])

  ref = jax.tree.map(np.asarray, run(base))
  summary = {}
  for shape in ((2, 2, 2), (1, 1, 8), (8, 1, 1)):
    mesh = parallel.make_mesh(*shape)
    sharded = parallel.shard_split_model(base, mesh)
    q = sharded.prefill["layers"][0]["attn"]["q_proj"]["kernel"][...]
    res = run(sharded, mesh)
    errs = {k: float(np.max(np.abs(np.asarray(res[k], np.float64) - ref[k])) /
                     max(float(np.max(np.abs(ref[k]))), 1e-12))
            for k in ("logits", "split_logits", "loss", "q_proj")}
    summary[str(shape)] = dict(
        rel_err=errs,
        tokens_equal=bool(np.array_equal(np.asarray(res["tokens"]), ref["tokens"])),
        q_proj_spec=str(q.sharding.spec),
        q_proj_shards=len({s.device for s in q.addressable_shards}),
        logits_devices=len(res["logits"].sharding.device_set))
  summary["hf_load"] = hf_sharded_load()
  print(json.dumps(summary))
  return 0


def hf_sharded_load():
  """Loads a committed HF checkpoint straight onto a (2, 2, 2) mesh, recording reads."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from jaxsun import interop  # pylint: disable=g-import-not-at-top
  from jaxsun.interop import safetensors_io  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(__file__).parent / "testdata" / "hf" / "qwen2"
  golden = np.load(directory / "golden.npz")
  reads = []
  original = safetensors_io.CheckpointReader.read

  def recording(self, name, index=None):
    out = original(self, name, index)
    reads.append((name, out.size))
    return out

  safetensors_io.CheckpointReader.read = recording
  try:
    mesh = parallel.make_mesh(2, 2, 2)
    split = interop.load_hf(str(directory), mesh=mesh)
  finally:
    safetensors_io.CheckpointReader.read = original
  q = split.prefill["layers"][0]["attn"]["q_proj"]["kernel"][...]
  logits = jax.jit(lambda s, t: s.prefill_module()(t)[0])(split, jnp.asarray(golden["tokens"]))
  full = {}
  with safetensors_io.CheckpointReader(str(directory)) as reader:
    for name in reader.names():
      full[name] = int(np.prod(reader.shape(name)))
  q_name = "model.layers.0.self_attn.q_proj.weight"
  return dict(
      max_abs_dlogit=float(np.max(np.abs(np.asarray(logits) - golden["logits"]))),
      q_proj_spec=str(q.sharding.spec),
      q_proj_read_max=max(n for name, n in reads if name == q_name),
      q_proj_size=full[q_name],
      any_full_read_of_sharded=any(n == full[q_name] for name, n in reads if name == q_name))


if __name__ == "__main__":
  sys.exit(main())
