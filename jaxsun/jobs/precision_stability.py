"""The reduced-precision training-stability study ("To FP8 and Back Again", papers.md §8).

For every cell of formats x learning-rate multipliers, train `seeds` runs of a small
byte-level decoder on the shipped Shakespeare corpus with every projection's GEMMs (and
optionally attention's products) masked to the cell's format (`jaxsun.quant.masked_gemm`),
all seeds of a cell in one vmapped `jaxsun.train.population.Population`. Per run: the
training-loss and gradient-norm series, divergence (`jaxsun.analysis.stability.divergence`:
non-finite loss, or loss above its running minimum by `margin` for `patience` steps), loss
spikes, the logit sharpness of the last token over training
(`jaxsun.analysis.sharpness.last_token_sharpness` on fixed validation windows) and the
final validation loss. The base learning rate is tuned here first (`base_lr = 0`: the
FP32 run with the lowest final validation loss among `tune_lrs`), so "1x / 3x / 10x" are
multiples of a tuned rate. results.json is rewritten after every cell (a rerun skips the
finished ones), then table.md, heatmap.png, sharpness.png, loss_curves.png, COMMAND.md.

Importable pieces (`colab/precision.ipynb` calls them): `Data`, `gemm_config`,
`train_cell`, `summarize_cell`, `sharpness_before_divergence`, the plot functions.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

VARIANT_CONFIG = "configs/precision_stability.py"


# ------------------------------------------------------------------------ config


def gemm_config(name: str, *, rounding: str = "truncate", attention: bool = False):
  """The `MaskedGemm` of a format name: "fp32" (no masking), an eXmY format (masked
  with `rounding`, no scaling: the paper's masking), "bf16" (nearest, as hardware
  rounds) or a recipe of `masked_gemm.RECIPES` (nearest, its scaling)."""
  from jaxsun.quant import masked_gemm as mg  # pylint: disable=g-import-not-at-top
  key = name.lower()
  if key == "fp32":
    return mg.MaskedGemm()
  if key in mg.RECIPES or key == "bf16":
    return mg.MaskedGemm.parse(key, rounding="nearest", attention=attention)
  return mg.MaskedGemm.parse(key, rounding=rounding, scale="none", attention=attention)


def check_config(config) -> None:
  """Raises ValueError naming the config key that is wrong."""
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  for key in ("formats", "lr_multipliers", "seeds", "steps", "batch_size", "seq_len",
              "base_lr", "tune_lrs", "rounding", "margin", "patience", "sharpness",
              "eval", "model", "optimizer", "mask_attention"):
    if key not in config:
      raise ValueError(f"config.{key} is missing")
  if not config.formats:
    raise ValueError("config.formats is empty")
  for f in config.formats:
    try:
      gemm_config(f, rounding=config.rounding, attention=config.mask_attention)
    except ValueError as e:
      raise ValueError(f"config.formats: {e}") from None
  if not config.lr_multipliers or not all(
      isinstance(m, (int, float)) and m > 0 for m in config.lr_multipliers):
    raise ValueError(f"config.lr_multipliers={tuple(config.lr_multipliers)!r} must be "
                     "positive numbers")
  seeds = tuple(config.seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.seeds={seeds!r} must be distinct integers, at least one")
  for key in ("steps", "batch_size", "seq_len", "patience"):
    v = config[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"config.{key}={v!r} must be an integer >= 1")
  if not config.margin > 0:
    raise ValueError(f"config.margin={config.margin!r} must be > 0")
  if config.base_lr < 0 or (config.base_lr == 0 and not config.tune_lrs):
    raise ValueError("config.base_lr must be > 0, or 0 with config.tune_lrs to tune it")
  sc = config.sharpness
  if sc.every < 1 or sc.batch_size < 1:
    raise ValueError("config.sharpness.every and config.sharpness.batch_size must be >= 1")
  from jaxsun.analysis import sharpness  # pylint: disable=g-import-not-at-top
  try:
    sharpness._check(sc.eps, sc.steps, sc.step_size)  # pylint: disable=protected-access
  except ValueError as e:
    raise ValueError(f"config.sharpness: {e}") from None
  common.optimizer_config(config.optimizer)


# -------------------------------------------------------------------------- data


class Data:
  """Token windows of the byte-tokenized corpus: a fresh random batch per (seed, step)
  from the train split (so seeds differ in data order as well as initialisation) and
  fixed validation windows."""

  def __init__(self, corpus: str = "shakespeare", tokenizer: str = "byte"):
    from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
    self.tokenizer = data_lib.get_tokenizer(tokenizer)

    def ids(split):
      text = "\n\n".join(data_lib.corpus_chunks(corpus, split))
      return np.asarray(self.tokenizer.encode(text), np.int32)
    self.train, self.validation = ids("train"), ids("validation")

  @property
  def vocab_size(self) -> int:
    return int(self.tokenizer.vocab_size)

  def batch(self, seeds: Sequence[int], step: int, batch_size: int, seq_len: int
            ) -> dict[str, np.ndarray]:
    """{"tokens": i32[S, B, T], "boundary": i32[S, B], "loss_mask": f32[S, B, T]}."""
    rows = []
    for s in seeds:
      rng = np.random.default_rng([int(s), int(step)])
      starts = rng.integers(0, self.train.size - seq_len, batch_size)
      rows.append(np.stack([self.train[i:i + seq_len] for i in starts]))
    tokens = np.stack(rows)
    s, b = len(seeds), batch_size
    return {"tokens": tokens, "boundary": np.ones((s, b), np.int32),
            "loss_mask": np.ones((s, b, seq_len), np.float32)}

  def windows(self, n: int, seq_len: int) -> np.ndarray:
    """i32[n, seq_len] non-overlapping validation windows (the first n)."""
    n = min(n, self.validation.size // seq_len)
    return self.validation[:n * seq_len].reshape(n, seq_len)


# ---------------------------------------------------------------------- training


def _forward(split, tokens):
  return split.prefill_module()(tokens)[0]  # f32[B, T, V]


def _eval_loss(split, windows):
  """Mean next-token cross-entropy over the windows."""
  from jaxsun.analysis import sharpness  # pylint: disable=g-import-not-at-top
  logits = _forward(split, windows[:, :-1])
  v = logits.shape[-1]
  return sharpness.mean_cross_entropy(logits.reshape(-1, v), windows[:, 1:].reshape(-1))


def _sharpness_fn(eps, steps, step_size):
  from jaxsun.analysis import sharpness  # pylint: disable=g-import-not-at-top

  def fn(split, windows):
    logits = _forward(split, windows[:, :-1])[:, -1]  # f32[B, V]: last position
    return sharpness.last_token_sharpness(logits, windows[:, -1], eps=eps, steps=steps,
                                          step_size=step_size)
  return fn


def train_cell(config, model_cfg, data: Data, fmt: str, lr: float, *,
               log=print) -> dict:
  """Trains `config.seeds` runs of format `fmt` at peak learning rate `lr`, vmapped.

  Returns per-seed series (loss, grad_norm: f[S][steps], NaN after an early stop;
  sharpness: f[S][k] at `sharpness_steps`), the final validation loss per seed and the
  seconds. Training stops early once every seed's loss is non-finite.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jaxsun  # pylint: disable=g-import-not-at-top
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  from jaxsun.quant import masked_gemm as mg  # pylint: disable=g-import-not-at-top
  from jaxsun.train.population import Population  # pylint: disable=g-import-not-at-top
  from jaxsun.train.trainer import TrainConfig  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  gemm = gemm_config(fmt, rounding=config.rounding, attention=config.mask_attention)
  seeds = tuple(int(s) for s in config.seeds)
  make = lambda seed: jaxsun.SplitModel.from_model(
      mg.apply(jaxsun.Decoder(model_cfg, rngs=nnx.Rngs(seed)), gemm))
  opt = common.optimizer_config(config.optimizer)
  opt = type(opt)(**{**opt.__dict__, "learning_rate": float(lr)})
  pop = Population(make, TrainConfig(steps=config.steps, optimizer=opt), seeds)
  sc = config.sharpness
  sharp_windows = jnp.asarray(data.windows(sc.batch_size, config.seq_len + 1))
  eval_windows = jnp.asarray(data.windows(config.eval.batches, config.seq_len + 1))
  sharp_fn = _sharpness_fn(sc.eps, sc.steps, sc.step_size)
  s_count, steps = len(seeds), config.steps
  losses = np.full((s_count, steps), np.nan)
  grads = np.full((s_count, steps), np.nan)
  sharp_steps, sharp_vals = [], []
  compile_s = None
  for step in range(steps):
    m = pop.train_step(data.batch(seeds, step, config.batch_size, config.seq_len + 1))
    if compile_s is None:
      compile_s = time.perf_counter() - t0
    losses[:, step], grads[:, step] = m["loss"], m["grad_norm"]
    if step == 0 or (step + 1) % sc.every == 0 or step == steps - 1:
      sharp_steps.append(step + 1)
      sharp_vals.append(np.asarray(pop.map(sharp_fn, sharp_windows)))
    if (step + 1) % max(1, steps // 4) == 0:
      log(f"  {fmt} lr {lr:.3g}: step {step + 1}/{steps}  loss "
          + " ".join(f"{v:.3f}" for v in m["loss"]))
    if not np.isfinite(m["loss"]).any():
      log(f"  {fmt} lr {lr:.3g}: every seed non-finite at step {step + 1}: stopping")
      break
  final = np.asarray(pop.map(_eval_loss, eval_windows))
  return {"format": fmt, "gemm": gemm.name, "lr": float(lr), "seeds": list(seeds),
          "loss": _rows(losses), "grad_norm": _rows(grads), "sharpness_steps": sharp_steps,
          "sharpness": _rows(np.stack(sharp_vals, axis=1)),
          "final_eval_loss": [_num(v) for v in final],
          "compile_s": round(compile_s or 0.0, 2),
          "seconds": round(time.perf_counter() - t0, 2)}


def _num(v) -> float | None:
  v = float(v)
  return round(v, 5) if math.isfinite(v) else None


def _rows(a: np.ndarray) -> list[list[float | None]]:
  return [[_num(v) for v in row] for row in np.asarray(a)]


def _arr(rows) -> np.ndarray:
  return np.asarray([[np.nan if v is None else v for v in r] for r in rows], np.float64)


# ------------------------------------------------------------------ measurements


def summarize_cell(cell: Mapping, *, margin: float, patience: int,
                   spike_k: float = 6.0) -> dict:
  """Divergence per seed, their count, spikes, final losses and sharpness, mean +- std."""
  from jaxsun.analysis import stability  # pylint: disable=g-import-not-at-top
  losses, grads = _arr(cell["loss"]), _arr(cell["grad_norm"])
  div = [stability.divergence(l, margin=margin, patience=patience) for l in losses]
  spikes = [stability.loss_spikes(l[np.isfinite(l)], k=spike_k).count for l in losses]
  final = np.asarray([np.nan if v is None else v for v in cell["final_eval_loss"]])
  ok = np.asarray([not d.diverged for d in div]) & np.isfinite(final)
  last = [l[-max(1, l.size // 10):] for l in losses]  # the last 10% of the steps
  tail = np.asarray([t[np.isfinite(t)].mean() if np.isfinite(t).any() else np.nan
                     for t in last])
  sharp = _arr(cell["sharpness"])
  return {
      "diverged": int(sum(d.diverged for d in div)), "runs": len(div),
      "divergence": [d.to_dict() for d in div],
      "spikes": spikes,
      "final_eval_loss": stats(final[ok]),
      "final_eval_loss_all": stats(final),
      "final_train_loss": stats(tail[ok]),
      "sharpness_final": stats(sharp[ok, -1] if ok.any() else []),
      "sharpness_max": stats(np.nanmax(sharp, axis=1)[ok] if ok.any() else []),
      "grad_norm": [stability.grad_norm_stats(g[np.isfinite(l)]) for g, l in
                    zip(grads, losses)],
  }


def stats(values) -> dict:
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if v.size == 0:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": round(float(v.mean()), 5),
          "std": round(float(v.std(ddof=1)) if v.size > 1 else 0.0, 5), "n": int(v.size)}


def sharpness_before_divergence(cells: Mapping[str, Mapping], summaries: Mapping[str, Mapping]
                                ) -> dict:
  """Does sharpness rise before a divergence?

  For every diverged run with at least two sharpness measurements before its divergence
  step: rise = log(phi at the last measurement before divergence / phi at the first
  measurement after step 1's) (the first measurement, at step 1, is the untrained
  model). The control: every run that did not diverge, the same ratio between its last
  and first such measurements. Returns both sets' mean +- std and a verdict (a rise
  beyond the control by more than 2 standard errors of the difference).
  """
  rises, control = [], []
  for name, cell in cells.items():
    steps = np.asarray(cell["sharpness_steps"])
    sharp = _arr(cell["sharpness"])
    for s, d in enumerate(summaries[name]["divergence"]):
      row = sharp[s]
      if d["diverged"]:
        before = np.flatnonzero((steps > 1) & (steps <= d["step"] + 1) & np.isfinite(row))
        if before.size >= 2 and row[before[0]] > 0 and row[before[-1]] > 0:
          rises.append(float(np.log(row[before[-1]] / row[before[0]])))
      else:
        idx = np.flatnonzero((steps > 1) & np.isfinite(row))
        if idx.size >= 2 and row[idx[0]] > 0 and row[idx[-1]] > 0:
          control.append(float(np.log(row[idx[-1]] / row[idx[0]])))
  out = {"diverged_log_rise": stats(rises), "control_log_rise": stats(control),
         "n_diverged_measured": len(rises)}
  if len(rises) >= 2 and len(control) >= 2:
    a, b = np.asarray(rises), np.asarray(control)
    diff = a.mean() - b.mean()
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    out["difference"] = round(float(diff), 4)
    out["se"] = round(se, 4)
    out["verdict"] = ("sharpness rises before divergence beyond the control (> 2 SE)"
                      if diff > 2 * se else
                      "no rise beyond the control's within 2 SE")
  else:
    out["verdict"] = "too few diverged runs with sharpness measured before divergence"
  return out


# ------------------------------------------------------------------------ report


def _lr_label(mult: float) -> str:
  return f"{mult:g}x"


def markdown_report(results: Mapping) -> str:
  s = results["summary"]
  mults = results["config"]["lr_multipliers"]
  lines = [f"# Precision-stability study ({results.get('variant', '')})", "",
           f"Base learning rate {results['base_lr']:.3g} "
           f"({results.get('base_lr_source', '')}); {len(results['config']['seeds'])} seeds "
           f"per cell, {results['config']['steps']} steps, "
           f"{results['num_params']:,} parameters. Divergence: non-finite loss or loss "
           f"above its running minimum by {results['config']['margin']} nats for "
           f"{results['config']['patience']} steps.", "",
           "| format | GEMM config | " + " | ".join(
               f"{_lr_label(m)}: diverged | {_lr_label(m)}: val loss" for m in mults) + " |",
           "|---|---|" + "---|---|" * len(mults)]
  for fmt in results["config"]["formats"]:
    cells = [s.get(cell_name(fmt, m)) for m in mults]
    gemm = next((results["cells"][cell_name(fmt, m)]["gemm"] for m in mults
                 if cell_name(fmt, m) in results["cells"]), "")
    row = [fmt, gemm]
    for c in cells:
      if c is None:
        row += ["-", "-"]
        continue
      fl = c["final_eval_loss"]
      row += [f"{c['diverged']}/{c['runs']}",
              "-" if fl["mean"] is None else f"{fl['mean']:.3f} ± {fl['std']:.3f}"]
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", "val loss: final validation loss of the runs that did not diverge, mean ± "
            "std over them.", "",
            "Last-token sharpness phi at the end of training (runs that did not diverge) "
            "and its maximum over training:", "",
            "| format | " + " | ".join(f"{_lr_label(m)}: final phi | {_lr_label(m)}: max phi"
                                       for m in mults) + " |",
            "|---|" + "---|---|" * len(mults)]
  pm = lambda x: "-" if x["mean"] is None else f"{x['mean']:.3g} ± {x['std']:.2g}"
  for fmt in results["config"]["formats"]:
    row = [fmt]
    for m in mults:
      c = s.get(cell_name(fmt, m))
      row += ["-", "-"] if c is None else [pm(c["sharpness_final"]), pm(c["sharpness_max"])]
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  sb = results.get("sharpness_before_divergence")
  if sb:
    d, c = sb["diverged_log_rise"], sb["control_log_rise"]
    fmt_s = lambda x: "-" if x["mean"] is None else f"{x['mean']:.3f} ± {x['std']:.3f} (n={x['n']})"
    lines += ["## Does sharpness rise before divergence?", "",
              f"log(phi before divergence / phi early): diverged runs {fmt_s(d)}; "
              f"runs that did not diverge (control, last / early) {fmt_s(c)}. "
              f"Verdict: {sb['verdict']}.", ""]
  lines += [f"Wall time {results.get('wall_time_s', 0):.0f} s on {results.get('backend')} "
            f"({results.get('devices', [''])[0]}), jax {results.get('jax')}.", ""]
  return "\n".join(lines)


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=110)
  _plt().close(fig)
  os.replace(tmp, path)
  return path


def plot_heatmap(results: Mapping, path: pathlib.Path) -> pathlib.Path:
  """Formats x learning rates: diverged fraction, final validation loss and final
  sharpness (means over the runs that did not diverge)."""
  plt = _plt()
  fmts, mults = results["config"]["formats"], results["config"]["lr_multipliers"]
  div = np.full((len(fmts), len(mults)), np.nan)
  loss, sharp = np.full_like(div, np.nan), np.full_like(div, np.nan)
  mean = lambda st: np.nan if st["mean"] is None else st["mean"]
  for i, f in enumerate(fmts):
    for j, m in enumerate(mults):
      c = results["summary"].get(cell_name(f, m))
      if c:
        div[i, j] = c["diverged"] / c["runs"]
        loss[i, j] = mean(c["final_eval_loss"])
        sharp[i, j] = mean(c["sharpness_final"])
  fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(fmts) + 2))
  for ax, data, title, cmap in ((axes[0], div, "diverged fraction", "Reds"),
                                (axes[1], loss, "final validation loss", "viridis_r"),
                                (axes[2], sharp, "final sharpness phi", "magma_r")):
    im = ax.imshow(data, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(mults)), [_lr_label(m) for m in mults])
    ax.set_yticks(range(len(fmts)), fmts)
    ax.set_xlabel("learning rate (x tuned base)")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(data):
      # White labels on the dark half of the colour map so every cell stays readable.
      dark = not np.isnan(v) and sum(im.cmap(im.norm(v))[:3]) < 1.5
      ax.text(j, i, "-" if np.isnan(v) else f"{v:.3g}", ha="center", va="center",
              fontsize=8, color="white" if dark else "black")
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  return _save(fig, path)


