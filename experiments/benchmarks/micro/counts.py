"""FLOP and byte counts of the microbenchmarks' primitives (pure Python, no jax).

Conventions (the usual ones of roofline work, e.g. the Gaudi-2 vs A100 study, papers.md
§9): a GEMM [M, K] x [K, N] does 2MNK FLOPs and moves each operand and the output once;
an elementwise op reads its inputs and writes its output once; a gather of `rows` rows
of `row_bytes` reads the indices, the rows and writes them; collectives count the bytes
each device sends over the links in the bandwidth-optimal (ring) algorithms:

    all-reduce       2 (n - 1) / n * S      S = the buffer on each device
    all-gather       (n - 1) / n * S        S = the gathered output on each device
    reduce-scatter   (n - 1) / n * S        S = the input on each device
    all-to-all       (n - 1) / n * S        S = the buffer on each device

("bus bytes" in NCCL's terms: bus bandwidth = these bytes / time).
"""

from __future__ import annotations

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def gemm_flops(m: int, k: int, n: int) -> int:
  return 2 * m * k * n


def gemm_bytes(m: int, k: int, n: int, in_bytes: int, out_bytes: int) -> int:
  """Operands read once and the output written once (the minimum traffic)."""
  return (m * k + k * n) * in_bytes + m * n * out_bytes


def arithmetic_intensity(flops: int, nbytes: int) -> float:
  return flops / nbytes


def elementwise_bytes(n: int, itemsize: int, n_inputs: int = 1, n_outputs: int = 1) -> int:
  return n * itemsize * (n_inputs + n_outputs)


def gather_bytes(rows: int, row_bytes: int, index_bytes: int = 4) -> int:
  """Embedding-style gather: read the indices and the rows, write the rows."""
  return rows * index_bytes + 2 * rows * row_bytes


def scatter_add_bytes(rows: int, row_bytes: int, index_bytes: int = 4) -> int:
  """Scatter-add of `rows` updates: read indices and updates, read-modify-write the rows."""
  return rows * index_bytes + 3 * rows * row_bytes


def collective_bus_bytes(kind: str, size_bytes: int, n: int) -> float:
  """Bytes each device sends in the ring algorithm (see the module docstring)."""
  if kind not in COLLECTIVES:
    raise ValueError(f"kind={kind!r} is not one of {COLLECTIVES}")
  if n < 1:
    raise ValueError(f"n={n} devices must be >= 1")
  factor = 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
  return factor * size_bytes
