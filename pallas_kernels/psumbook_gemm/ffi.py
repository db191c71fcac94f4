"""The CUDA Psumbook GEMV (`cuda/psumbook_gemv.cu`) through the XLA FFI, and its CPU twin.

    y = psumbook_gemv_ffi(x, w)            # f32[B, N], B <= 16; builds on first use

On a GPU the kernel is compiled with nvcc for sm_90a (Hopper); elsewhere the same source
is compiled with g++ (`-DPSUMBOOK_CPU`) into a twin that runs the CUDA kernel's phase
functions block by block and thread by thread, so CPU tests check its indexing, layouts
and the FFI binding. Builds are cached under `$JAXSUN_FFI_CACHE` (default
`~/.cache/jaxsun/ffi`), keyed by the source, the flags and the jaxlib version (the FFI
ABI follows the headers: build against the jaxlib that runs it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.psumbook_gemm.format import QuantizedWeight, validate

SOURCE = pathlib.Path(__file__).parent / "cuda" / "psumbook_gemv.cu"
TILE_K = 32  # the kernel's Psumbook sub-tile (kTileK)
MAX_BATCH = 16
N_MULTIPLE = 4  # outputs per thread's 32-bit code load
_TARGETS = {"cpu": ("jaxsun_psumbook_gemv_cpu", "PsumbookGemvCpu"),
            "cuda": ("jaxsun_psumbook_gemv_cuda", "PsumbookGemvCuda")}
_registered: set[str] = set()


def _compile_command(platform: str, out: str) -> list[str]:
  inc = jax.ffi.include_dir()
  if platform == "cuda":
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    return [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-arch=sm_90a",
            "-diag-suppress", "940,2473", f"-I{inc}", str(SOURCE), "-o", out]
  cxx = os.environ.get("CXX", "g++")
  return [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-x", "c++", "-DPSUMBOOK_CPU",
          "-w", f"-I{inc}", str(SOURCE), "-o", out]


def build(platform: str) -> pathlib.Path:
  """Compiles the library for "cpu" or "cuda" unless cached; returns its path."""
  if platform not in _TARGETS:
    raise ValueError(f"platform={platform!r} is not one of {sorted(_TARGETS)}")
  probe = _compile_command(platform, "OUT")
  key = hashlib.sha256(SOURCE.read_bytes() + " ".join(probe).encode()
                       + jax.lib.__version__.encode()).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("JAXSUN_FFI_CACHE",
                                      pathlib.Path.home() / ".cache" / "jaxsun" / "ffi"))
  lib = cache / f"libpsumbook_gemv_{platform}_{key}.so"
  if lib.exists():
    return lib
  cache.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
  os.close(fd)
  try:
    proc = subprocess.run(_compile_command(platform, tmp), capture_output=True, text=True)
    if proc.returncode:
      raise RuntimeError(f"building {SOURCE.name} for {platform} failed:\n"
                         f"{' '.join(_compile_command(platform, tmp))}\n{proc.stderr[-4000:]}")
    os.replace(tmp, lib)  # atomic: concurrent builders never see half a library
  finally:
    pathlib.Path(tmp).unlink(missing_ok=True)
  return lib


def register(platform: str) -> str:
  """Builds and registers the FFI target for `platform`; returns the target name."""
  name, symbol = _TARGETS[platform]
  if name not in _registered:
    lib = ctypes.cdll.LoadLibrary(str(build(platform)))
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="CUDA" if platform == "cuda" else "cpu")
    _registered.add(name)
  return name


def default_platform() -> str:
  return "cuda" if jax.default_backend() == "gpu" else "cpu"


def psumbook_gemv_ffi(x: jax.Array, w: QuantizedWeight, *, k_block: int | None = None,
                      platform: str | None = None) -> jax.Array:
  """f32[B, N] = x @ W by the CUDA kernel (or its CPU twin), for 1 <= B <= 16.

  The raw kernel: `psumbook_matmul(x, w, backend="ffi")` takes any B and N (it pads N
  to a multiple of 4 and runs batches in chunks of 16).

  Args:
    x: f32/bf16[B, K].
    w: the quantized weight; b = 8, v divides 32, g a multiple of 32, N a multiple of 4.
    k_block: inputs per CUDA block (split-K; the splits are summed by XLA, so the result
      is deterministic); a multiple of 32 dividing K. Default: the largest of 1024, 512,
      256, 128, 64, 32 that divides K.
    platform: "cuda" or "cpu" (default: the default backend's).
  """
  fmt = validate(w)
  b, k = x.shape
  n = w.shape[1]
  if x.shape[1] != w.shape[0]:
    raise ValueError(f"x has {x.shape[1]} inputs but the weight has K={w.shape[0]}")
  if not 1 <= b <= MAX_BATCH:
    raise ValueError(f"the FFI GEMV takes batches of 1..{MAX_BATCH} rows, got {b}")
  if fmt.num_centroids != 256 or TILE_K % fmt.v or fmt.g % TILE_K or n % N_MULTIPLE:
    raise ValueError(f"the FFI GEMV needs b=8, v dividing {TILE_K}, g a multiple of "
                     f"{TILE_K} and N a multiple of 4; got {fmt.name} (b={fmt.b}), N={n}")
  if k_block is None:
    k_block = next(kb for kb in (1024, 512, 256, 128, 64, 32) if k % kb == 0)
  if k_block % TILE_K or k % k_block:
    raise ValueError(f"k_block={k_block} must be a multiple of {TILE_K} that divides K={k}")
  name = register(platform or default_platform())
  partial = jax.ffi.ffi_call(
      name, jax.ShapeDtypeStruct((k // k_block, b, n), jnp.float32),
      vmap_method="sequential")(
          x.astype(jnp.float32), w.codebooks.astype(jnp.float32),
          w.codes.astype(jnp.uint8), w.scales.astype(jnp.float32),
          k_block=np.int64(k_block))
  return partial.sum(axis=0)
