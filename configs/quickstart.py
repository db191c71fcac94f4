r"""The main job: a tiny base LM, fine-tuned per task in four regimes, exact match.

Launch (`make quickstart` runs the first line):

    python -m experiments.launch --config=configs/quickstart.py --workdir=/tmp/jaxsun_quickstart
    python -m experiments.launch --config=configs/quickstart.py:smoke --workdir=/tmp/qs_smoke
    python -m experiments.launch --config=configs/quickstart.py --workdir=/tmp/qs \
        --config.finetune.steps=200 --config.tasks='("basic_arithmetic","letter_counting")'

What it does (`jaxsun.jobs.quickstart`): pretrain a byte-level base decoder on the
shipped Shakespeare corpus mixed with the tasks' train text; fine-tune it on each task
(answers of 4-7 tokens, so the decode tree writes most of each answer) in the regimes
full / prefill (SUN) / decode (PrefillShare) / none, 1000 steps of 8 rows each, with the
learning rate of each task and regime chosen on the validation split by the study
`configs/finetune_split.py:tiny` (which trains this very base model); score exact match
by greedy generation through the split on 200 held-out test items per task, next to the
constant-answer baseline (the most common train answer) and each shared-module
regime's ratio to full fine-tuning.

Expected runtime on 2 CPU cores: about 4 minutes (default), under 1 minute (`:smoke`).
A rerun in the same workdir resumes from the checkpoints and takes far less.

Measured (2026-12-02, 2 CPU cores, jax 0.11.2, CPU backend): 252 s inside the job
(4 min 14 s for the command, with or without the compilation cache); base: 213,760
parameters, validation loss 2.356 after 200 steps of 32x128 tokens. Exact match on 200
test items (the run is deterministic: two runs gave the same table):

    task             baseline   full   prefill  prefill/full  decode  decode/full  none
    spell_backward      0.000  0.950     0.270         0.284   0.625        0.658  0.000
    rotate_matrix       0.000  1.000     1.000         1.000   1.000        1.000  0.000

Answer-token loss on 200 test items: spell_backward 0.037 / 0.776 / 0.245 / 2.850 and
rotate_matrix 0.000 / 0.604 / 0.000 / 1.152 (full / prefill / decode / none). The
shared tree stayed bitwise unchanged in both shared-module regimes. This is one seed;
the study's 3 seeds show how much spell_backward varies from seed to seed (full
0.692 ± 0.254, experiments/results/finetune_split/).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "quickstart"
  c.seed = 0
  c.tokenizer = "byte"  # "byte", "bpe4k" or "gpt2" (jaxsun.data.get_tokenizer)
  # Answers of 4-7 tokens: the decode tree writes all but the first (SUN) or all (PS).
  c.tasks = ("spell_backward", "rotate_matrix")  # jaxsun.data.TASKS
  c.regimes = ("full", "prefill", "decode", "none")  # jaxsun.jobs.finetune.REGIMES
  c.data_dir = ""  # TFDS data dir for the prepared datasets; "" = <workdir>/tfds
  c.compilation_cache_dir = ""  # "" = ~/.cache/jaxsun/jax_compilation_cache; "none" = off

  # The base model (jaxsun.ModelConfig fields; vocab_size comes from the tokenizer).
  c.model = ml_collections.ConfigDict(dict(
      d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=192, max_len=128))

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.corpus = "shakespeare"  # jaxsun.data.CORPORA
  c.pretrain.task_text_weight = 0.3  # fraction of rows drawn from task-formatted text
  c.pretrain.seq_len = 128
  c.pretrain.batch_size = 32
  c.pretrain.steps = 200
  c.pretrain.eval_every = 100  # validation loss every this many steps (and at the end)
  c.pretrain.eval_batches = 4  # validation batches for the validation loss
  c.pretrain.log_every = 25
  c.pretrain.checkpoint_every = 100
  c.pretrain.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, schedule="cosine", warmup_steps=20, weight_decay=0.1,
      grad_clip_norm=1.0))

  c.finetune = ml_collections.ConfigDict()
  c.finetune.seq_len = 0  # 0: the task's longest row (no example dropped)
  # Small batches, many steps: at this size learning is step-bound, and a step of 8
  # rows costs a fifth of one of 32 on 2 CPU cores.
  c.finetune.batch_size = 8
  c.finetune.steps = 1000
  c.finetune.log_every = 25
  c.finetune.checkpoint_every = 0  # 0: only the final step
  # Per task and regime, chosen on the validation split (never on test) by the study
  # `configs/finetune_split.py:tiny`, which trains this very base model (see above);
  # `default` serves tasks and regimes without an entry.
  c.finetune.learning_rates = ml_collections.ConfigDict(dict(
      default=dict(full=3e-3, prefill=3e-3, decode=3e-3, full_lora=4e-3,
                   prefill_lora=4e-3, decode_lora=4e-3),
      spell_backward=dict(full=4e-3, prefill=2e-3, decode=4e-3, full_lora=4e-3,
                          prefill_lora=4e-3, decode_lora=4e-3),
      rotate_matrix=dict(full=1e-3, prefill=4e-3, decode=2e-3, full_lora=1e-2,
                         prefill_lora=4e-3, decode_lora=4e-3)))
  c.finetune.optimizer = ml_collections.ConfigDict(dict(
      schedule="wsd", warmup_steps=20, decay_fraction=0.3, weight_decay=0.0,
      grad_clip_norm=1.0))
  c.finetune.lora = ml_collections.ConfigDict(dict(  # the *_lora regimes (jaxsun.lora)
      rank=8, alpha=16.0, dropout=0.0, targets=r"layers/\d+/(attn|mlp)/\w+_proj"))

  c.eval = ml_collections.ConfigDict()
  c.eval.test_items = 200  # test items per task for exact match
  c.eval.loss_items = 200  # test items per task for the answer-token loss
  c.eval.batch_size = 100

  if arg == "smoke":  # the same pipeline in well under a minute
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64)
    c.pretrain.update(steps=20, batch_size=8, seq_len=64, eval_batches=2, eval_every=10,
                      log_every=10, checkpoint_every=10)
    c.pretrain.optimizer.warmup_steps = 5
    c.finetune.update(steps=4, batch_size=8, log_every=2)
    c.finetune.optimizer.warmup_steps = 2
    c.eval.update(test_items=16, loss_items=16, batch_size=16)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} of configs/quickstart.py (use :smoke)")
  c.lock()
  return c
