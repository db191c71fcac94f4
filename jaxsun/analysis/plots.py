"""Figures comparing attention variants side by side, as PNGs.

Every function takes `data: {variant_name: data}` (dict order is drawing order) and a
path, and returns the path. A variant keeps its colour across figures: the kinds of
`ModelConfig.attention` have fixed colours (`KNOWN_COLORS`; names are matched after
lower-casing and turning runs of other characters into "_", so "Off-by-one" and
"affine + gated" match), other names take the spare colours in order, and `colors`
overrides either.

Figures are drawn on a `matplotlib.figure.Figure` with the Agg canvas directly (not
through pyplot), so they work headless and leave a notebook's backend alone;
matplotlib is imported on the first plot only. A PNG is written to a temporary file
in the target directory and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxsun.analysis import stability

PathLike = str | os.PathLike
DPI = 150

# Fixed colours for the attention kinds (ModelConfig.attention) and common aliases.
KNOWN_COLORS = {
    "softmax": "tab:blue", "baseline": "tab:blue", "off_by_one": "tab:orange",
    "sink": "tab:green", "gated": "tab:purple", "affine": "tab:red",
    "affine_gated": "tab:brown",
}
_SPARE_COLORS = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray", "black", "gold",
                 "navy", "teal", "crimson", "indigo")


def _norm_name(name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def variant_colors(names: Sequence[str],
                   colors: Mapping[str, str] | None = None) -> dict[str, str]:
  """name -> matplotlib colour: `colors` first, then `KNOWN_COLORS`, then spares."""
  out = {}
  for name in names:
    if colors and name in colors:
      out[name] = colors[name]
    elif _norm_name(name) in KNOWN_COLORS:
      out[name] = KNOWN_COLORS[_norm_name(name)]
  spare = itertools.cycle([c for c in _SPARE_COLORS if c not in out.values()]
                          or _SPARE_COLORS)
  for name in names:
    if name not in out:
      out[name] = next(spare)
  return out


def _check_data(data: Any, where: str = "data") -> None:
  if not isinstance(data, Mapping) or not data:
    raise ValueError(f"{where} must be a non-empty mapping of variant name -> data")


def _figure(figsize: tuple[float, float], **kwargs):
  # Lazy: matplotlib costs ~0.3 s to import and only plotting needs it.
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, dpi=DPI, **kwargs)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path: PathLike, *, tight: bool = True) -> pathlib.Path:
  """Writes `fig` as a PNG through a temporary file and `os.replace`."""
  if tight:
    fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      fig.savefig(f, format="png", dpi=DPI)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a plot is meant to be read
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def _integer_xaxis(ax) -> None:
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --- per-layer lines ----------------------------------------------------------------------


def _per_layer(value: Any, key: str, sub: str | None, name: str) -> np.ndarray:
  """f64[L] or f64[L, H] from an array or a `summarize` dict (None -> NaN)."""
  if isinstance(value, Mapping):
    try:
      entry = value[key]
      if sub is not None:
        entry = entry[sub]
      elif isinstance(entry, Mapping):
        entry = entry["per_layer_head"]
    except KeyError as e:
      raise ValueError(f"data[{name!r}] is a mapping without {e} (expected an array or "
                       "a jaxsun.analysis.summarize dict)") from None
    value = entry
  arr = np.array(value, dtype=np.float64)
  if arr.ndim not in (1, 2) or arr.size == 0:
    raise ValueError(f"data[{name!r}] must be per-layer values [L] or [L, H], got shape "
                     f"{arr.shape}")
  return arr


def _plot_per_layer(data, path, *, key, sub, ylabel, title, colors, reference=None):
  _check_data(data)
  per_variant = {name: _per_layer(v, key, sub, name) for name, v in data.items()}
  palette = variant_colors(list(data), colors)
  fig = _figure((6.4, 4.2))
  ax = fig.add_subplot(1, 1, 1)
  any_heads = False
  for name, arr in per_variant.items():
    c = palette[name]
    layers = np.arange(arr.shape[0])
    if arr.ndim == 2:  # [L, H]: mean over heads, shaded range over heads
      any_heads = True
      with _quiet():
        mean, lo, hi = (np.nanmean(arr, 1), np.nanmin(arr, 1), np.nanmax(arr, 1))
      ax.fill_between(layers, lo, hi, color=c, alpha=0.15, linewidth=0)
      arr = mean
    ax.plot(layers, arr, marker="o", markersize=4, linewidth=1.6, color=c, label=str(name))
  if reference is not None:
    ax.axhline(reference[0], color="0.4", linestyle="--", linewidth=1, label=reference[1])
  ax.set_xlabel("layer")
  ax.set_ylabel(ylabel)
  ax.set_title(title + (" (shaded: range over heads)" if any_heads else ""), fontsize=10)
  _integer_xaxis(ax)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


@contextlib.contextmanager
def _quiet():
  """Silences NumPy's all-NaN-slice RuntimeWarnings (an all-NaN layer draws a gap)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    yield


