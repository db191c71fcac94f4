"""The codebook weight format (AQLM-style additive codebooks with group scales).

A weight `W: [K, N]` (inputs x outputs, the layout of `jaxsun.nn.Linear`) is stored as

    codebooks  f[m, 2**b, v]   m codebooks of 2**b centroids of length v
    codes      u8[m, K // v, N] one code per (codebook, input group of v, output)
    scales     f[K // g, N]    one scale per (input group of g, output)

    W[k, n] = scales[k // g, n] * sum_c codebooks[c, codes[c, k // v, n], k % v]

so bits per weight = m * b / v + 16 / g (16-bit scales): m1v4g128 and m2v8g128 are 2.125,
m1v4g32 is 2.5. Outputs are the innermost axis of `codes` and `scales` so that a tile of
outputs reads contiguous bytes (the CodeGEMM kernel's layout, up to its int32 packing).
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# (m, v) pairs each backend's kernels are written for, with b = 8. The jnp references
# take any valid format.
BACKEND_SUPPORT = {
    "gpu": {(1, 4), (2, 8), (1, 8), (2, 4)},
    "tpu": {(1, 4), (2, 8), (1, 8), (2, 4)},
}
SUPPORTED_BITS = (8,)


@dataclasses.dataclass(frozen=True)
class CodebookFormat:
  """`m` codebooks of `2**b` centroids of length `v`, scales per `g` inputs.

  Attributes:
    m: number of additive codebooks.
    b: bits per code (2**b centroids per codebook).
    v: centroid length: inputs covered by one code.
    g: inputs per scale; a multiple of `v`.
  """

  m: int = 1
  b: int = 8
  v: int = 4
  g: int = 128

  def __post_init__(self):
    for name in ("m", "b", "v", "g"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"CodebookFormat.{name}={value!r} must be a positive integer")
    if self.b > 16:
      raise ValueError(f"CodebookFormat.b={self.b} must be <= 16")
    if self.g % self.v:
      raise ValueError(f"CodebookFormat.g={self.g} must be a multiple of v={self.v}")

  @classmethod
  def parse(cls, name: str, b: int = 8) -> CodebookFormat:
    """`CodebookFormat.parse("m2v8g128")`."""
    match = re.fullmatch(r"m(\d+)v(\d+)g(\d+)", name)
    if not match:
      raise ValueError(f"format name {name!r} is not of the form 'm<m>v<v>g<g>', "
                       "e.g. 'm1v4g128'")
    m, v, g = map(int, match.groups())
    return cls(m=m, b=b, v=v, g=g)

  @property
  def name(self) -> str:
    return f"m{self.m}v{self.v}g{self.g}"

  @property
  def num_centroids(self) -> int:
    return 2 ** self.b

  @property
  def bits_per_weight(self) -> float:
    return self.m * self.b / self.v + 16 / self.g

  def check_shape(self, k: int, n: int) -> None:
    """Raises unless a [k, n] weight can be stored in this format."""
    if k % self.g or k % self.v:
      raise ValueError(f"input size K={k} must be a multiple of g={self.g} (and v={self.v}) "
                       f"for format {self.name}")
    if n < 1:
      raise ValueError(f"output size N={n} must be positive")

  def check_backend(self, backend: str) -> None:
    """Raises unless the kernels of `backend` ("gpu", "tpu") implement this format."""
    if backend not in BACKEND_SUPPORT:
      raise ValueError(f"backend {backend!r} is not one of {sorted(BACKEND_SUPPORT)}")
    if self.b not in SUPPORTED_BITS or (self.m, self.v) not in BACKEND_SUPPORT[backend]:
      supported = sorted(f"m{m}v{v}" for m, v in BACKEND_SUPPORT[backend])
      raise ValueError(f"format {self.name} with b={self.b} is not implemented by the "
                       f"{backend} kernels (they take b in {SUPPORTED_BITS} with "
                       f"(m, v) in {supported}); the jnp references take any format")


class QuantizedWeight(NamedTuple):
  """A codebook-quantized `[K, N]` weight (a pytree of arrays; see the module docstring).

  Attributes:
    codebooks: f[m, 2**b, v].
    codes: u8[m, K // v, N] (i32 also accepted; b <= 8 fits u8).
    scales: f[K // g, N].
  """

  codebooks: jax.Array
  codes: jax.Array
  scales: jax.Array

  @property
  def fmt(self) -> CodebookFormat:
    m, c, v = self.codebooks.shape
    b = max(int(c).bit_length() - 1, 1)
    k = self.codes.shape[1] * v
    return CodebookFormat(m=m, b=b, v=v, g=k // self.scales.shape[0])

  @property
  def shape(self) -> tuple[int, int]:
    """(K, N) of the dense weight."""
    return self.codes.shape[1] * self.codebooks.shape[2], self.codes.shape[2]


def validate(w: QuantizedWeight, *, check_codes: bool = True) -> CodebookFormat:
  """Checks shapes, dtypes and (if concrete) the code range; returns the format."""
  cb, codes, scales = w
  if cb.ndim != 3:
    raise ValueError(f"codebooks must be [m, 2**b, v], got shape {cb.shape}")
  m, c, v = cb.shape
  if c & (c - 1) or c < 2:
    raise ValueError(f"codebooks has {c} centroids per codebook; it must be a power of two")
  if codes.ndim != 3 or codes.shape[0] != m:
    raise ValueError(f"codes must be [m={m}, K // v, N], got shape {codes.shape}")
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise ValueError(f"codes must be integers (uint8 or int32), got {codes.dtype}")
  _, j, n = codes.shape
  k = j * v
  if scales.ndim != 2 or scales.shape[1] != n or scales.shape[0] < 1 or k % scales.shape[0]:
    raise ValueError(f"scales must be [K // g, N={n}] with K={k}, got shape {scales.shape}")
  fmt = CodebookFormat(m=m, b=c.bit_length() - 1, v=v, g=k // scales.shape[0])
  fmt.check_shape(k, n)
  if check_codes and not isinstance(codes, jax.core.Tracer):  # concrete: check on host
    host = np.asarray(codes)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= c:
      raise ValueError(f"codes must lie in [0, {c}) for {c} centroids; found values in "
                       f"[{lo}, {hi}]")
  return fmt


def random_quantized(key: jax.Array, fmt: CodebookFormat, k: int, n: int,
                     dtype=jnp.float32) -> QuantizedWeight:
  """Random codebooks, codes and positive scales of the right shapes (tests, benchmarks)."""
  fmt.check_shape(k, n)
  k1, k2, k3 = jax.random.split(key, 3)
  cb = jax.random.normal(k1, (fmt.m, fmt.num_centroids, fmt.v), jnp.float32) / fmt.m
  code_dtype = jnp.uint8 if fmt.b <= 8 else jnp.int32
  codes = jax.random.randint(k2, (fmt.m, k // fmt.v, n), 0, fmt.num_centroids,
                             jnp.int32).astype(code_dtype)
  scales = jax.random.uniform(k3, (k // fmt.g, n), jnp.float32, 0.5, 1.5) / jnp.sqrt(k)
  return QuantizedWeight(cb.astype(dtype), codes, scales.astype(dtype))
