"""Writes colab/precision.ipynb (its cells live here, as code, so they diff).

    python scripts/make_precision_notebook.py
"""

import pathlib

import nbformat
from nbformat import v4

OUT = pathlib.Path(__file__).parents[1] / "colab" / "precision.ipynb"

CELLS = [
    ("md", r"""# Reduced-precision training: masked GEMMs, loss and sharpness

"To FP8 and Back Again" asks whether training in fewer bits is as stable as BF16. It
simulates narrower floats inside float32 (*masked GEMMs*): every GEMM operand
(activations, weights, output gradients; forward and backward) is put on the grid of an
$E_xM_y$ format, with the exponent clamped to the format's range and the mantissa
truncated (or rounded to nearest). `jaxsun.quant.masked_gemm` does this for every
attention / MLP projection of a jaxsun decoder:

    cfg = masked_gemm.MaskedGemm.parse("e8m3")     # 8 exponent, 3 mantissa bits
    masked_gemm.apply(model, cfg)                  # Linear -> MaskedLinear, in place

The FP8 recipes are selectable the same way: `"fp8"` (E4M3 forward, E5M2 gradients,
per-tensor current scaling), `"fp8_delayed"` (amax-history scaling) and `"fp8_gaudi2"`
(E4M3 clipped at Gaudi 2's 240).

The paper's instrument is a **sharpness metric on the last token's logits** $x$:
$\phi = 100\,[\max_{|y| \le \epsilon(|x|+1)} f(x+y) - f(x)] / (1 + f(x))$ with $f$ the
loss, maximised here by a few projected sign-gradient steps
(`jaxsun.analysis.sharpness.last_token_sharpness`).

This notebook trains a few formats on a tiny byte-level model (3 seeds each, vmapped in
one step by `jaxsun.train.population.Population`) and plots loss and sharpness. The test
suite runs it on a small setting (`JAXSUN_NOTEBOOK_SMALL=1`); the full study over 11
formats x 3 learning rates is `python -m experiments.launch
--config=configs/precision_stability.py:tiny --workdir=/tmp/ps` (results in
`experiments/results/precision_stability/`)."""),
    ("code", """# Install (Colab): clone the repository next to this notebook, then install it (a regular,
# non-editable install, as a user would) with the extras this notebook needs. Skipped when
# jaxsun is already importable (local runs, tests).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("jaxsun") is None:
  repo = os.environ.get("JAXSUN_REPO", "..")  # the folder holding pyproject.toml
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         f"{repo}[data,notebook]"])"""),
    ("code", """%matplotlib inline
import os
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from jaxsun.analysis import stability
from jaxsun.jobs import common, precision_stability as ps
from jaxsun.quant import masked_gemm
from configs import precision_stability as ps_config

SMALL = os.environ.get("JAXSUN_NOTEBOOK_SMALL") == "1"  # set by the test suite
config = ps_config.get_config("smoke" if SMALL else "tiny")
with config.unlocked():
  config.formats = ("fp32", "e8m3", "e4m7", "fp8_delayed")
  config.seeds = (0, 1, 2)
  config.steps = 12 if SMALL else 200
  config.base_lr = 3e-3
print("jax", jax.__version__, jax.devices())"""),
    ("md", """## 1. What a format does to a value

Truncation and round-to-nearest differ where the dropped mantissa bits are non-zero
(1.078 at 3 mantissa bits: 1.0 truncated, 1.125 rounded); a narrow exponent clamps large
values at the format's max and flushes small ones below its smallest subnormal to zero."""),
    ("code", """values = jnp.asarray([1.078, 3.3, 500.0, 3e-3, 1e-5])
for name in ("e8m3", "e4m7", "e4m3", "e5m2"):
  fmt = masked_gemm.parse_format(name)
  near = masked_gemm.mask(values, fmt, rounding="nearest")
  trunc = masked_gemm.mask(values, fmt, rounding="truncate")
  print(f"{fmt.name}: max {fmt.max:g}, smallest subnormal {fmt.smallest_subnormal:.3g}")
  print("   nearest ", ", ".join(f"{v:g}" for v in np.asarray(near)))
  print("   truncate", ", ".join(f"{v:g}" for v in np.asarray(trunc)))"""),
    ("md", """## 2. Train each format (3 seeds in one vmapped step)

`ps.train_cell` builds the masked model for every seed, trains them together and returns
the per-seed loss series, the sharpness measurements and the final validation loss.
E4M7 (4 exponent bits, no scaling) has a smallest subnormal of $2^{-13}$: most gradients
of a small model fall below it and are flushed to zero."""),
    ("code", """data = ps.Data(config.corpus, config.tokenizer)
model_cfg = common.model_config(config.model, data.vocab_size, "precision_nb")
cells = {}
for fmt in config.formats:
  cells[fmt] = ps.train_cell(config, model_cfg, data, fmt, config.base_lr, log=lambda s: None)
  s = ps.summarize_cell(cells[fmt], margin=config.margin, patience=config.patience)
  fl = s["final_eval_loss"]
  print(f"{fmt:12s} {cells[fmt]['gemm']:26s} val loss {fl['mean']:.3f} ± {fl['std']:.3f}  "
        f"diverged {s['diverged']}/{s['runs']}  sharpness {s['sharpness_final']['mean']:.3g}  "
        f"({cells[fmt]['seconds']:.0f} s)")"""),
    ("md", "## 3. Loss and sharpness over training (mean over seeds)"),
    ("code", """fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for fmt, c in cells.items():
  loss = np.asarray(c["loss"], float).mean(0)
  axes[0].plot(np.arange(1, loss.size + 1), loss, label=fmt)
  axes[1].plot(c["sharpness_steps"], np.asarray(c["sharpness"], float).mean(0), "o-", label=fmt)
axes[0].set(xlabel="step", ylabel="training loss", title="loss")
axes[1].set(xlabel="step", ylabel="phi", title="last-token sharpness", yscale="log")
axes[1].legend(fontsize=8)
fig.tight_layout(); plt.show()"""),
    ("md", """## 4. Divergence detection

A run diverges at a non-finite loss, or when its loss stays `margin` nats above its
running minimum for `patience` steps. An injected NaN and an injected plateau show it:"""),
    ("code", """clean = np.asarray(cells["fp32"]["loss"][0], float)
nan_run = clean.copy(); nan_run[len(clean) // 2:] = np.nan
up_run = clean.copy(); up_run[len(clean) // 2:] = clean.max() + 2.0
for name, run in (("fp32 seed 0", clean), ("with NaN", nan_run), ("with a plateau", up_run)):
  d = stability.divergence(run, margin=1.0, patience=2)
  print(f"{name:15s} diverged={d.diverged} at step {d.index} ({d.reason})")"""),
]


def main():
  nb = v4.new_notebook()
  nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                               "name": "python3"}
  nb.cells = [v4.new_markdown_cell(src) if kind == "md" else v4.new_code_cell(src)
              for kind, src in CELLS]
  nbformat.validate(nb)
  nbformat.write(nb, OUT)
  print("wrote", OUT)


if __name__ == "__main__":
  main()
