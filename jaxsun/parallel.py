"""Device mesh (data, fsdp, tensor) and logical-axis rules for parameters and caches.

Model code names only logical axes (parameters carry them as `out_sharding` metadata,
the cache uses `kv_cache.CACHE_AXES`); one rules table maps logical names to mesh axes:

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    split = shard_split_model(split, mesh)           # params placed by DEFAULT_RULES
    out = generate(split, prompts, ..., cache_sharding=cache_shardings(split, mesh, b, s))

A dimension whose size is not divisible by its mesh axes is replicated instead, so any
mesh works with any model (at the cost of memory, never of correctness). With one device
(the default mesh) every rule is a no-op.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsun import kv_cache

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Batch-like axes shard over data x fsdp; weights shard their
# embed dimension over fsdp and their heads / mlp / vocab dimension over tensor.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("cache_batch_prefill", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("cache_kv_heads", "tensor"),
    ("norm", None),
    # The leading axis of a scanned model's stacked layers (`ModelConfig.scan_layers`):
    # replicated, so each device holds every layer's shard of the other axes.
    ("layers", None),
    ("length", None),
    ("cache_length", None),
    ("cache_head_dim", None),
)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over the first data*fsdp*tensor devices."""
  for name, n in (("data", data), ("fsdp", fsdp), ("tensor", tensor)):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise ValueError(f"mesh axis {name}={n!r} must be a positive integer")
  devices = list(jax.devices() if devices is None else devices)
  need = data * fsdp * tensor
  if need > len(devices):
    raise ValueError(f"mesh data*fsdp*tensor={need} needs more than the {len(devices)} "
                     "available devices")
  grid = np.asarray(devices[:need], dtype=object).reshape(data, fsdp, tensor)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array with these logical axes; indivisible dims replicate."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for an `nnx.State`, from each variable's logical axes."""

  def one(var):
    axes = var.get_metadata().get("out_sharding") or (None,) * var[...].ndim
    return var.replace(NamedSharding(mesh, logical_to_spec(axes, var[...].shape, mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def global_array(x, sharding: jax.sharding.Sharding) -> jax.Array:
  """`x` (the same full value in every process) as one array laid out by `sharding`.

  Each process fills only the shards of its own devices, so this works the same with one
  process and with several joined by `jax.distributed.initialize`.
  """
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_tree(tree, shardings):
  """`global_array` over a pytree and a matching pytree of shardings."""
  return jax.tree.map(global_array, tree, shardings)


def host_value(x) -> np.ndarray:
  """A replicated (or single-process) array's value on this host."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))


def shard_split_model(split, mesh: Mesh, rules=DEFAULT_RULES):
  """Places both trees of a SplitModel on the mesh (a tied model stays tied)."""
  shardings = jax.tree.map(lambda _: None, split)
  shardings = shardings.replace(
      prefill=state_shardings(split.prefill, mesh, rules),
      decode=None if split.decode is None else state_shardings(split.decode, mesh, rules))
  if jax.process_count() == 1:
    return jax.device_put(split, shardings)
  return put_tree(split, shardings)


def cache_shardings(cache: kv_cache.KVCache, mesh: Mesh, rules=DEFAULT_RULES, *,
                    prefill: bool = False):
  """Sharding pytree matching `cache` (prefill caches use `cache_batch_prefill`)."""
  axes = kv_cache.PREFILL_CACHE_AXES if prefill else kv_cache.CACHE_AXES

  def kv(x):
    return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules))

  def layer(lc):
    return kv_cache.LayerCache(
        k=kv(lc.k), v=kv(lc.v),
        state={n: NamedSharding(mesh, logical_to_spec(axes[:1] + (None,) * (s.ndim - 1),
                                                       s.shape, mesh, rules))
               for n, s in lc.state.items()})

  return kv_cache.KVCache(
      layers=tuple(layer(lc) for lc in cache.layers),
      lengths=NamedSharding(mesh, logical_to_spec(axes[:1], cache.lengths.shape, mesh,
                                                  rules)))


def batch_sharding(shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding of a [batch, ...] input array."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1),
                                             shape, mesh, rules))
