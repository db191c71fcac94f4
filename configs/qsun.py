r"""QSUN: SUN task models with the shared decode module quantized, against SUN.

    python -m experiments.launch --config=configs/qsun.py:tiny --workdir=/tmp/qsun_tiny
    python -m experiments.launch --config=configs/qsun.py:smoke --workdir=/tmp/qsun_smoke
    python -m experiments.launch --config=configs/qsun.py:gpu --workdir=/tmp/qsun_gpu

What it does (`jaxsun.jobs.qsun`): the fine-tuning study's base model
(`configs/finetune_split.py`, same pretraining; a shared workdir reuses it), SUN task
models (prefill tree fine-tuned at the learning rate the study chose on validation),
scored by exact match with the float decode tree and with each quantized shared decode
tree in `qsun.variants` ("<method>:<scheme>", `jaxsun.quant.api`; AWQ is what the SUN
paper's QSUN is reported to use), and with the prefill tree fine-tuned against the
quantized decode tree (`qsun.qa_variants`). Per variant also the dense-weight bytes a
decode step reads and this machine's decode-step time (batch 8).

Variants and expected cost:
  * `:tiny` (2 CPU cores): 2 tasks x 3 seeds, SUN + 1 QA run per seed (12 fine-tuning
    runs of 1000 steps) and 5 decode trees: 400 s measured (sharing the cores).
  * `:smoke`: seconds (tests).
  * `:gpu`: the fine-tuning study's `:gpu` model and settings; not run here.

Measured result (`:tiny`, 2026-12-02, CPU; experiments/results/qsun/README.md): exact
match at 8/4/3 bits within SUN's seed noise on both tasks, the 2-bit control far below
(rotate_matrix 1.000 -> 0.550 ± 0.112); QA prefill tuning at 3 bits brings rotate_matrix's
answer loss back to the float tree's (0.603 ± 0.003 vs 0.646 ± 0.005 without, 0.607 float);
dense-weight bytes per decode step 0.160x of float32 at 4 bits (groups of 32).
"""

import ml_collections

from configs import finetune_split

# The prefill regime's learning rates chosen on validation by configs/finetune_split.py
# :tiny (experiments/results/finetune_split/table.md).
TINY_LR = {"spell_backward": 2e-3, "rotate_matrix": 4e-3, "word_sequence_reversal": 4e-3}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in ("tiny", "smoke", "gpu"):
    raise ValueError(f"unknown variant {arg!r} of configs/qsun.py (use :tiny, :smoke or :gpu)")
  c = finetune_split.get_config("gpu" if variant == "gpu" else "tiny")
  c.unlock()
  c.job = "qsun"
  c.variant = variant
  c.tasks = ("spell_backward", "rotate_matrix")
  c.regimes = ("full", "prefill")  # (checked by the fine-tuning study's validation)
  c.lr = ml_collections.ConfigDict(TINY_LR)
  c.eval.test_items = 200
  c.qsun = ml_collections.ConfigDict(dict(
      variants=("rtn:w8a16", "rtn:w4a16g32", "awq:w4a16g32", "rtn:w3a16g32",
                "rtn:w2a16g32"),
      qa_variants=("rtn:w3a16g32",),
      calib_sequences=16, calib_seq_len=128))
  if variant == "smoke":
    c.tasks = ("rotate_matrix",)
    c.seeds = (0,)
    c.pretrain.update(steps=10, eval_every=10, checkpoint_every=10, log_every=5)
    c.finetune.update(steps=4, log_every=2)
    c.eval.update(test_items=16, batch_size=16)
    c.qsun.update(variants=("rtn:w4a16g32", "rtn:w2a16g32"), qa_variants=("rtn:w2a16g32",),
                  calib_sequences=2, calib_seq_len=32)
  elif variant == "gpu":
    c.lr = ml_collections.ConfigDict({t: 1e-3 for t in TINY_LR})
  c.lock()
  return c
