"""The CUDA Psumbook GEMV (`cuda/psumbook_gemv.cu`) through the XLA FFI, and its CPU twin.

    y = psumbook_gemv_ffi(x, w)            # f32[B, N], B <= 16; builds on first use
    p = plan(1, 4096, 14336, fmt)          # the kernel's grid and tiling (same C++ code)
    c = cost(1, 4096, 14336, fmt)          # bytes, FLOPs and the time they bound

On a GPU the kernel is compiled with nvcc for sm_90a (Hopper); elsewhere the same source
is compiled with g++ (`-DPSUMBOOK_CPU`) into a twin that runs the CUDA kernel's phase
functions CTA by CTA and thread by thread (the same planner, stage ring, 16-byte code
copies, Psumbook build and lookups), so CPU tests check its indexing, layouts and the FFI
binding. Builds are cached under `$JAXSUN_FFI_CACHE` (default `~/.cache/jaxsun/ffi`),
keyed by the source, the flags and the jaxlib version (the FFI ABI follows the headers:
build against the jaxlib that runs it).
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

from pallas_kernels import _util
from pallas_kernels.psumbook_gemm.format import CodebookFormat, QuantizedWeight, validate

SOURCE = pathlib.Path(__file__).parent / "cuda" / "psumbook_gemv.cu"
TILE_K = 32  # the kernel's K tile (kTileK): g must be a multiple of it
MAX_BATCH = 16
N_MULTIPLE = 16  # N the kernel takes unpadded: whole 16-byte code copies
DEFAULT_SMS = 132  # kDefaultSms: H100 SXM / H200 (the CUDA path asks the device)
# Psumbook entry types (`psum_dtype` attribute). f16/bf16 halve the shared memory and the
# lookup bytes; the partial sums stay f32. Error budgets tested against the f32 reference
# (max |err| / max |y|, K = 2048): f32 < 2e-5, f16 < 2e-3, bf16 < 1.5e-2. f16 entries
# overflow past 65504: activation chunks times centroids must stay below it.
PSUM_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
_TARGETS = {"cpu": ("jaxsun_psumbook_gemv_cpu", "PsumbookGemvCpu"),
            "cuda": ("jaxsun_psumbook_gemv_cuda", "PsumbookGemvCuda")}
_PLAN_FIELDS = ("bp", "opt", "bn", "rows", "s_b", "s_k", "s_n", "tiles_per_slice",
                "blocks_per_cta", "chunk_tiles", "stage_bytes", "p_bytes", "smem_bytes",
                "grid")
_registered: set[str] = set()
_cpu_lib: ctypes.CDLL | None = None


def _compile_command(platform: str, out: str) -> list[str]:
  inc = jax.ffi.include_dir()
  if platform == "cuda":
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    # -gencode, not -arch=sm_90a: the shorthand also runs a plain sm_90 pass (HOPPER.md).
    return [nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC",
            "-gencode=arch=compute_90a,code=sm_90a", "-diag-suppress", "940,2473",
            f"-I{inc}", str(SOURCE), "-o", out]
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


def _psum_code(psumbook_dtype) -> int:
  name = jnp.dtype(psumbook_dtype).name
  if name not in PSUM_DTYPES:
    raise ValueError(f"psumbook_dtype={psumbook_dtype!r} is not one of {sorted(PSUM_DTYPES)}")
  return PSUM_DTYPES[name]


def plan(m: int, k: int, n: int, fmt: CodebookFormat, *, psumbook_dtype="float32",
         num_sms: int = DEFAULT_SMS, k_block: int | None = None,
         smem_budget: int | None = None) -> dict[str, int]:
  """The kernel's grid and tiling for x[m, k] @ W[k, n], from the kernel's own planner.

  Calls `PsumbookPlan` in the CPU build of `cuda/psumbook_gemv.cu` (the function the
  CUDA handler runs), so what this returns is what a GPU with `num_sms` SMs launches.

  Args:
    m: batch rows of x (not `fmt.m`, the number of codebooks); 1..16.
    k, n: the weight's inputs and outputs (n padded to a multiple of 16 as the wrapper does).
    fmt: the weight format (b = 8, v dividing 32, g a multiple of 32).
    psumbook_dtype: "float32", "float16" or "bfloat16" Psumbook entries.
    num_sms: the SM count the grid is sized for.
    k_block: forced K slice per CTA (a multiple of 32 dividing k); None: the planner's.
    smem_budget: shared-memory bytes per CTA; None: the kernel's (two CTAs per SM).

  Returns:
    bp (padded batch rows per CTA), opt (outputs per thread), bn (outputs per N block),
    rows (code rows per K tile), s_b / s_k / s_n (batch, K and N splits), grid (CTAs),
    tiles_per_slice (K tiles per CTA), blocks_per_cta (N blocks sharing one Psumbook),
    chunk_tiles (tiles per Psumbook build), stage_bytes, p_bytes, smem_bytes.
  """
  global _cpu_lib
  if _cpu_lib is None:
    _cpu_lib = ctypes.cdll.LoadLibrary(str(build("cpu")))
  out = (ctypes.c_int * len(_PLAN_FIELDS))()
  err = ctypes.create_string_buffer(256)
  rc = _cpu_lib.PsumbookPlan(m, k, _util.round_up(n, N_MULTIPLE), fmt.m, fmt.v, fmt.g,
                             _psum_code(psumbook_dtype), num_sms, k_block or 0,
                             smem_budget or 0, out, err, len(err))
  if rc:
    raise ValueError(f"psumbook_gemv plan: {err.value.decode()}")
  return dict(zip(_PLAN_FIELDS, list(out)))


def cost(m: int, k: int, n: int, fmt: CodebookFormat, *, psumbook_dtype="float32",
         num_sms: int = DEFAULT_SMS, bandwidth: float = 4.8e12,
         peak_flops: float = 67e12) -> dict[str, float]:
  """Bytes, FLOPs and the time they bound for one `psumbook_gemv_ffi` call.

  The defaults are an H200 (HBM3e 4.8 TB/s; 67 TFLOP/s of f32 FMA on the CUDA cores,
  which the lookups and the build use: no tensor cores). For an H100 SXM pass
  `bandwidth=3.35e12`. A measured time divided by `time_s` is the fraction of the limit.

  Args:
    m: batch rows of x (not `fmt.m`, the number of codebooks).
    k, n: the weight's inputs and outputs.
    fmt: the weight format.
    psumbook_dtype, num_sms: as in `plan` (they decide the grid, hence the build work).
    bandwidth: device-memory bytes per second.
    peak_flops: f32 FLOP/s of the CUDA cores.

  Returns:
    hbm_bytes (codes + f32 scales + codebooks + x read, f32 y written; codes once: batch
    slices of one tile meet in L2), code_bytes, flops (Psumbook build 2 per FMA, lookups 1
    add per code and row, the scale FMAs), dense_flops (2 m k n, for a GEMV's usual
    figure), build_entries, lookups, atomic_adds (f32 outputs added into y: s_k per
    output), grid, time_bytes_s, time_flops_s, time_s (the larger of the two).
  """
  p = plan(m, k, n, fmt, psumbook_dtype=psumbook_dtype, num_sms=num_sms)
  n16 = _util.round_up(n, N_MULTIPLE)
  code_bytes = fmt.m * (k // fmt.v) * n16
  hbm = (code_bytes + 4 * (k // fmt.g) * n16 + 4 * fmt.m * fmt.num_centroids * fmt.v
         + 4 * m * k + 4 * m * n16)
  # Every N range builds the Psumbook of every K tile once (per batch slice).
  build_entries = p["s_b"] * p["s_n"] * (k // TILE_K) * p["rows"] * 256 * p["bp"]
  lookups = m * fmt.m * (k // fmt.v) * n16
  flops = 2 * build_entries * fmt.v + lookups + 2 * m * n16 * (k // TILE_K)
  t_bytes, t_flops = hbm / bandwidth, flops / peak_flops
  return {"hbm_bytes": float(hbm), "code_bytes": float(code_bytes), "flops": float(flops),
          "dense_flops": 2.0 * m * k * n, "build_entries": float(build_entries),
          "lookups": float(lookups), "atomic_adds": float(p["s_k"] * m * n16),
          "grid": float(p["grid"]), "time_bytes_s": t_bytes, "time_flops_s": t_flops,
          "time_s": max(t_bytes, t_flops)}


def psumbook_gemv_ffi(x: jax.Array, w: QuantizedWeight, *, k_block: int | None = None,
                      platform: str | None = None, psumbook_dtype="float32",
                      num_sms: int | None = None,
                      smem_budget: int | None = None) -> jax.Array:
  """f32[B, N] = x @ W by the CUDA kernel (or its CPU twin), for 1 <= B <= 16.

  The raw kernel: `psumbook_matmul(x, w, backend="ffi")` takes any B (chunks of 16).
  N that is not a multiple of 16 is padded here (a copy of the weight per call: store
  weights with N % 16 == 0 to avoid it). The split-K sums are added into the output by
  the kernel (atomics on the GPU), so GPU results vary in the last bits between runs.

  Args:
    x: f32/bf16[B, K].
    w: the quantized weight; b = 8, v divides 32, g a multiple of 32.
    k_block: inputs per CTA (split-K); a multiple of 32 dividing K. Default: the
      planner's (`plan`): the widest slice whose Psumbook fits in shared memory, split
      further until the grid has two CTAs per SM.
    platform: "cuda" or "cpu" (default: the default backend's).
    psumbook_dtype: Psumbook entry type, "float32" (default), "float16" or "bfloat16"
      (see `PSUM_DTYPES` for the accuracy each gives).
    num_sms: SM count to size the grid for; default: the device's (CUDA), 132 (CPU twin).
    smem_budget: shared-memory bytes per CTA (tests: small budgets force the Psumbook to
      be rebuilt in chunks); default: two CTAs per SM.
  """
  fmt = validate(w)
  b, k = x.shape
  n = w.shape[1]
  if x.shape[1] != w.shape[0]:
    raise ValueError(f"x has {x.shape[1]} inputs but the weight has K={w.shape[0]}")
  if not 1 <= b <= MAX_BATCH:
    raise ValueError(f"the FFI GEMV takes batches of 1..{MAX_BATCH} rows, got {b}")
  if fmt.num_centroids != 256 or TILE_K % fmt.v or fmt.g % TILE_K:
    raise ValueError(f"the FFI GEMV needs b=8, v dividing {TILE_K} and g a multiple of "
                     f"{TILE_K}; got {fmt.name} (b={fmt.b})")
  if k_block is not None and (k_block < TILE_K or k_block % TILE_K or k % k_block):
    raise ValueError(f"k_block={k_block} must be a multiple of {TILE_K} that divides K={k}")
  code = _psum_code(psumbook_dtype)
  n_pad = _util.round_up(n, N_MULTIPLE)
  cb, codes, scales = w
  if n_pad != n:  # code 0 (a valid centroid) times scale 0
    codes = _util.pad_to(codes, (codes.shape[0], codes.shape[1], n_pad))
    scales = _util.pad_to(scales, (scales.shape[0], n_pad))
  name = register(platform or default_platform())
  y = jax.ffi.ffi_call(
      name, jax.ShapeDtypeStruct((b, n_pad), jnp.float32), vmap_method="sequential")(
          x.astype(jnp.float32), cb.astype(jnp.float32), codes.astype(jnp.uint8),
          scales.astype(jnp.float32), k_block=np.int64(k_block or 0),
          psum_dtype=np.int64(code), num_sms=np.int64(num_sms or 0),
          smem_budget=np.int64(smem_budget or 0))
  return y if n_pad == n else y[:, :n]