def plot_entropy_per_layer(data: Mapping[str, Any], path: PathLike, *,
                           title: str = "Attention entropy per layer",
                           colors: Mapping[str, str] | None = None) -> pathlib.Path:
  """Mean attention entropy vs layer, one line per variant.

  Args:
    data: variant -> `attention_entropy` result f32[L, H] (drawn as the head mean
      with the range over heads shaded), a per-layer f32[L], or a `summarize` dict.
    path: the PNG to write.
    title: the axes title.
    colors: optional variant -> colour overrides.
  """
  return _plot_per_layer(data, path, key="entropy", sub=None, ylabel="entropy (nats)",
                         title=title, colors=colors)


def plot_first_token_mass_per_layer(data: Mapping[str, Any], path: PathLike, *,
                                    title: str = "Attention on the first token per layer",
                                    colors: Mapping[str, str] | None = None) -> pathlib.Path:
  """Mean weight on key 0 (queries t >= 1) vs layer; arguments as `plot_entropy_per_layer`."""
  return _plot_per_layer(data, path, key="first_token_mass", sub=None,
                         ylabel="weight on key 0", title=title, colors=colors)


def plot_head_diversity_per_layer(data: Mapping[str, Any], path: PathLike, *,
                                  metric: str = "jsd", title: str | None = None,
                                  colors: Mapping[str, str] | None = None) -> pathlib.Path:
  """Head diversity vs layer, one line per variant.

  Args:
    data: variant -> `head_diversity` result f32[L], or a `summarize` dict (its
      `metric` entry is drawn).
    path: the PNG to write.
    metric: "jsd" or "cosine" (labels, and the entry read from summary dicts).
    title: the axes title (default names the metric).
    colors: optional variant -> colour overrides.
  """
  label = {"jsd": "mean pairwise JSD between heads (nats)",
           "cosine": "1 - mean pairwise cosine between heads"}
  if metric not in label:
    raise ValueError(f"metric={metric!r} is not one of {tuple(label)}")
  return _plot_per_layer(data, path, key="head_diversity", sub=metric, ylabel=label[metric],
                         title=title or f"Head diversity per layer ({metric})", colors=colors)


# --- distributions ------------------------------------------------------------------------


def _mass_values(value: Any, name: str) -> np.ndarray:
  """f64[L, N] (L = 1 for a flat array) from a `QueryMass` or an array [L, ...]."""
  values = getattr(value, "values", value)
  arr = np.array(values, dtype=np.float64)
  if arr.size == 0:
    raise ValueError(f"data[{name!r}] holds no values")
  if arr.ndim <= 1:
    return arr.reshape(1, -1)
  return arr.reshape(arr.shape[0], -1)


def plot_query_mass_distribution(data: Mapping[str, Any], path: PathLike, *,
                                 layers: Sequence[int] | None = None,
                                 title: str = "Per-query attention mass",
                                 colors: Mapping[str, str] | None = None,
                                 max_points: int = 20_000, seed: int = 0) -> pathlib.Path:
  """Violins of the per-query mass sum_s w, one per variant, side by side.

  Args:
    data: variant -> `QueryMass` (or its `values` f32[L, H, N], or any [L, ...] array;
      a 1-D array is one pooled set).
    path: the PNG to write.
    layers: one panel per listed layer; None: one panel pooling all layers.
    title: the figure title.
    colors: optional variant -> colour overrides.
    max_points: values per violin above which a seeded random subsample is drawn
      (the density estimate costs O(points)).
    seed: the subsample's seed.
  """
  _check_data(data)
  per_variant = {name: _mass_values(v, name) for name, v in data.items()}
  palette = variant_colors(list(data), colors)
  if layers is None:
    panels = [("all layers", None)]
  else:
    panels = [(f"layer {int(l)}", int(l)) for l in layers]
    if not panels:
      raise ValueError("layers must name at least one layer (or be None)")
  rng = np.random.default_rng(seed)
  names = list(per_variant)
  fig = _figure((max(4.0, 1.1 * len(names) + 1.5) * len(panels), 4.2))
  for p, (panel_title, layer) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), p + 1)
    for i, name in enumerate(names):
      arr = per_variant[name]
      if layer is None:
        v = arr.ravel()
      elif not -arr.shape[0] <= layer < arr.shape[0]:
        raise ValueError(f"layer {layer} is out of range for data[{name!r}] with "
                         f"{arr.shape[0]} layers")
      else:
        v = arr[layer]
      v = v[np.isfinite(v)]
      if v.size > max_points:
        v = rng.choice(v, max_points, replace=False)
      c = palette[name]
      if v.size == 0:
        continue
      # A (near-)constant set, e.g. softmax's mass of exactly 1, has no density to
      # estimate (the KDE is singular): draw it as a bar at its value.
      if np.ptp(v) <= 1e-6 * max(1.0, float(np.abs(v).max())):
        ax.hlines(float(np.median(v)), i - 0.35, i + 0.35, color=c, linewidth=2.5)
        continue
      parts = ax.violinplot([v], positions=[i], widths=0.8, showmedians=True,
                            showextrema=True)
      for body in parts["bodies"]:
        body.set_facecolor(c)
        body.set_edgecolor(c)
        body.set_alpha(0.45)
      for key in ("cmedians", "cmins", "cmaxes", "cbars"):
        if key in parts:
          parts[key].set_color(c)
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label="mass 1 (softmax)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([str(n) for n in names], rotation=30 if len(names) > 4 else 0,
                       ha="right" if len(names) > 4 else "center")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_title(panel_title, fontsize=10)
    if p == 0:
      ax.set_ylabel(r"per-query mass $\sum_s w_{ts}$")
      ax.legend(fontsize=8, loc="best")
    ax.grid(True, axis="y", alpha=0.3)
  fig.suptitle(title)
  return _save(fig, path)


