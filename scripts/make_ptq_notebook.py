"""Writes colab/ptq.ipynb (its cells live here, as code, so they diff).

    python scripts/make_ptq_notebook.py
"""

import pathlib

import nbformat
from nbformat import v4

OUT = pathlib.Path(__file__).parents[1] / "colab" / "ptq.ipynb"

CELLS = [
    ("md", r"""# Post-training quantization: RTN vs LRQ vs UniQuanF, and uniform -> BCQ

`jaxsun.quant.api.quantize(model, rules, method=...)` quantizes a trained decoder's
`Linear`s: a *rule* maps a layer-path regex to a *scheme* (`"w4a16"`, `"w3a16g32"` = 3-bit
weights in groups of 32 input channels, 16-bit activations, ...), and `method` says how
the integer weights are found:

* **RTN**: round each weight to the nearest point of a per-channel (or per-group) min/max
  grid. No data.
* **LRQ** (Low-Rank Quantization, NAACL 2025): block-wise reconstruction. Each decoder
  block's quantized output is fitted to the float block's output on calibration
  sequences by learning the grid scale $s_1$ and a divisor
  $S = \exp(L U + r\mathbf{1}^\top + \mathbf{1}c^\top)$ of rank $r$ that decides which
  way each weight rounds: $\hat W = s_1 \lfloor W \oslash (s_1 S) \rceil$. FlexRound
  learns a full matrix instead of $LU$; LRQ's rank-$r$ form has far fewer parameters.
* **UniQuanF** (ACL 2025): the same reconstruction, but the levels are non-uniform
  binary-coding (BCQ) levels $\sum_i \alpha_i \beta_i + o$ per row and group, reached
  through FlexRound's learnable transformation; it starts exactly at the uniform grid
  and the result is an ordinary BCQ weight.

Then the **unification theorem** of UniQuanF: a uniform integer weight
$s\,(q - z)$ is exactly a binary-coding (BCQ) weight $\sum_i \alpha_i \beta_i + o$ with
$\alpha_i = (s/2)\,2^i$, $\beta_i \in \{-1, +1\}$ (the bits of $q$), which LUT-GEMM-style
kernels run. `api.to_bcq` converts a quantized model; its outputs are the same.

It
1. pretrains a small byte-level model on the shipped Shakespeare corpus (the PTQ
   study's base model, `configs/ptq.py`);
2. measures perplexity in domain (Shakespeare validation) and out of domain
   (`gsm_symbolic` word problems) with the papers' protocol (`jaxsun.eval.perplexity`);
3. quantizes it with RTN, LRQ and UniQuanF at `w3a16g32` and compares;
4. converts the quantized models to BCQ and checks the outputs match;
5. plots the perplexities.

The test suite runs this notebook on a small setting (`JAXSUN_NOTEBOOK_SMALL=1`); the
full setting (the study's `:tiny` base model and settings) takes a few minutes on CPU.
The whole grid of methods and schemes is `python -m experiments.launch
--config=configs/ptq.py:tiny --workdir=/tmp/ptq_tiny` (results in
`experiments/results/ptq/`)."""),
    ("code", """# Install (Colab): clone the repository next to this notebook, then install it (a regular,
# non-editable install, as a user would) with the extras this notebook needs. Skipped when
# jaxsun is already importable (local runs, tests).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("jaxsun") is None:
  repo = os.environ.get("JAXSUN_REPO", "..")  # the folder holding pyproject.toml
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         f"{repo}[data,notebook]"])"""),
    ("code", """%matplotlib inline
import os, pathlib, tempfile, time
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
import jaxsun
from jaxsun import data
from jaxsun.quant import api
from jaxsun.quant.ptq.reconstruct import ReconConfig
from jaxsun.jobs import ptq
from configs import ptq as ptq_config

SMALL = os.environ.get("JAXSUN_NOTEBOOK_SMALL") == "1"  # set by the test suite
config = ptq_config.get_config("smoke" if SMALL else "tiny")
workdir = pathlib.Path(tempfile.mkdtemp(prefix="ptq_nb_"))
tok = data.get_tokenizer(config.tokenizer)
print("jax", jax.__version__, jax.devices())"""),
    ("md", """## 1. The base model

`ptq.base_model` pretrains a tied decoder on packed Shakespeare batches with the library's
trainer (`jaxsun.jobs.lm.pretrain`: resumable from `workdir`), and returns the plain
`Decoder`."""),
    ("code", """model, base = ptq.base_model(config, workdir, tok)
print(f"{base['num_params']:,} parameters, validation loss {base['validation_loss']:.3f} "
      f"after {base['steps']} steps")"""),
    ("md", """## 2. Perplexity, the papers' protocol

Join the held-out texts with blank lines, tokenize once, cut into non-overlapping windows
of `seq_len`, and report exp(mean NLL) (`jaxsun.eval.perplexity.token_perplexity`). In
domain: Shakespeare validation; out of domain: the `gsm_symbolic` task text (prompt +
answer of each record), which this model never saw. A uniform guess over the byte
vocabulary scores 259."""),
    ("code", """streams = ptq.eval_streams(config, tok)
SEQ, BS = config.eval.seq_len, config.eval.batch_size
ppl = {"float": ptq.perplexities(model, streams, seq_len=SEQ, batch_size=BS)}
print({k: v.size for k, v in streams.items()}, "tokens;", "float:", ppl["float"])"""),
    ("md", """## 3. RTN, LRQ and UniQuanF at w3a16g32

One rule quantizes every attention and MLP projection. LRQ and UniQuanF need calibration
sequences (random windows of Shakespeare *train*) and a `ReconConfig` (steps per block,
batch, lr; UniQuanF also `lr_b` for its BCQ scales); the report counts the parameters
reconstruction learns."""),
    ("code", """SCHEME = "w3a16g32"
rules = [(r"layers/\\d+/(attn|mlp)/.*", SCHEME)]
train_ids = ptq.corpus_ids("shakespeare", "train", tok)
calib = ptq.calibration_tokens(train_ids, config.calib.n_sequences, config.calib.seq_len, seed=0)
steps = 4 if SMALL else config.recon.steps
recon = ReconConfig(steps=steps, batch_size=config.recon.batch_size, lr=config.recon.lr.lrq, seed=0)
recon_uq = ReconConfig(steps=steps, batch_size=config.recon.batch_size,
                       lr=config.recon.lr.uniquanf, lr_b=config.recon.lr_b, seed=0)
qmodels, reports = {}, {}
for method, kw in [("rtn", {}),
                   ("lrq", dict(calib_tokens=calib, recon=recon,
                                method_options={"rank": config.lrq_rank})),
                   ("uniquanf", dict(calib_tokens=calib, recon=recon_uq))]:
  t0 = time.perf_counter()
  qmodels[method], reports[method] = api.quantize(model, rules, method=method, **kw)
  ppl[method] = ptq.perplexities(qmodels[method], streams, seq_len=SEQ, batch_size=BS)
  params = sum(v["params"] for v in reports[method]["layers"].values())
  print(f"{method} {SCHEME}: ppl ID {ppl[method]['id']:.3f} OOD {ppl[method]['ood']:.3f}, "
        f"{params:,} learnable parameters ({time.perf_counter() - t0:.1f} s)")
layer = "layers/0/mlp/up_proj"
print(layer, {k: v for k, v in reports["lrq"]["layers"][layer].items()})
print("float:", ppl["float"])"""),
    ("md", """## 4. Uniform -> BCQ, exactly

`api.to_bcq` replaces every `IntLinear` by a `BCQLinear` holding $\\alpha$ (one scale per
bit, row and group), the binary codes and an offset: the same weights, so the same
logits (up to float rounding of the sums). UniQuanF's model is BCQ already."""),
    ("code", """from flax import nnx
tokens = calib[:2, :32]
for method in ("rtn", "lrq"):
  qm = qmodels[method]
  bq = api.to_bcq(qm)
  before = sorted({type(m).__name__ for _, m in nnx.iter_modules(qm) if "Linear" in type(m).__name__})
  after = sorted({type(m).__name__ for _, m in nnx.iter_modules(bq) if "Linear" in type(m).__name__})
  a, b = np.asarray(qm(tokens)[0]), np.asarray(bq(tokens)[0])
  err = float(np.abs(a - b).max())
  print(f"{method}: {before} -> {after}; max |logit(int) - logit(bcq)| = {err:.2e}; "
        f"BCQ outputs == integer outputs: {err < 1e-4}")
  if method == "lrq":
    bq_lrq = bq
print("BCQ perplexity (lrq):", ptq.perplexities(bq_lrq, streams, seq_len=SEQ, batch_size=BS))
print("uniquanf layers:", sorted({type(m).__name__ for _, m in nnx.iter_modules(qmodels["uniquanf"])
                                  if "Linear" in type(m).__name__}))"""),
    ("md", "## 5. Plot"),
    ("code", """names = list(ppl)
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(6.5, 3.2))
ax.bar(x - 0.2, [ppl[n]["id"] for n in names], 0.4, label="in domain (Shakespeare)")
ax.bar(x + 0.2, [ppl[n]["ood"] for n in names], 0.4, label="out of domain (gsm_symbolic)")
ax.set_xticks(x); ax.set_xticklabels([n if n == "float" else f"{n} {SCHEME}" for n in names])
ax.set_ylabel("perplexity"); ax.legend(fontsize=8)
ax.set_title("float vs RTN vs LRQ vs UniQuanF")
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
