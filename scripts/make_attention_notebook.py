"""Writes colab/attention_variants.ipynb (its cells live here, as code, so they diff).

    python scripts/make_attention_notebook.py
"""

import pathlib

import nbformat
from nbformat import v4

OUT = pathlib.Path(__file__).parents[1] / "colab" / "attention_variants.ipynb"

CELLS = [
    ("md", r"""# Attention variants: softmax vs Affine-Scaled Attention

`ModelConfig.attention` picks how a decoder turns scores into attention weights:
`"softmax"`, `"off_by_one"`, `"sink"`, `"gated"`, `"affine"`, `"affine_gated"`
(`jaxsun.nn.attention`). This notebook compares two of them:

* **softmax**: $\mathrm{softmax}(QK^\top/\sqrt{d})\,V$. Every query's weights are
  non-negative and sum to 1, so a head that has nothing useful to read must still put its
  mass somewhere; trained models often park it on the first token (an *attention sink*).
* **affine** (Affine-Scaled Attention): $\big[\alpha(X)\,\mathrm{softmax}(QK^\top/\sqrt{d})
  + \beta(X)\big]\,V$ with $\alpha = \phi(X W_\alpha)$, one scalar per head and query token
  ($\phi(x) = \mathrm{clip}(0.1x + 0.5, 0, 1)$), and $\beta = (\alpha_{ma} - \alpha)/N$ added
  to every visible key. $\alpha_{ma}$ is a moving average of the batch-mean $\alpha$ (one
  per layer and head), updated by training steps only, and $N$ the key sequence length
  (`AffineConfig`). A head can scale its softmax down ($\alpha < 1$) instead of dumping
  mass on a sink, and the weights need not sum to 1.

It
1. pretrains one small model per variant on the shipped Shakespeare corpus with the
   library's trainer (same initial seed, same batches) and plots the training curves;
2. measures the trained models' attention with `jaxsun.analysis` (entropy and the weight
   on the first token, per layer) and plots them side by side;
3. shows the affine model's $\alpha_{ma}$ per layer and head, and the per-query mass
   $\sum_s w_s$ it leads to.

The test suite runs this notebook on a small setting (`JAXSUN_NOTEBOOK_SMALL=1`: a tiny
model, tens of steps); the full setting is a few minutes on a Colab GPU."""),
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
import jax, numpy as np
from flax import nnx
import matplotlib.pyplot as plt
from IPython.display import Image, display
import jaxsun
from jaxsun import analysis, data
from jaxsun.train.optim import OptimizerConfig
from jaxsun.train.trainer import TrainConfig, Trainer

SMALL = os.environ.get("JAXSUN_NOTEBOOK_SMALL") == "1"  # set by the test suite
KINDS = ("softmax", "affine")
STEPS = 40 if SMALL else 600
SEQ_LEN, BATCH = (64, 8) if SMALL else (128, 32)
tok = data.get_tokenizer("bpe4k")  # the BPE trained on the shipped corpus
print("jax", jax.__version__, jax.devices())"""),
    ("md", """## 1. Pretrain one model per variant

Both models have the same shape and the same initial seed (the affine one has a few more
parameters: $W_\\alpha$, one column per head), and see the same packed batches of the
shipped corpus (`jaxsun.data.lm_batches`; the TFDS data dir is `$JAXSUN_TFDS_DIR`, else
`~/.cache/jaxsun/tfds`, prepared from the repository once). `jaxsun.train.Trainer` trains
the tied model (`trainability="both"`) with AdamW and a warmup-cosine schedule; it also
writes the affine layers' $\\alpha_{ma}$ moving averages at every step."""),
    ("code", """models, histories, alpha_ma_before = {}, {}, None
for kind in KINDS:
  cfg = jaxsun.ModelConfig(vocab_size=tok.vocab_size, d_model=64 if SMALL else 128,
                           n_layers=2 if SMALL else 4, n_heads=4, n_kv_heads=2,
                           d_ff=128 if SMALL else 384, max_len=SEQ_LEN, attention=kind,
                           name=kind)
  model = jaxsun.Decoder(cfg, rngs=nnx.Rngs(0))
  if kind == "affine":  # alpha_ma per layer and head before training: f32[L, H]
    alpha_ma_before = np.stack([np.asarray(blk.attn.alpha_ma[...]) for blk in model.layers])
  trainer = Trainer(jaxsun.SplitModel.from_model(model),
                    TrainConfig(steps=STEPS, trainability="both", log_every=max(STEPS // 4, 1),
                                optimizer=OptimizerConfig(3e-3, warmup_steps=STEPS // 10,
                                                          schedule="cosine")))
  batches = data.lm_batches("shakespeare", tok, seq_len=SEQ_LEN, batch_size=BATCH, seed=0)
  histories[kind] = trainer.fit(batches, label=f"trained {kind}")
  models[kind] = trainer.split.prefill_module()  # the trained Decoder
  print(f"{kind}: {cfg.num_params():,} parameters, final training loss "
        f"{histories[kind][-1]['loss']:.3f}")"""),
    ("md", """Training loss and gradient norm per step (`jaxsun.analysis.plot_training_curves`;
an x marks a loss spike, a step whose loss exceeds the median of the previous steps by
k median absolute deviations, `jaxsun.analysis.loss_spikes`)."""),
    ("code", """curves = {kind: {"steps": [h["step"] for h in hist], "loss": [h["loss"] for h in hist],
                 "grad_norm": [h["grad_norm"] for h in hist]}
          for kind, hist in histories.items()}
WINDOW = 10 if SMALL else 50  # the spike rule's trailing window (steps)
display(Image(filename=str(analysis.plot_training_curves(
    curves, "training_curves.png", k=6, window=WINDOW,
    title="softmax vs affine: pretraining on the shipped corpus"))))
for kind, c in curves.items():
  st = analysis.stability_summary(c["loss"], c["grad_norm"], ks=(6,), window=WINDOW,
                                  steps=c["steps"])
  print(f"{kind}: {st['loss_spikes']['6']['count']} loss spikes (k=6), "
        f"grad-norm variance {st['grad_norm_variance']:.4g}")"""),
    ("md", """## 2. Attention statistics

`jaxsun.analysis.attention_summary(model, tokens)` runs the model on a validation batch,
takes every layer's *effective* weights $w$ (`Decoder.attention_weights`: f32[L, B, H,
T, T], after everything the variant does: for affine $\\alpha\\,\\mathrm{softmax} + \\beta$)
and averages over queries:

* **entropy** (nats) of $p = |w| / \\sum |w|$ per query: low when a head looks at a few
  keys, $\\log(t+1)$ when it spreads evenly over the $t+1$ visible keys. $|w|$ because
  affine weights can be negative and need not sum to 1; for softmax $p = w$.
* **first-token mass**: the raw weight on key 0 (queries $t \\geq 1$), the usual
  attention-sink position.

Left: entropy per layer; right: first-token mass per layer. Lines are the mean over
heads, the shaded band the range over heads."""),
    ("code", """batch = next(data.lm_batches("shakespeare", tok, seq_len=SEQ_LEN,
                             batch_size=BATCH, split="validation"))
valid = batch["loss_mask"] > 0  # packed rows; only the last batch of the split has padding
tokens = batch["tokens"]
summaries = {kind: analysis.attention_summary(models[kind], tokens, valid) for kind in KINDS}
for key, label in (("entropy", "entropy per layer"),
                   ("first_token_mass", "first-token mass per layer")):
  for kind, s in summaries.items():
    print(f"{label}: {kind} {np.round(s[key]['per_layer'], 4).tolist()}")

pngs = (analysis.plot_entropy_per_layer(summaries, "entropy.png"),
        analysis.plot_first_token_mass_per_layer(summaries, "first_token_mass.png"))
fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.2), dpi=150)  # the two PNGs side by side
for ax, png in zip(axes, pngs):
  ax.imshow(plt.imread(png)); ax.axis("off")
fig.subplots_adjust(0, 0, 1, 1, wspace=0)
plt.show()"""),
    ("md", """## 3. The affine model's $\\alpha$ statistics

$\\alpha_{ma}$ per layer and head: it starts at `AffineConfig.alpha_ma_init` (0, as in the
paper) and follows the batch mean of $\\alpha$ with decay $\\rho = 0.9$ at every training
step. The per-query mass $\\sum_s w_s = \\alpha + \\beta\\,(t+1)$ is 1 for every softmax
query; for affine it is below 1 when a head scales its softmax down, and grows along the
sequence when $\\alpha_{ma} > \\alpha$."""),
    ("code", """alpha_ma = np.stack([np.asarray(blk.attn.alpha_ma[...]) for blk in models["affine"].layers])
print("alpha_ma per layer (rows) and head (columns):")
print(np.array2string(alpha_ma, precision=4))
print(f"alpha_ma before training: {np.unique(alpha_ma_before).tolist()}")
print(f"alpha_ma moved from its initial value: {bool(np.any(alpha_ma != alpha_ma_before))} "
      f"(max |change| {np.abs(alpha_ma - alpha_ma_before).max():.4f})")
for kind, s in summaries.items():
  print(f"per-query mass, mean per layer: {kind} {np.round(s['query_mass']['mean'], 4).tolist()}")

fig, ax = plt.subplots(figsize=(5, 2.8))
im = ax.imshow(alpha_ma, cmap="viridis", aspect="auto")
ax.set_xlabel("head"); ax.set_ylabel("layer"); ax.set_title("affine: alpha_ma after training")
ax.set_xticks(range(alpha_ma.shape[1])); ax.set_yticks(range(alpha_ma.shape[0]))
fig.colorbar(im, ax=ax)
plt.show()"""),
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
