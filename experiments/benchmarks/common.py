"""What the benchmarks share: timing with dispatch amortised, machine facts, output files.

Imports jax only (the GPU machines have no ml-collections, tfds or grain).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from jax import lax

RESULTS = pathlib.Path(__file__).parent / "results"


def time_per_call(fn, args: tuple, *, reps: int, trials: int) -> float:
  """Median seconds per call of `fn(*args)`, `reps` calls inside one jitted loop.

  The arguments pass an `optimization_barrier` together with the loop index, so XLA
  cannot hoist the call out of the loop, and the *whole* output is summed, so it cannot
  shrink the call to the few elements a slice would read (XLA rewrites slice(dot) into a
  smaller dot). The sum adds one read of the output per call.
  """

  @jax.jit
  def many(*args):
    def body(i, acc):
      xs = lax.optimization_barrier((args, i))[0]
      return acc + jnp.sum(fn(*xs).astype(jnp.float32))
    return lax.fori_loop(0, reps, body, jnp.zeros((), jnp.float32))

  many(*args).block_until_ready()  # compile
  times = []
  for _ in range(trials):
    t0 = time.perf_counter()
    many(*args).block_until_ready()
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def interleaved_trials(paths: dict, trials: int) -> tuple[dict, dict]:
  """Times several paths round-robin, so a noisy neighbour hits each of them alike.

  Each path is a function returning (seconds, output); it runs once to compile, then
  `trials` times, interleaved with the others. Returns ({name: [seconds]}, {name: last
  output}).
  """
  for fn in paths.values():
    fn()  # compile
  times = {name: [] for name in paths}
  outputs = {}
  for _ in range(trials):
    for name, fn in paths.items():
      dt, outputs[name] = fn()
      times[name].append(dt)
  return times, outputs


def copy_bandwidth(nbytes: int, *, trials: int, reps: int = 10) -> float:
  """GB/s (read + write) of a device copy of `nbytes` bytes, amortised like the kernels.

  `reps` copies run inside one jitted loop; each writes its input with the two halves
  swapped (`jnp.roll` by half: a pure copy, no arithmetic) into a new buffer, and an
  `optimization_barrier` per step keeps XLA from folding consecutive copies. The
  median over `trials` of (loop time / reps) gives 2 * nbytes / time. Random-looking
  data (an iota), not zeros.
  """
  n = max(nbytes // 4, 2)
  a = jnp.arange(n, dtype=jnp.float32)

  @jax.jit
  def many(a):
    def body(_, x):
      return jnp.roll(lax.optimization_barrier(x), n // 2)
    return lax.fori_loop(0, reps, body, a)

  many(a).block_until_ready()  # compile
  times = []
  for _ in range(max(trials, 3)):
    t0 = time.perf_counter()
    many(a).block_until_ready()
    times.append((time.perf_counter() - t0) / reps)
  return 2 * n * 4 / statistics.median(times) / 1e9


def environment(**extra) -> dict:
  """The header every result file carries: date, machine and versions."""
  dev = jax.devices()[0]
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": {"device_kind": dev.device_kind, "platform": dev.platform,
                      "num_devices": jax.device_count(), "host": platform.node()},
          "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__,
                       "python": platform.python_version()}, **extra}


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` via a temporary file and a rename: never half a result file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_results(result: dict, markdown: str, *, name: str, tiny: bool,
                  out: str | os.PathLike) -> pathlib.Path:
  """`<out>/<name>_[tiny_]<device kind>.json` and `.md`; returns the JSON path."""
  kind = result["machine"]["device_kind"].replace(" ", "_").lower()
  stem = f"{name}_{'tiny_' if tiny else ''}{kind}"
  out = pathlib.Path(out)
  write_atomic(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
  write_atomic(out / f"{stem}.md", markdown)
  print(f"wrote {out / (stem + '.json')} and .md")
  return out / f"{stem}.json"