# --- attention maps -----------------------------------------------------------------------


def plot_attention_maps(data: Mapping[str, Any], path: PathLike, *, layer: int = 0,
                        heads: int | Sequence[int] = 0, batch: int = 0,
                        max_len: int | None = None, causal: bool = True,
                        title: str | None = None,
                        vmax: float | None = None) -> pathlib.Path:
  """A grid of attention-weight heatmaps: one column per variant, one row per head.

  All panels share one colour scale (so variants compare directly): sequential from 0
  when every weight is >= 0, diverging and symmetric around 0 when some are negative
  (affine). Keys a query cannot see are grey when `causal`.

  Args:
    data: variant -> effective weights f32[L, B, H, T, S] (indexed by `layer`,
      `batch`, `heads`), or one map f32[T, S] (then `heads` must be a single head).
    path: the PNG to write.
    layer, heads, batch: which maps to draw.
    max_len: draw only the first `max_len` queries and keys.
    causal: grey out keys s > t + (S - T).
    title: the figure title (default names the layer).
    vmax: the top of the colour scale (default: the largest |weight| shown); a lower
      value keeps a large first-token weight from washing out the rest.
  """
  _check_data(data)
  head_list = [int(heads)] if np.ndim(heads) == 0 else [int(h) for h in heads]
  if not head_list:
    raise ValueError("heads must name at least one head")
  maps: dict[str, list[np.ndarray]] = {}
  for name, value in data.items():
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2:
      if len(head_list) != 1:
        raise ValueError(f"data[{name!r}] is a single [T, S] map; pass one head")
      chosen = [arr]
    elif arr.ndim == 5:
      try:
        chosen = [arr[layer, batch, h] for h in head_list]
      except IndexError:
        raise ValueError(f"layer={layer}, batch={batch}, heads={head_list} out of range "
                         f"for data[{name!r}] of shape {arr.shape}") from None
    else:
      raise ValueError(f"data[{name!r}] must be f32[L, B, H, T, S] or f32[T, S], got "
                       f"shape {arr.shape}")
    out = []
    for m in chosen:
      m = m.copy()
      if causal:
        t, s = m.shape
        m[np.arange(s)[None, :] > np.arange(t)[:, None] + (s - t)] = np.nan
      if max_len is not None:
        m = m[:max_len, :max_len]
      out.append(m)
    maps[name] = out

  finite = np.concatenate([m[np.isfinite(m)] for ms in maps.values() for m in ms])
  negative = finite.size > 0 and finite.min() < 0
  top = vmax if vmax is not None else (float(np.abs(finite).max()) if finite.size else 1.0)
  top = top or 1.0

  import matplotlib  # pylint: disable=import-outside-toplevel
  cmap = matplotlib.colormaps["RdBu_r" if negative else "viridis"].with_extremes(bad="0.85")
  lo = -top if negative else 0.0

  names = list(maps)
  rows, cols = len(head_list), len(names)
  fig = _figure((2.9 * cols + 1.2, 2.7 * rows + 0.8), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  image = None
  for c, name in enumerate(names):
    for r, m in enumerate(maps[name]):
      ax = axes[r][c]
      image = ax.imshow(m, cmap=cmap, vmin=lo, vmax=top, interpolation="nearest")
      if r == 0:
        ax.set_title(str(name), fontsize=10)
      if c == 0:
        ax.set_ylabel(f"head {head_list[r]}\nquery t")
      if r == rows - 1:
        ax.set_xlabel("key s")
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.85, label="attention weight")
  fig.suptitle(title or f"Attention weights, layer {layer}" + (f", batch row {batch}"
                                                                if batch else ""))
  return _save(fig, path, tight=False)  # constrained layout already placed everything


