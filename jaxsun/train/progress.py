"""Training progress whose rate and ETA leave out compilation, and step timing.

    with Progress(total=400, tokens_per_step=batch * seq_len) as progress:
      for step in range(1, 401):
        state, loss = train_step(state, batch)
        progress.update(step, loss=float(loss))

The first step of a jitted loop includes tracing and XLA compilation, often longer than
hundreds of later steps; averaged in, it makes the ETA wrong for most of the run. So
`Progress` times the first `skip` steps apart (`compile_seconds`) and measures the rate
from the end of that window only. On a terminal it draws a tqdm bar that it creates when
the window ends, with `initial=` the steps already done and `smoothing=0`, so tqdm's own
rate is (n - initial) / elapsed over post-compile steps only (tqdm 4.70
`format_meter`). Elsewhere (CI logs, files) it prints a plain line every `log_every`
steps:

    step 120/400  loss 2.314  1,234 tok/s  ETA 0:01:10

Timing is of the caller's `update` calls: JAX dispatches asynchronously, so a step is
only finished once something waits on its result (`float(loss)`, `jax.block_until_ready`).
Converting a JAX array passed as a metric waits for it, which is such a wait.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

Clock = Callable[[], float]


def model_tflops_per_second(flops_per_step: float, seconds: float) -> float:
  """Model TFLOP/s: the FLOPs of one step (e.g. 6 * params * tokens) over its wall time.

  Args:
    flops_per_step: floating-point operations of one training step.
    seconds: wall-clock seconds of one step.

  Returns:
    flops_per_step / seconds / 1e12.
  """
  if not math.isfinite(flops_per_step) or flops_per_step < 0:
    raise ValueError(f"flops_per_step must be finite and >= 0, got {flops_per_step}")
  if not math.isfinite(seconds) or seconds <= 0:
    raise ValueError(f"seconds must be finite and > 0, got {seconds}")
  return flops_per_step / seconds / 1e12


def format_duration(seconds: float) -> str:
  """H:MM:SS, e.g. 70 -> "0:01:10" (hours are not wrapped into days)."""
  if not math.isfinite(seconds):
    return "?"
  s = max(0, round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _format_value(value: Any) -> str:
  if isinstance(value, str):
    return value
  arr = np.asarray(value)  # a jax.Array waits for its computation here
  if arr.size != 1:
    return str(value)
  arr = arr.reshape(())
  if arr.dtype.kind in "biu":
    return str(int(arr))
  try:
    return f"{float(arr):.4g}"
  except (TypeError, ValueError):
    return str(value)


class Progress:
  """A progress display whose rate and ETA exclude the first (compiling) steps.

  Call `update(step, **metrics)` after each step (or every few steps) with the number of
  steps completed so far. The first `skip` steps after `initial` form the compile
  window: their time is `compile_seconds`, and `steps_per_second` and `eta_seconds` are
  measured from the update that ends the window.

  Args:
    total: the step the run ends at, or None if open-ended (then no ETA).
    skip: steps timed apart as compilation (1: the first step; 0: none).
    log_every: without a terminal, print a line when `step` reaches a multiple of it.
    initial: steps already done when this run starts (a resumed run).
    tokens_per_step: tokens one step processes; adds tok/s to the display.
    flops_per_step: model FLOPs of one step; adds TFLOP/s to the display.
    desc: a label before the bar or each line.
    file: where to write; sys.stderr by default.
    tty: draw a tqdm bar (True) or print lines (False); None asks `file.isatty()`.
    clock: seconds as a float; tests inject a fake one.
  """

  def __init__(self, total: int | None = None, *, skip: int = 1, log_every: int = 10,
               initial: int = 0, tokens_per_step: float | None = None,
               flops_per_step: float | None = None, desc: str = "",
               file: TextIO | None = None, tty: bool | None = None,
               clock: Clock = time.perf_counter):
    if skip < 0:
      raise ValueError(f"skip must be >= 0, got {skip}")
    if log_every < 1:
      raise ValueError(f"log_every must be >= 1, got {log_every}")
    if initial < 0:
      raise ValueError(f"initial must be >= 0, got {initial}")
    if total is not None and total < initial:
      raise ValueError(f"total={total} must be >= initial={initial}")
    for name, value in (("tokens_per_step", tokens_per_step), ("flops_per_step", flops_per_step)):
      if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    self.total, self.skip, self.log_every, self.initial = total, skip, log_every, initial
    self.tokens_per_step, self.flops_per_step, self.desc = tokens_per_step, flops_per_step, desc
    self.file = sys.stderr if file is None else file
    if tty is None:
      try:
        tty = bool(self.file.isatty())
      except (AttributeError, ValueError):  # no isatty, or a closed file
        tty = False
    self.tty = tty
    self._clock = clock
    self._bar = None
    self._closed = False
    self.start()

  def start(self) -> None:
    """Restarts the clock: the compile window is timed from here (and from construction)."""
    self._t0 = self._clock()
    self._step, self._t_step = self.initial, self._t0
    self._metrics: dict[str, str] = {}
    self._logged_step = self.initial
    # The rate is measured from (_mark_step, _mark_t): the end of the compile window.
    self._mark_step, self._mark_t = (self.initial, self._t0) if self.skip == 0 else (None, None)
    self._compile_seconds = 0.0 if self.skip == 0 else None

  @property
  def step(self) -> int:
    """Steps completed at the last update."""
    return self._step

  @property
  def compile_seconds(self) -> float | None:
    """Seconds of the first `skip` steps (compilation included); None until they end."""
    return self._compile_seconds

  @property
  def steps_per_second(self) -> float | None:
    """Steps per second after the compile window, up to the last update; None if unknown."""
    if self._mark_step is None:
      return None
    dt = self._t_step - self._mark_t
    return (self._step - self._mark_step) / dt if dt > 0 and self._step > self._mark_step else None

  @property
  def eta_seconds(self) -> float | None:
    """Seconds left at the post-compile rate; None without a total or a rate."""
    if self.total is None:
      return None
    if self._step >= self.total:
      return 0.0
    rate = self.steps_per_second
    return None if rate is None else (self.total - self._step) / rate

  @property
  def tokens_per_second(self) -> float | None:
    rate = self.steps_per_second
    return None if rate is None or self.tokens_per_step is None else rate * self.tokens_per_step

  @property
  def tflops_per_second(self) -> float | None:
    rate = self.steps_per_second
    if rate is None or self.flops_per_step is None:
      return None
    return model_tflops_per_second(self.flops_per_step, 1.0 / rate)

  def update(self, step: int, **metrics: Any) -> None:
    """Records that `step` steps are done, with metrics to show (Python or array scalars).

    Args:
      step: steps completed so far (absolute: counts `initial`); increases every call.
      **metrics: name -> value shown after the step count; strings are shown as is.
    """
    if self._closed:
      raise ValueError("Progress is closed")
    if step <= self._step:
      raise ValueError(f"step must increase: got step={step} after {self._step}")
    if self.total is not None and step > self.total:
      raise ValueError(f"step={step} exceeds total={self.total}")
    now = self._clock()
    prev, self._step, self._t_step = self._step, step, now
    self._metrics = {k: _format_value(v) for k, v in metrics.items()}
    ends_window = self._mark_step is None and step >= self.initial + self.skip
    if ends_window:
      self._compile_seconds = now - self._t0
      self._mark_step, self._mark_t = step, now
    if self.tty:
      self._update_bar(ends_window)
    elif ends_window or step // self.log_every > prev // self.log_every or step == self.total:
      self._print_line(compile_line=ends_window)

  def write(self, message: str) -> None:
    """Prints a message without breaking the bar."""
    if self._bar is not None:
      self._bar.write(message, file=self.file)
    else:
      print(message, file=self.file, flush=True)

  def _rate_parts(self) -> list[str]:
    parts = []
    if self.tokens_per_second is not None:
      parts.append(f"{self.tokens_per_second:,.0f} tok/s")
    elif self.steps_per_second is not None:
      parts.append(f"{self.steps_per_second:.3g} step/s")
    if self.tflops_per_second is not None:
      parts.append(f"{self.tflops_per_second:.3g} TFLOP/s")
    return parts

  def _print_line(self, compile_line: bool = False) -> None:
    count = f"{self._step}/{self.total}" if self.total is not None else str(self._step)
    parts = [f"{self.desc}: step {count}" if self.desc else f"step {count}"]
    parts += [f"{k} {v}" for k, v in self._metrics.items()]
    if compile_line:
      parts.append(f"compile {self._compile_seconds:.1f}s")
    else:
      parts += self._rate_parts()
      if self.eta_seconds is not None:
        parts.append(f"ETA {format_duration(self.eta_seconds)}")
    print("  ".join(parts), file=self.file, flush=True)
    self._logged_step = self._step

  def _update_bar(self, ends_window: bool) -> None:
    if ends_window:
      # Created only now, so its clock starts after compilation; smoothing=0 makes tqdm's
      # rate (n - initial) / elapsed, the post-compile average.
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self._bar = tqdm(total=self.total, initial=self._step, smoothing=0, file=self.file,
                       desc=self.desc or None, unit="step", dynamic_ncols=True)
    if self._bar is None:
      return
    postfix = [f"{k}={v}" for k, v in self._metrics.items()]
    if self.tokens_per_second is not None:
      postfix.append(f"{self.tokens_per_second:,.0f} tok/s")
    if ends_window:
      postfix.append(f"compile {self._compile_seconds:.1f}s")
    self._bar.set_postfix_str(", ".join(postfix), refresh=False)
    self._bar.update(self._step - self._bar.n)

  def close(self) -> None:
    """Ends the display; without a terminal, prints the last update if it was not shown."""
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif not self.tty and self._step != self._logged_step:
      self._print_line()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class StepTimer:
  """Wall time of steps, the first `skip` kept apart as compilation.

      timer = StepTimer()
      for batch in batches:
        with timer:
          state, loss = train_step(state, batch)
          jax.block_until_ready(loss)   # the caller decides what "done" means
      print(timer.mean_seconds, timer.compile_seconds)

  Args:
    skip: how many first steps count as compilation, not as steady-state steps.
    clock: seconds as a float; tests inject a fake one.
  """

  def __init__(self, *, skip: int = 1, clock: Clock = time.perf_counter):
    if skip < 0:
      raise ValueError(f"skip must be >= 0, got {skip}")
    self.skip = skip
    self._clock = clock
    self._start: float | None = None
    self.times: list[float] = []

  def start(self) -> None:
    self._start = self._clock()

  def stop(self) -> float:
    """Ends the step begun by `start`; returns its seconds."""
    if self._start is None:
      raise RuntimeError("StepTimer.stop() without start()")
    seconds = self._clock() - self._start
    self._start = None
    self.times.append(seconds)
    return seconds

  def __enter__(self) -> StepTimer:
    self.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self.stop()

  @property
  def count(self) -> int:
    """Steps timed, compile window included."""
    return len(self.times)

  @property
  def last_seconds(self) -> float | None:
    return self.times[-1] if self.times else None

  @property
  def compile_seconds(self) -> float:
    """Total seconds of the first `skip` steps (those timed so far)."""
    return sum(self.times[:self.skip])

  @property
  def mean_seconds(self) -> float | None:
    """Mean seconds of the steps after the first `skip`; None if there are none yet."""
    steady = self.times[self.skip:]
    return sum(steady) / len(steady) if steady else None
