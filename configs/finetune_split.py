r"""The fine-tuning study: tasks x regimes {full, prefill (SUN), decode (PrefillShare), none,
and the LoRA forms} x seeds, learning rates chosen per regime on validation.

    python -m experiments.launch --config=configs/finetune_split.py:tiny --workdir=/tmp/fs_tiny
    python -m experiments.launch --config=configs/finetune_split.py:gpu --workdir=/tmp/fs_gpu
    python -m experiments.launch --config=configs/finetune_split.py:paper --workdir=/ckpt/fs \
        --config.base.checkpoint=/models/Meta-Llama-3.1-8B \
        --config.tokenizer=file:/models/Llama-3.1-8B/tokenizer.json \
        --config.data.files.metamathqa=/data/MetaMathQA-40K.json \
        --config.data.files.evol_instruct_code=/data/EvolInstruct-Code-80k.json \
        --config.data.files.xlam_function_calling=/data/xlam_function_calling_60k.json

What it does: `jaxsun.jobs.finetune_split` (learning rates from `lr_grid` chosen on each
task's validation split with the first seed, then every seed at the chosen rate, scored
on test; mean ± std and the ratio to full fine-tuning; results.json, table.md, a plot).

Variants and their expected cost:
  * `:tiny` (2 CPU cores): the quickstart's base model (213,760 parameters, byte
    tokenizer, the same pretraining: `configs/quickstart.py` uses the learning rates this
    study chooses), 3 tasks x 7 regimes x 3 seeds, 4 learning rates per full-weight
    regime and 5 per LoRA regime, 1000 steps of batch 8 per run: 117 fine-tuning runs,
    about 80 minutes. Results, plot and the exact command:
    experiments/results/finetune_split/.
  * `:gpu` (one H100/H200): a 10.5M-parameter model (the `10m` shapes, byte tokenizer),
    2000 pretraining steps of 64x256 tokens, 2 learning rates per regime, 3 seeds, 1500
    steps of batch 32: 72 runs; estimated 10-15 minutes (not measured: no GPU run yet).
  * `:paper` (the papers' setting): Llama-3.1-8B, the user's base checkpoint (a Hugging
    Face directory, imported by `jaxsun.interop.load_hf`, or a jaxsun checkpoint),
    tokenizer and copies of MetaMathQA-40K / EvolInstruct-Code-80K / xLAM-function-
    calling-60K (never downloaded; a missing file is an error naming its config key).
    One epoch-sized run per cell (2500 steps of 16 x 1024 tokens = 41M tokens). Trained
    on `config.mesh` = fsdp 8 (one node of 8 x 80 GB GPUs); the memory estimate
    (`jaxsun.train.memory`, printed before the runs, checked against
    `config.device_memory_gb`) is 35 GiB per device for full fine-tuning and 64 GiB for
    SUN / PrefillShare (two trees), against 280 / 514 GiB on one device, which the
    check refuses. Estimated 6 x 10^18 FLOPs per full-FT run, ~2-3 GPU-hours each on
    H100 at 40% MFU. Not run here.

Measured result (`:tiny`, 2 CPU cores): see experiments/results/finetune_split/README.md.
"""

import ml_collections

from configs import quickstart

TINY_TASKS = ("spell_backward", "rotate_matrix", "word_sequence_reversal")
REGIMES = ("full", "prefill", "decode", "none", "full_lora", "prefill_lora", "decode_lora")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in ("tiny", "gpu", "paper"):
    raise ValueError(f"unknown variant {arg!r} of configs/finetune_split.py "
                     "(use :tiny, :gpu or :paper)")
  q = quickstart.get_config()
  c = ml_collections.ConfigDict()
  c.job = "finetune_split"
  c.variant = variant
  c.tokenizer = "byte"
  c.tasks = TINY_TASKS
  c.regimes = REGIMES
  c.seeds = (0, 1, 2)
  c.data_dir = ""
  c.data = ml_collections.ConfigDict()
  # Paths of the papers' fine-tuning sets (jaxsun.data.PAPER_TASKS), for `:paper`.
  c.data.files = ml_collections.ConfigDict(dict(
      metamathqa="", evol_instruct_code="", xlam_function_calling=""))
  c.model = ml_collections.ConfigDict(q.model.to_dict())
  c.base = ml_collections.ConfigDict(dict(seed=0, checkpoint=""))  # "" = pretrain here
  c.pretrain = ml_collections.ConfigDict(q.pretrain.to_dict())
  # Task text mixed into pretraining: the quickstart's tasks, so that `:tiny` trains
  # the quickstart's base model bit for bit (word_sequence_reversal is new to it).
  c.pretrain.text_tasks = tuple(q.tasks)
  c.finetune = ml_collections.ConfigDict(q.finetune.to_dict())
  del c.finetune["learning_rates"]  # chosen here, from lr_grid
  c.lr_grid = ml_collections.ConfigDict(dict(
      full=(1e-3, 2e-3, 4e-3, 8e-3), prefill=(1e-3, 2e-3, 4e-3, 8e-3),
      decode=(1e-3, 2e-3, 4e-3, 8e-3),
      full_lora=(1e-3, 2e-3, 4e-3, 1e-2, 2.5e-2),
      prefill_lora=(1e-3, 2e-3, 4e-3, 1e-2, 2.5e-2),
      decode_lora=(1e-3, 2e-3, 4e-3, 1e-2, 2.5e-2)))
  c.eval = ml_collections.ConfigDict(dict(validation_items=200, test_items=500,
                                          batch_size=100))
  # Training mesh (jaxsun.parallel.make_mesh) and the memory a device has: a regime
  # whose estimate (jaxsun.train.memory) does not fit is refused before any work.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  c.device_memory_gb = 0.0  # 0: no check

  if variant == "gpu":
    c.model = ml_collections.ConfigDict(dict(d_model=256, n_layers=12, n_heads=8,
                                             n_kv_heads=4, d_ff=768, max_len=256))
    c.pretrain.update(steps=2000, batch_size=64, seq_len=256, eval_every=500,
                      log_every=100, checkpoint_every=500)
    c.pretrain.optimizer.update(learning_rate=1e-3, warmup_steps=100)
    c.finetune.update(steps=1500, batch_size=32, log_every=100)
    for r in REGIMES[:3]:
      c.lr_grid[r] = (5e-4, 1e-3)
    for r in REGIMES[4:]:
      c.lr_grid[r] = (2e-3, 5e-3)
    c.eval.batch_size = 250
    c.device_memory_gb = 80.0
  elif variant == "paper":
    c.tasks = ("metamathqa", "evol_instruct_code", "xlam_function_calling")
    c.tokenizer = ""  # file:<path to the base model's tokenizer.json>: required
    c.model = ml_collections.ConfigDict(dict(preset="llama-3.1-8b", max_len=1024,
                                             compute_dtype="bfloat16",
                                             param_dtype="bfloat16"))
    c.pretrain.text_tasks = ()
    c.finetune.update(steps=2500, batch_size=16, seq_len=1024, log_every=50,
                      checkpoint_every=500)
    c.finetune.lora.update(rank=16, alpha=32.0, dropout=0.05)
    for r in REGIMES[:3]:
      c.lr_grid[r] = (1e-5, 2e-5)
    for r in REGIMES[4:]:
      c.lr_grid[r] = (1e-4, 2e-4)
    c.eval.update(validation_items=200, test_items=1000, batch_size=32)
    c.mesh.fsdp = 8  # one node of 8 x 80 GB GPUs
    c.device_memory_gb = 80.0
  c.lock()
  return c
