"""Builds a serving system from a config: the task models, the deployment, the runtime.

The logic behind `python -m jaxsun.serving --config=configs/serving.py:tiny` (and the
notebook): `build_models(config)` reads the base checkpoint and each task model's spec,
`build_system(config)` returns a `ServingSystem` (in-process) or a `RaySystem`.

Task model specs (`config.task_models`, name -> spec):

    "sun:<source>"           prefill tree from <source>, decode tree = the base's (SUN)
    "prefillshare:<source>"  decode tree from <source>, prefill tree = the base's, and the
                             decode tree runs the last prompt token (PrefillShare)
    "full:<source>"          both trees from <source> (a conventional task model)
    "split:<dir>"            a `jaxsun.interop.save_hf_split` export (prefill/ + decode/)
    "base"                   the base model itself

<source> is a Hugging Face checkpoint directory, or `random:<seed>` (a random tree of the
base's architecture: for smoke tests and demos only). The base (`config.base`) is an HF
directory, `shipped:<name>` (a checkpoint shipped in jaxsun/data/files/checkpoints), or
`random:<preset>:<seed>` (a random `ModelConfig.preset`).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

import jaxsun
from jaxsun.serving.system import DeploymentConfig, ServingSystem


def _to_dict(c) -> dict:
  return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def load_base(spec: str) -> jaxsun.SplitModel:
  """The base model of a spec (see the module docstring)."""
  from jaxsun.interop import hf  # pylint: disable=import-outside-toplevel

  if spec.startswith("shipped:"):
    from jaxsun.data import paths  # pylint: disable=import-outside-toplevel
    return hf.load_hf(str(paths.data_root() / "checkpoints" / spec.split(":", 1)[1]))
  if spec.startswith("random:"):
    _, preset, seed = spec.split(":")
    cfg = jaxsun.ModelConfig.preset(preset)
    return jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(int(seed))))
  return hf.load_hf(spec)


def _tree(source: str, base: jaxsun.SplitModel):
  """A parameter tree of `base`'s architecture from a source spec."""
  from jaxsun.interop import hf  # pylint: disable=import-outside-toplevel

  if source.startswith("random:"):
    model = jaxsun.Decoder(base.cfg, rngs=nnx.Rngs(int(source.split(":", 1)[1])))
    return nnx.split(model)[1]
  loaded = hf.load_hf(source, max_len=base.cfg.max_len)
  if loaded.graphdef != base.graphdef:
    raise ValueError(f"checkpoint {source!r} has another architecture than the base")
  return loaded.prefill


def build_task_model(name: str, spec: str, base: jaxsun.SplitModel) -> jaxsun.SplitModel:
  """One task model from its spec (see the module docstring)."""
  kind, _, source = spec.partition(":")
  if kind == "base":
    return base
  if kind == "split":
    from jaxsun.interop import hf  # pylint: disable=import-outside-toplevel
    return hf.load_hf_split(source)
  if kind not in ("sun", "prefillshare", "full") or not source:
    raise ValueError(f"task_models.{name}={spec!r}: expected 'sun:<source>', "
                     "'prefillshare:<source>', 'full:<source>', 'split:<dir>' or 'base'")
  tree = _tree(source, base)
  if kind == "sun":
    return jaxsun.SplitModel(graphdef=base.graphdef, prefill=tree, decode=base.prefill)
  if kind == "prefillshare":
    return jaxsun.SplitModel(graphdef=base.graphdef, prefill=base.prefill, decode=tree,
                             last_prompt_token="decode")
  return jaxsun.SplitModel(graphdef=base.graphdef, prefill=tree, decode=None)


def build_models(config) -> dict[str, jaxsun.SplitModel]:
  base = load_base(config.base)
  specs = _to_dict(config.task_models)
  if not specs:
    raise ValueError("config.task_models is empty")
  return {name: build_task_model(name, spec, base) for name, spec in specs.items()}


def deployment_config(config) -> DeploymentConfig:
  fields = {f.name for f in dataclasses.fields(DeploymentConfig)}
  d = _to_dict(config.deployment)
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"config.deployment has unknown keys {unknown}; known: {sorted(fields)}")
  return DeploymentConfig(**d)


def build_system(config, *, start: bool = True):
  """The configured deployment, in process (`config.runtime == "local"`) or on Ray."""
  models = build_models(config)
  dep = deployment_config(config)
  kw = dict(eos_id=config.eos_id if config.eos_id >= 0 else None, tokenizer=config.tokenizer)
  if config.runtime == "ray":
    from jaxsun.serving import ray_backend  # pylint: disable=import-outside-toplevel
    return ray_backend.RaySystem(dep, models, **kw)
  if config.runtime != "local":
    raise ValueError(f"config.runtime={config.runtime!r} must be 'local' or 'ray'")
  return ServingSystem(dep, models, start=start, **kw)
