"""The microbenchmarks: GEMMs, elementwise, streaming, gather / scatter, collectives.

Imports jax only. `run.py` is the command; these functions are importable. Every figure
is reported with its FLOP / byte count (`counts`), the achieved rate, and the fraction
of the device's stated peak (`peaks`) where known, else of the measured roofline (the
best rate this run measured for that resource).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments.benchmarks import common
from experiments.benchmarks.micro import counts, peaks

GEMM_DTYPES = ("float32", "bfloat16", "int8", "float8_e4m3fn")


def _timed(fn, args, reps, trials):
  return common.time_per_call(fn, args, reps=reps, trials=trials)


def gemm(shapes, dtypes=GEMM_DTYPES, *, reps=5, trials=3) -> list[dict]:
  """Throughput of [M, K] x [K, N] per dtype (int8 accumulates in int32, others in f32)."""
  out = []
  key = jax.random.key(0)
  for dtype in dtypes:
    for m, k, n in shapes:
      a = jax.random.normal(key, (m, k), jnp.float32)
      b = jax.random.normal(jax.random.fold_in(key, 1), (k, n), jnp.float32)
      if dtype == "int8":
        a, b = (jnp.clip(jnp.round(x * 30), -127, 127).astype(jnp.int8) for x in (a, b))
        acc = jnp.int32
      else:
        a, b = a.astype(dtype), b.astype(dtype)
        acc = jnp.float32
      fn = functools.partial(jnp.dot, preferred_element_type=acc)
      rec = {"op": "gemm", "dtype": dtype, "m": m, "k": k, "n": n}
      try:
        t = _timed(fn, (a, b), reps, trials)
      except Exception as e:  # pylint: disable=broad-except
        out.append({**rec, "supported": False, "error": f"{type(e).__name__}: {e}"[:200]})
        continue
      flops = counts.gemm_flops(m, k, n)
      nbytes = counts.gemm_bytes(m, k, n, jnp.dtype(dtype).itemsize, jnp.dtype(acc).itemsize)
      out.append({**rec, "supported": True, "seconds": t, "flops": flops, "bytes": nbytes,
                  "intensity": counts.arithmetic_intensity(flops, nbytes),
                  "tflops": flops / t / 1e12})
  return out


def elementwise(sizes, *, reps=5, trials=3) -> list[dict]:
  """f32 streaming ops over `sizes` elements: copy (x * 1.0001), axpy (2 inputs), gelu."""
  ops = {"scale": (1, lambda x, y: x * 1.0001), "axpy": (2, lambda x, y: 2.0 * x + y),
         "gelu": (1, lambda x, y: jax.nn.gelu(x))}
  out = []
  for n in sizes:
    x = jax.random.normal(jax.random.key(1), (n,), jnp.float32)
    y = jax.random.normal(jax.random.key(2), (n,), jnp.float32)
    for name, (n_in, fn) in ops.items():
      t = _timed(fn, (x, y), reps, trials)
      nbytes = counts.elementwise_bytes(n, 4, n_inputs=n_in)
      out.append({"op": name, "elements": n, "bytes": nbytes, "seconds": t,
                  "gbps": nbytes / t / 1e9})
  return out


def gather_scatter(vector_bytes, *, table_bytes=1 << 24, rows=4096, reps=5, trials=3
                   ) -> list[dict]:
  """Embedding-style gather and scatter-add of `rows` random rows of `vector_bytes`."""
  out = []
  for vb in vector_bytes:
    d = max(1, vb // 4)
    n_rows = max(rows, table_bytes // (4 * d))
    table = jax.random.normal(jax.random.key(3), (n_rows, d), jnp.float32)
    idx = jax.random.randint(jax.random.key(4), (rows,), 0, n_rows)
    upd = jax.random.normal(jax.random.key(5), (rows, d), jnp.float32)
    t_g = _timed(lambda tb, i: jnp.take(tb, i, axis=0), (table, idx), reps, trials)
    t_s = _timed(lambda tb, i, u: tb.at[i].add(u), (table, idx, upd), reps, trials)
    for op, t, nbytes in (("gather", t_g, counts.gather_bytes(rows, 4 * d)),
                          ("scatter_add", t_s, counts.scatter_add_bytes(rows, 4 * d))):
      out.append({"op": op, "vector_bytes": 4 * d, "rows": rows, "bytes": nbytes,
                  "seconds": t, "gbps": nbytes / t / 1e9})
  return out


def collectives(sizes_bytes, *, reps=5, trials=3) -> list[dict]:
  """all-reduce / all-gather / reduce-scatter / all-to-all over every local device.

  `sizes_bytes` is the buffer on each device (all-gather: its output).
  """
  devs = np.array(jax.devices())
  n = devs.size
  mesh = Mesh(devs, ("d",))
  out = []
  for size in sizes_bytes:
    per = max(n, (size // 4) // n * n)  # f32 elements per device, a multiple of n
    x = jax.device_put(jax.random.normal(jax.random.key(6), (n * per,), jnp.float32),
                       NamedSharding(mesh, P("d")))
    xg = jax.device_put(jax.random.normal(jax.random.key(7), (per,), jnp.float32),
                        NamedSharding(mesh, P("d")))
    ops = {
        "all_reduce": (x, lambda v: jax.lax.psum(v, "d"), P("d"), per * 4),
        "all_gather": (xg, lambda v: jax.lax.all_gather(v, "d", tiled=True), P("d"),
                       per * 4),
        "reduce_scatter": (x, lambda v: jax.lax.psum_scatter(v, "d", tiled=True), P("d"),
                           per * 4),
        "all_to_all": (x, lambda v: jax.lax.all_to_all(v.reshape(n, -1), "d", 0, 0,
                                                       tiled=True).reshape(-1),
                       P("d"), per * 4),
    }
    for kind, (arr, body, spec, buf) in ops.items():
      fn = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=P("d"))
      t = _timed(fn, (arr,), reps, trials)
      bus = counts.collective_bus_bytes(kind, buf, n)
      out.append({"op": kind, "devices": n, "buffer_bytes": buf, "bus_bytes": bus,
                  "seconds": t, "bus_gbps": bus / t / 1e9})
  return out


def add_fractions(result: dict) -> dict:
  """Fractions of the stated peak (when `peaks` knows the device) or of the measured
  roofline: the best GEMM rate of each dtype, the best streaming bandwidth."""
  kind = result["machine"]["device_kind"]
  best = {}
  for r in result["gemm"]:
    if r.get("supported"):
      best[r["dtype"]] = max(best.get(r["dtype"], 0.0), r["tflops"])
  for r in result["gemm"]:
    if not r.get("supported"):
      continue
    peak = peaks.peak_tflops(kind, r["dtype"])
    r["fraction"] = r["tflops"] / (peak or best[r["dtype"]])
    r["fraction_of"] = "stated peak" if peak else "measured roofline"
  stream = max((r["gbps"] for r in result["elementwise"]), default=0.0)
  hbm = peaks.peak_hbm_gbps(kind)
  result["roofline"] = {"gemm_tflops": best, "stream_gbps": stream,
                        "stated_hbm_gbps": hbm}
  for r in result["elementwise"] + result["gather_scatter"]:
    r["fraction"] = r["gbps"] / (hbm or stream)
    r["fraction_of"] = "stated peak" if hbm else "measured roofline"
  return result
