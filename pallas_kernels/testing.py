"""Helpers for kernel tests: cross-lowering on a CPU-only host, interpreter parameters.

    text = lowers_for("cuda", f, *args)   # runs the Pallas -> Triton lowering on CPU
    text = lowers_for("tpu", f, *args)    # Pallas -> Mosaic TPU

Lowering checks what the Python side of the compiler accepts (supported primitives, block
shapes, index forms); it cannot catch limits enforced later by ptxas/libtpu or shared
memory over-subscription, which need the device.
"""

from __future__ import annotations

import jax

# What the Triton lowering queries about the device; an H100 stands for Hopper.
ABSTRACT_DEVICES = {
    "cuda": dict(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132),
    "tpu": dict(device_kind="TPU v5 lite", platform="tpu", num_cores=1),
}


def lowers_for(platform: str, f, *args, **kwargs) -> str:
  """Lowers `jax.jit(f)(*args, **kwargs)` for `platform` ("cuda" or "tpu"); returns the text."""
  if platform not in ABSTRACT_DEVICES:
    raise ValueError(f"platform={platform!r} is not one of {sorted(ABSTRACT_DEVICES)}")
  dev = jax.sharding.AbstractDevice(**ABSTRACT_DEVICES[platform])
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=dev)):
    traced = jax.jit(f).trace(*args, **kwargs)
    return traced.lower(lowering_platforms=(platform,)).as_text()
