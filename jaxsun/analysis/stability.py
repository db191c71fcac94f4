"""Training-stability measures on per-step scalar series (loss, gradient norm).

The Affine-Scaled Attention paper (papers.md §2.4, Tables 4-5) compares variants by

  * the variance of the gradient norm over steps 0-500: `grad_norm_variance`, and
  * the number of loss spikes, a spike being a step whose loss exceeds
    median + k * MAD, for k = 6 and k = 9: `loss_spikes`.

The paper does not say over which steps its median and MAD are taken. A loss that
falls during training makes a global median a poor reference (early steps all sit
above it), so `loss_spikes` by default compares each step with the trailing window of
the steps before it; `window=None` gives the global definition, and `detrend`
subtracts a trailing median first (see `loss_spikes` for the exact rules).

Series are 1-D sequences indexed by position; `steps` (optional) gives each
position's training step when the series was logged sparsely or does not start at 0.
Everything is computed in float64 NumPy.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _series(name: str, x: Any) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be a 1-D series, got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{name} must be non-empty")
  return arr


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name}={value!r} must be a positive integer")
  return int(value)


def _range_mask(n: int, start: int, stop: int | None, steps: Any) -> np.ndarray:
  """bool[n]: the positions whose step (or index, without `steps`) is in [start, stop)."""
  if steps is None:
    at = np.arange(n)
  else:
    at = np.asarray(steps)
    if at.shape != (n,):
      raise ValueError(f"steps must have shape {(n,)} like the series, got {at.shape}")
  mask = at >= start
  if stop is not None:
    mask &= at < stop
  return mask


def rolling_variance(x: Any, window: int) -> np.ndarray:
  """Population variance (ddof=0) of every full window of `window` consecutive values.

  Args:
    x: f64[n] series.
    window: window length, 1 <= window <= n.

  Returns:
    f64[n - window + 1]; element i is `np.var(x[i:i + window])`.
  """
  x = _series("x", x)
  window = _positive_int("window", window)
  if window > x.size:
    raise ValueError(f"window={window} is longer than the series ({x.size} values)")
  return np.var(sliding_window_view(x, window), axis=-1)


def grad_norm_variance(grad_norms: Any, window: int | None = None, start: int = 0,
                       stop: int | None = None, *, steps: Any = None) -> float:
  """Variance (ddof=0) of the gradient norms of the steps in [start, stop).

  The paper reports the variance over steps 0-500 (start=0, stop=501 for a series
  logged every step from step 0).

  Args:
    grad_norms: f64[n], one value per logged step.
    window: None (default): `np.var` of the selected values, the paper's measure. An
      int: the mean of `rolling_variance(selected, window)`, i.e. the variance around
      a local mean, which a trend in the gradient norm does not inflate.
    start: first step (inclusive).
    stop: end step (exclusive); None: to the end.
    steps: optional i[n] step of each value; without it the position is the step.

  Returns:
    The variance, a float (NaN if a selected value is NaN).
  """
  x = _series("grad_norms", grad_norms)
  sel = x[_range_mask(x.size, start, stop, steps)]
  if sel.size == 0:
    raise ValueError(f"no grad norm has a step in [{start}, {stop})")
  if window is None:
    return float(np.var(sel))
  return float(np.mean(rolling_variance(sel, window)))


def _trailing_median_mad(x: np.ndarray, window: int,
                         min_history: int) -> tuple[np.ndarray, np.ndarray]:
  """Median and MAD of the finite values among x[i - window:i], for every i.

  NaN where fewer than `min_history` finite values precede i. `x` holds NaN for
  non-finite values already.
  """
  n = x.size
  padded = np.concatenate([np.full(window, np.nan), x])
  prev = sliding_window_view(padded, window)[:n]  # prev[i] = x[i - window:i]
  count = np.sum(np.isfinite(prev), axis=1)
  with warnings.catch_warnings():  # all-NaN rows (no history yet) are expected
    warnings.simplefilter("ignore", RuntimeWarning)
    med = np.nanmedian(prev, axis=1)
    mad = np.nanmedian(np.abs(prev - med[:, None]), axis=1)
  short = count < min_history
  med[short] = np.nan
  mad[short] = np.nan
  return med, mad


def mad(x: Any, scale: float = 1.0) -> float:
  """Median absolute deviation, `scale * median(|x - median(x)|)`, of the finite values.

  scale=1 (default) is the raw MAD the spike rule uses; scale=1.4826 makes it a
  consistent estimator of a Gaussian's standard deviation.
  """
  x = _series("x", x)
  x = x[np.isfinite(x)]
  if x.size == 0:
    return math.nan
  return float(scale * np.median(np.abs(x - np.median(x))))


@dataclasses.dataclass(frozen=True)
class Spikes:
  """The result of `loss_spikes`.

  Attributes:
    indices: i64[count], positions of the spikes in the series, ascending.
    threshold: f64[n], the threshold each step was compared with, in loss units; NaN
      where the step was not tested (too little history, or a non-finite residual).
    median: f64[n], the reference median (of the residuals when detrended).
    mad: f64[n], the reference MAD (raw, before `scale`).
    baseline: f64[n] trailing median subtracted when `detrend` is set, else None.
    nonfinite: i64[m], positions of non-finite losses (never spikes, never history).
    k, window, scale, detrend, min_history: the rule's parameters.
  """
  indices: np.ndarray
  threshold: np.ndarray
  median: np.ndarray
  mad: np.ndarray
  baseline: np.ndarray | None
  nonfinite: np.ndarray
  k: float
  window: int | None
  scale: float
  detrend: int | None
  min_history: int

  @property
  def count(self) -> int:
    return int(self.indices.size)

  def to_dict(self, steps: Any = None) -> dict[str, Any]:
    """count, spike steps (positions, or `steps[indices]`) and the rule, for JSON."""
    at = self.indices if steps is None else np.asarray(steps)[self.indices]
    return {"count": self.count, "steps": [int(s) for s in at], "k": self.k,
            "window": self.window, "scale": self.scale, "detrend": self.detrend,
            "min_history": self.min_history}


def loss_spikes(losses: Any, k: float, window: int | None = 50, *, scale: float = 1.0,
                detrend: int | None = None, min_history: int = 10) -> Spikes:
  """Steps whose loss exceeds median + k * scale * MAD of a reference set.

  The rule, for each position i of the series x:

    1. Residual r[i] = x[i], or with `detrend=d`: r[i] = x[i] - median(x[i-d:i]), the
       median of the (up to) d finite losses before i, so that a falling loss is
       judged against where it was just before (NaN, i.e. untested, with fewer than
       min(min_history, d) of them).
    2. Reference: with `window=w`, the finite r among the (up to) w positions before
       i (i itself excluded, so a spike does not raise its own bar); i is tested only
       if at least min(min_history, w) of them exist. With window=None, all finite r
       of the series (every step is tested).
    3. med = median(reference), MAD = median(|reference - med|) (raw; `scale` 1.4826
       would turn it into a Gaussian sigma estimate), threshold = med + k * scale * MAD
       (+ the detrending baseline, so that `threshold` is in loss units).
    4. i is a spike iff x[i] > threshold[i] (strict).

  Non-finite losses are never spikes and never enter a reference (see `nonfinite`).
  A MAD of 0 (a perfectly flat reference) makes any rise above the median a spike.

  Args:
    losses: f64[n] per-step loss.
    k: the multiplier (the paper: 6 and 9).
    window: trailing window length, or None for the global median and MAD.
    scale: factor on the MAD (1 = raw).
    detrend: trailing window of the baseline median subtracted first, or None.
    min_history: the fewest previous values a trailing statistic needs.

  Returns:
    A `Spikes`.
  """
  x = _series("losses", losses)
  if isinstance(k, bool) or not isinstance(k, (int, float, np.number)) or not k > 0:
    raise ValueError(f"k={k!r} must be a positive number")
  if not scale > 0:
    raise ValueError(f"scale={scale!r} must be positive")
  if window is not None:
    window = _positive_int("window", window)
  if detrend is not None:
    detrend = _positive_int("detrend", detrend)
  min_history = _positive_int("min_history", min_history)

  finite = np.isfinite(x)
  x_nan = np.where(finite, x, np.nan)
  baseline = None
  r = x_nan
  if detrend is not None:
    baseline, _ = _trailing_median_mad(x_nan, detrend, min(min_history, detrend))
    r = x_nan - baseline

  if window is None:
    ref = r[np.isfinite(r)]
    med_v = float(np.median(ref)) if ref.size else math.nan
    mad_v = float(np.median(np.abs(ref - med_v))) if ref.size else math.nan
    med = np.full(x.size, med_v)
    mad_arr = np.full(x.size, mad_v)
  else:
    med, mad_arr = _trailing_median_mad(r, window, min(min_history, window))

  threshold = med + float(k) * float(scale) * mad_arr
  if baseline is not None:
    threshold = threshold + baseline
  threshold = np.where(np.isfinite(r), threshold, np.nan)  # untested where r is NaN
  with np.errstate(invalid="ignore"):
    is_spike = finite & np.isfinite(threshold) & (x > threshold)
  return Spikes(indices=np.flatnonzero(is_spike), threshold=threshold, median=med,
                mad=mad_arr, baseline=baseline, nonfinite=np.flatnonzero(~finite),
                k=float(k), window=window, scale=float(scale), detrend=detrend,
                min_history=min_history)


def stability_summary(losses: Any, grad_norms: Any = None, ks: Sequence[float] = (6, 9),
                      window: int | None = 50, *, start: int = 0, stop: int | None = None,
                      steps: Any = None, variance_window: int | None = None,
                      scale: float = 1.0, detrend: int | None = None,
                      min_history: int = 10) -> dict[str, Any]:
  """The paper's stability table row for one run, as a JSON-friendly dict.

  Spikes are detected on the whole series (so steps before `start` serve as history)
  and counted in [start, stop); the gradient-norm variance is over [start, stop).
  The paper's setting: start=0, stop=501, ks=(6, 9).

  Args:
    losses: f64[n] per-step loss.
    grad_norms: optional f64[n] per-step global gradient norm.
    ks: the spike multipliers.
    window, scale, detrend, min_history: the spike rule (`loss_spikes`).
    start, stop: the step range [start, stop) reported.
    steps: optional i[n] step of each position (shared by both series).
    variance_window: `grad_norm_variance`'s `window`.

  Returns:
    {"steps": {"start", "stop", "count"},
     "loss_spikes": {"6": {"count", "steps": [...], "k", "window", ...}, "9": ...},
     "nonfinite_loss_steps": [...],
     "grad_norm_variance": float | None, "grad_norm_mean": float | None}
    Steps are `steps` values when given, else positions. NaN is written as None.
  """
  x = _series("losses", losses)
  in_range = _range_mask(x.size, start, stop, steps)
  if not in_range.any():
    raise ValueError(f"no loss has a step in [{start}, {stop})")
  at = np.arange(x.size) if steps is None else np.asarray(steps)
  out: dict[str, Any] = {"steps": {"start": int(start),
                                   "stop": None if stop is None else int(stop),
                                   "count": int(in_range.sum())}}
  spikes = {}
  nonfinite = None
  for k in ks:
    s = loss_spikes(x, k, window, scale=scale, detrend=detrend, min_history=min_history)
    kept = s.indices[in_range[s.indices]]
    spikes[f"{float(k):g}"] = {**s.to_dict(), "count": int(kept.size),
                               "steps": [int(v) for v in at[kept]]}
    nonfinite = s.nonfinite
  out["loss_spikes"] = spikes
  out["nonfinite_loss_steps"] = ([] if nonfinite is None else
                                 [int(v) for v in at[nonfinite[in_range[nonfinite]]]])
  if grad_norms is None:
    out["grad_norm_variance"] = out["grad_norm_mean"] = None
  else:
    g = _series("grad_norms", grad_norms)
    if g.size != x.size:
      raise ValueError(f"grad_norms has {g.size} values but losses has {x.size}")
    var = grad_norm_variance(g, variance_window, start, stop, steps=steps)
    mean = float(np.mean(g[in_range]))
    out["grad_norm_variance"] = var if math.isfinite(var) else None
    out["grad_norm_mean"] = mean if math.isfinite(mean) else None
  return out


@dataclasses.dataclass(frozen=True)
class Divergence:
  """The result of `divergence`.

  Attributes:
    diverged: whether the run diverged.
    index: position of the first divergent step, or None.
    reason: "nonfinite" (NaN / inf loss), "above_min" (loss above its running minimum
      by more than `margin` for `patience` consecutive steps), or None.
    running_min: f64[n], the minimum of the finite losses up to and including each step
      (NaN before the first finite one).
    margin, patience: the rule's parameters.
  """
  diverged: bool
  index: int | None
  reason: str | None
  running_min: np.ndarray
  margin: float
  patience: int

  def to_dict(self, steps: Any = None) -> dict[str, Any]:
    at = None if self.index is None else (
        self.index if steps is None else int(np.asarray(steps)[self.index]))
    return {"diverged": self.diverged, "step": at, "reason": self.reason,
            "margin": self.margin, "patience": self.patience}


def divergence(losses: Any, margin: float = 1.0, patience: int = 1) -> Divergence:
  """Whether (and where) a training run diverged.

  A run diverges at the first step whose loss is non-finite, or at the first step of
  `patience` consecutive steps whose loss exceeds the running minimum of the finite
  losses before it by more than `margin` (loss units, e.g. nats; the "loss above its
  running minimum" rule of the precision-stability study, papers.md §8). A single spike
  that recovers within `patience - 1` steps is not a divergence (`loss_spikes` counts
  those).

  Args:
    losses: f64[n] per-step loss.
    margin: the allowed rise above the running minimum, > 0.
    patience: consecutive steps above it that count as divergence, >= 1.

  Returns:
    A `Divergence`; `index` is the first step of the run of `patience` steps.
  """
  x = _series("losses", losses)
  if isinstance(margin, bool) or not isinstance(margin, (int, float, np.number)) \
      or not margin > 0:
    raise ValueError(f"margin={margin!r} must be a positive number")
  patience = _positive_int("patience", patience)
  finite = np.isfinite(x)
  running = np.fmin.accumulate(np.where(finite, x, np.nan))
  # Compare with the minimum of the steps *before* i, so a falling loss never counts.
  before = np.concatenate([[np.nan], running[:-1]])
  with np.errstate(invalid="ignore"):
    above = finite & np.isfinite(before) & (x > before + float(margin))
  first_bad = int(np.argmax(~finite)) if (~finite).any() else None
  first_above = None
  streak = 0
  for i, a in enumerate(above):
    streak = streak + 1 if a else 0
    if streak == patience:
      first_above = i - patience + 1
      break
  candidates = [(i, r) for i, r in ((first_bad, "nonfinite"), (first_above, "above_min"))
                if i is not None]
  index, reason = min(candidates) if candidates else (None, None)
  return Divergence(diverged=index is not None, index=index, reason=reason,
                    running_min=running, margin=float(margin), patience=patience)


def grad_norm_stats(grad_norms: Any) -> dict[str, float | int | None]:
  """mean, std, max, 99th percentile and count of the finite gradient norms, plus the
  number of non-finite ones; for JSON (None where nothing is finite)."""
  g = _series("grad_norms", grad_norms)
  fin = g[np.isfinite(g)]
  if fin.size == 0:
    return {"mean": None, "std": None, "max": None, "p99": None, "count": 0,
            "nonfinite": int(g.size)}
  return {"mean": float(fin.mean()), "std": float(fin.std()), "max": float(fin.max()),
          "p99": float(np.percentile(fin, 99)), "count": int(fin.size),
          "nonfinite": int(g.size - fin.size)}