def plot_series(results: Mapping, path: pathlib.Path, key: str, ylabel: str
                ) -> pathlib.Path:
  """Mean over seeds of `key` ("loss" or "sharpness") per format, one panel per lr."""
  plt = _plt()
  fmts, mults = results["config"]["formats"], results["config"]["lr_multipliers"]
  fig, axes = plt.subplots(1, len(mults), figsize=(4.5 * len(mults), 3.8), squeeze=False)
  cmap = plt.get_cmap("tab20")
  for j, m in enumerate(mults):
    ax = axes[0, j]
    for i, f in enumerate(fmts):
      c = results["cells"].get(cell_name(f, m))
      if not c:
        continue
      y = _arr(c[key])
      x = np.asarray(c["sharpness_steps"]) if key == "sharpness" else \
          np.arange(1, y.shape[1] + 1)
      with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        mean = np.nanmean(y, axis=0)
      if key == "loss" and mean.size > 20:  # smooth the per-step noise
        k = max(1, mean.size // 50)
        mean = np.convolve(np.nan_to_num(mean, nan=np.nan), np.ones(k) / k, mode="same")
      ax.plot(x, mean, label=f, color=cmap(i % 20), lw=1.2)
    ax.set_title(f"lr {_lr_label(m)}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if key == "sharpness":
      ax.set_yscale("log")
  axes[0, -1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  return _save(fig, path)


# --------------------------------------------------------------------------- run


def cell_name(fmt: str, mult: float) -> str:
  return f"{fmt}@{mult:g}x"


def identity(config) -> dict:
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  keep = ("steps", "batch_size", "seq_len", "seeds", "rounding", "mask_attention",
          "optimizer", "model", "sharpness", "eval", "corpus", "tokenizer")
  d = common.to_dict(config)
  return json.loads(json.dumps({k: d[k] for k in keep if k in d}))


def run(config, workdir: str | os.PathLike) -> dict:
  """Runs the study; returns (and writes) results.json's contents."""
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  sw = common.Stopwatch()
  workdir = common.prepare_workdir(workdir)
  check_config(config)
  data = Data(config.corpus, config.tokenizer)
  model_cfg = common.model_config(config.model, data.vocab_size, "precision_stability")
  ident = identity(config)
  path = workdir / "results.json"
  prev = common.load_previous(path, ident, "precision_stability")
  raw = dict(prev.get("raw", {}))  # "fmt@lr" (absolute lr) -> train_cell output
  results = {"job": "precision_stability", "variant": config.get("variant", ""),
             "config": common.to_dict(config), "identity": ident,
             "num_params": model_cfg.num_params(), "vocab_size": data.vocab_size,
             "jax": jax.__version__, "backend": jax.default_backend(),
             "devices": [str(d) for d in jax.devices()], "raw": raw}

  def cell(fmt, lr):
    key = f"{fmt}@lr={lr:.6g}"
    if key not in raw:
      print(f"precision_stability: {fmt} at lr {lr:.3g} ({len(config.seeds)} seeds)",
            flush=True)
      raw[key] = train_cell(config, model_cfg, data, fmt, lr,
                            log=lambda s: print(s, flush=True))
      r = raw[key]
      print(f"  done in {r['seconds']:.1f} s (compile {r['compile_s']:.1f} s); final val "
            "loss " + " ".join("nan" if v is None else f"{v:.3f}"
                               for v in r["final_eval_loss"]), flush=True)
      results["wall_time_s"] = round(sw.elapsed() + prev.get("wall_time_s", 0.0), 2)
      common.write_json_atomic(path, results)
    return raw[key]

  if config.base_lr > 0:
    base_lr, source = float(config.base_lr), "config.base_lr"
  else:  # tune: the FP32 run with the lowest mean final validation loss
    scores = {}
    for lr in config.tune_lrs:
      fl = [v for v in cell("fp32", float(lr))["final_eval_loss"] if v is not None]
      scores[float(lr)] = float(np.mean(fl)) if len(fl) == len(config.seeds) else math.inf
    base_lr = min(scores, key=scores.get)
    source = ("tuned: the FP32 run with the lowest validation loss among " +
              ", ".join(f"{k:.3g} ({v:.3f})" for k, v in scores.items()))
  results["base_lr"], results["base_lr_source"] = base_lr, source
  print(f"precision_stability: base learning rate {base_lr:.3g} ({source})", flush=True)
  results["cells"] = {}
  for fmt in config.formats:
    for mult in config.lr_multipliers:
      results["cells"][cell_name(fmt, mult)] = cell(fmt, base_lr * mult)
  results["summary"] = {name: summarize_cell(c, margin=config.margin,
                                             patience=config.patience)
                        for name, c in results["cells"].items()}
  results["sharpness_before_divergence"] = sharpness_before_divergence(
      results["cells"], results["summary"])
  results["wall_time_s"] = round(sw.elapsed() + prev.get("wall_time_s", 0.0), 2)
  common.write_json_atomic(path, results)
  common.write_bytes_atomic(workdir / "table.md", markdown_report(results).encode())
  plot_heatmap(results, workdir / "heatmap.png")
  plot_series(results, workdir / "sharpness.png", "sharpness", "last-token sharpness phi")
  plot_series(results, workdir / "loss_curves.png", "loss", "training loss")
  from configs import precision_stability as ps_config  # pylint: disable=g-import-not-at-top
  common.write_command(
      workdir, common.command_line(config, workdir, VARIANT_CONFIG,
                                   ps_config.get_config(config.get("variant", "tiny"))),
      f"{results['wall_time_s']:.0f} s on {results['backend']} ({results['devices'][0]}), "
      f"jax {results['jax']}.")
  print(markdown_report(results), flush=True)
  return results