# --- training curves ----------------------------------------------------------------------


def _seed_rows(x: Any, where: str) -> np.ndarray:
  """f64[seeds, n] from [n], [seeds, n], or a list of 1-D seeds (cut to the shortest)."""
  if isinstance(x, (list, tuple)) and x and np.ndim(x[0]) == 1:
    rows = [np.asarray(r, dtype=np.float64) for r in x]
    n = min(r.size for r in rows)
    arr = np.stack([r[:n] for r in rows])
  else:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
      arr = arr[None]
  if arr.ndim != 2 or arr.shape[1] == 0:
    raise ValueError(f"{where} must be [steps] or [seeds, steps], got shape {arr.shape}")
  return arr


def plot_training_curves(data: Mapping[str, Mapping[str, Any]], path: PathLike, *,
                         k: float | None = 6, window: int | None = 50,
                         log_grad_norm: bool = False,
                         loss_ylim: tuple[float, float] | None = None,
                         title: str | None = None,
                         colors: Mapping[str, str] | None = None) -> pathlib.Path:
  """Loss and gradient norm vs step: mean over seeds, +/- one std shaded, spikes marked.

  Args:
    data: variant -> {"loss": [steps] or [seeds, steps] (or a list of per-seed
      series, cut to the shortest), "grad_norm": same (optional), "steps": [steps]
      (optional, default 0, 1, ...)}.
    path: the PNG to write.
    k: spike multiplier for `stability.loss_spikes` (per seed; each spike is marked
      with an x on that seed's loss); None: no spike marks.
    window: the spike rule's trailing window.
    log_grad_norm: log-scale the gradient-norm axis.
    loss_ylim: y limits of the loss panel (the first steps' loss can dwarf the rest).
    title: the figure title.
    colors: optional variant -> colour overrides.
  """
  _check_data(data)
  palette = variant_colors(list(data), colors)
  runs = {}
  for name, run in data.items():
    if not isinstance(run, Mapping) or "loss" not in run:
      raise ValueError(f"data[{name!r}] must be a mapping with a 'loss' entry")
    loss = _seed_rows(run["loss"], f"data[{name!r}]['loss']")
    grad = (None if run.get("grad_norm") is None else
            _seed_rows(run["grad_norm"], f"data[{name!r}]['grad_norm']"))
    n = loss.shape[1] if grad is None else min(loss.shape[1], grad.shape[1])
    steps = np.arange(n) if run.get("steps") is None else np.asarray(run["steps"])[:n]
    if steps.shape != (n,):
      raise ValueError(f"data[{name!r}]['steps'] must have {n} entries, got {steps.shape}")
    runs[name] = (steps, loss[:, :n], None if grad is None else grad[:, :n])

  panels = [("loss", "training loss")]
  if any(g is not None for _, _, g in runs.values()):
    panels.append(("grad_norm", "gradient norm"))
  fig = _figure((6.0 * len(panels), 4.2))
  axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
  for name, (steps, loss, grad) in runs.items():
    c = palette[name]
    n_seeds = loss.shape[0]
    label = f"{name} ({n_seeds} seed{'s' if n_seeds > 1 else ''}"
    if k is not None:
      spikes = [stability.loss_spikes(row, k, window) for row in loss]
      label += f", {sum(s.count for s in spikes)} spikes at k={k:g}"
      for row, s in zip(loss, spikes):
        if s.count:
          axes[0].scatter(steps[s.indices], row[s.indices], marker="x", s=28, color=c,
                          linewidths=1.3, zorder=3)
    label += ")"
    for ax, rows in zip(axes, (loss, grad)):
      if rows is None:
        continue
      with _quiet():
        mean, std = np.nanmean(rows, 0), np.nanstd(rows, 0)
      if rows.shape[0] > 1:
        ax.fill_between(steps, mean - std, mean + std, color=c, alpha=0.2, linewidth=0)
      ax.plot(steps, mean, color=c, linewidth=1.2, label=label)
  for ax, (key, ylabel) in zip(axes, panels):
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} (mean ± std over seeds)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if key == "grad_norm" and log_grad_norm:
      ax.set_yscale("log")
  if loss_ylim is not None:
    axes[0].set_ylim(*loss_ylim)
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return _save(fig, path)
