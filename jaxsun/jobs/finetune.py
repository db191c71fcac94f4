"""Training runs the jobs are made of: pretrain a base LM, fine-tune it in a regime.

A **regime** names how a task model is made from the base model:

    regime        trees                        trainability          last prompt token by
    full          tied (one tree)              both                  (one tree)
    prefill       untied, decode tree shared   prefill (SUN)         prefill tree
    decode        untied, prefill tree shared  decode (PrefillShare) decode tree
    none          the base model               -                     (one tree)
    full_lora     as full, LoRA adapters on the tree; only the adapters train
    prefill_lora  as prefill, adapters on the prefill tree (SUN with LoRA)
    decode_lora   as decode, adapters on the decode tree (PrefillShare with LoRA)

In the decode regimes the decode tree runs the last prompt token, so the task model (not
the shared base) picks the first answer token. LoRA regimes share the base arrays of
their adapted tree with the base model (`jaxsun.lora`): a task model costs its adapters.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import time
from typing import Callable, Iterator

import jax
from flax import nnx

import jaxsun
from jaxsun import lora
from jaxsun.jobs import common
from jaxsun.train.checkpoints import Checkpointer
from jaxsun.train import metrics as metrics_lib
from jaxsun.train.metrics import create_default_writer
from jaxsun.train.trainer import TrainConfig, Trainer, evaluate_loss

# regime -> (trainability, tree that runs the last prompt token, tree with adapters)
REGIMES = {
    "full": ("both", "prefill", None),
    "prefill": ("prefill", "prefill", None),
    "decode": ("decode", "decode", None),
    "none": ("none", "prefill", None),
    "full_lora": ("both", "prefill", "both"),
    "prefill_lora": ("prefill", "prefill", "prefill"),
    "decode_lora": ("decode", "decode", "decode"),
}


def check_regime(regime: str, what: str = "regime") -> None:
  if regime not in REGIMES:
    raise ValueError(f"unknown {what} {regime!r}; available: {list(REGIMES)}")


def regime_split(base: jaxsun.SplitModel, regime: str,
                 lora_cfg: lora.LoRAConfig | None = None, key: jax.Array | None = None
                 ) -> tuple[jaxsun.SplitModel, str]:
  """(the task model to train, its trainability) for `regime` (see the module docstring).

  Args:
    base: the base model (tied).
    regime: a name of `REGIMES`.
    lora_cfg: the adapters of the `*_lora` regimes (default `LoRAConfig()`).
    key: PRNG key of the adapters' initialisation (default `jax.random.key(0)`).
  """
  check_regime(regime)
  trainability, last, adapted = REGIMES[regime]
  split = base.replace(last_prompt_token=last)
  if trainability in ("prefill", "decode"):
    split = split.untie()
  if adapted is not None:
    split = lora.add_adapters(split, adapted, lora_cfg or lora.LoRAConfig(),
                              jax.random.key(0) if key is None else key)
  return split, trainability


def _check_run_identity(directory: pathlib.Path, identity: dict) -> None:
  """Refuses to resume checkpoints written by a different configuration."""
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / "run.json"
  if path.exists():
    old = json.loads(path.read_text())
    if old != identity:
      diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
      raise ValueError(f"{directory} holds checkpoints of a different run (differs in "
                       f"{diff}); use a new --workdir or delete that directory")
  else:
    common.write_json_atomic(path, identity)


def train_run(split: jaxsun.SplitModel, train_cfg: TrainConfig, batches: Iterator, *,
              workdir: pathlib.Path, name: str, identity: dict,
              eval_batches: Callable[[], Iterator] | None = None,
              keep_checkpoints: int = 1, async_checkpoints: bool = True, mesh=None):
  """Trains with metrics under `workdir/logs/name` and checkpoints under
  `workdir/checkpoints/name`, resuming from them (on `mesh`, if given). Returns
  (trainer, history)."""
  ckpt_dir = workdir / "checkpoints" / name
  _check_run_identity(ckpt_dir, identity)
  trainer = Trainer(split, train_cfg, mesh=mesh)
  with create_default_writer(workdir / "logs" / name) as writer, Checkpointer(
      ckpt_dir / "steps", keep=keep_checkpoints, async_save=async_checkpoints) as ckpt:
    history = trainer.fit(batches, writer=writer, checkpointer=ckpt,
                          eval_batches=eval_batches, label=name)
  return trainer, history


def limited(make: Callable[[], Iterator], n: int) -> Callable[[], Iterator]:
  """A factory of iterators cut to their first `n` items."""
  return lambda: itertools.islice(make(), n)


def same_arrays(a, b) -> bool:
  """Whether two trees are bitwise equal (used to show that shared trees stay frozen)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(bool((x == y).all()) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------- one task model


def task_seq_len(task: str, tokenizer, seq_len: int = 0, multiple: int = 8) -> int:
  """`seq_len`, or for 0 the longest row (bos + prompt + answer + eos) over the task's
  splits, rounded up to `multiple`: no example is dropped and no step pads more."""
  if seq_len:
    return int(seq_len)
  from jaxsun.data import pipeline, tasks  # pylint: disable=g-import-not-at-top
  longest = max(sum(map(len, pipeline.encode_example(ex, tokenizer)))
                for split in tasks.SPLITS for ex in load_examples(task, split))
  return -(-longest // multiple) * multiple


def load_examples(task, split: str):
  """The examples of a task name or `LocalTask` split."""
  from jaxsun.data import local_tasks, tasks  # pylint: disable=g-import-not-at-top
  if isinstance(task, local_tasks.LocalTask):
    return task.load(split)
  return tasks.load_task(task, split)


def majority_baseline(task: str, split: str = "test", limit: int | None = None) -> dict:
  """The constant-answer baseline: always answer the most common *train* answer.

  Returns:
    {"answer": that answer, "accuracy": its exact match on the first `limit` items of
    `split`, "train_frequency": its share of the train answers}.
  """
  import collections  # pylint: disable=g-import-not-at-top
  from jaxsun.data import tasks  # pylint: disable=g-import-not-at-top
  counts = collections.Counter(ex.answer for ex in load_examples(task, "train"))
  answer, n = counts.most_common(1)[0]
  items = load_examples(task, split)[:limit]
  hits = [tasks.exact_match(answer, ex.answer) for ex in items]
  return {"answer": answer, "accuracy": float(sum(hits) / len(hits)),
          "train_frequency": n / sum(counts.values())}


def with_learning_rate(opt_cfg, learning_rate: float) -> dict:
  """An optimizer config section (as a dict) with `learning_rate` set."""
  d = common.to_dict(opt_cfg)
  d["learning_rate"] = float(learning_rate)
  return d


def fit_task_model(base: jaxsun.SplitModel, task: str, regime: str, tokenizer, *,
                   steps: int, batch_size: int, seq_len: int, optimizer: dict,
                   lora_cfg: lora.LoRAConfig | None, seed: int, workdir: pathlib.Path,
                   name: str, identity: dict, data_dir: str | None,
                   log_every: int = 10, checkpoint_every: int = 0, mesh=None,
                   device_memory_gb: float = 0.0) -> tuple[jaxsun.SplitModel, dict]:
  """Fine-tunes one task model from `base` in `regime` on the task's train split (loss on
  the answer tokens). Returns (task model, summary); `none` returns the base unchanged.

  The run logs to `workdir/logs/name`, checkpoints to `workdir/checkpoints/name` and
  resumes from them; `identity` must match for a resume.
  """
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  split, trainability = regime_split(base, regime, lora_cfg, jax.random.key(seed))
  summary = {"trainability": trainability, "last_prompt_token": split.last_prompt_token,
             "learning_rate": optimizer.get("learning_rate"), "seed": seed}
  if trainability == "none":
    summary.update(final_train_loss=None, trainable_params=0, train_time_s=0.0)
    return split, summary
  t0 = time.perf_counter()
  batches = data_lib.task_batches(task, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                  seed=seed, data_dir=data_dir)
  train_cfg = TrainConfig(steps=steps, trainability=trainability,
                          optimizer=common.optimizer_config(optimizer), log_every=log_every,
                          checkpoint_every=checkpoint_every, seed=seed,
                          device_memory_gb=device_memory_gb)
  trainer, _ = train_run(split, train_cfg, batches, workdir=workdir, name=name,
                         identity=identity, mesh=mesh)
  split = trainer.split
  losses = metrics_lib.scalar_series(metrics_lib.read_jsonl(
      workdir / "logs" / name / "metrics.jsonl"), "loss")
  summary.update(final_train_loss=losses[-1][1] if losses else None,
                 trainable_params=trainer.num_trainable_params(),
                 dropped_train_examples=batches.num_dropped,
                 train_time_s=round(time.perf_counter() - t0, 2))
  # A shared tree must come out bitwise as it went in (it is every task's tree).
  shared = {"prefill": "decode", "decode": "prefill"}.get(trainability)
  if shared:
    # Against the base's own tree of that kind (QSUN's base has a quantized decode tree).
    before = base.decode_state if shared == "decode" else base.prefill
    summary[f"shared_{shared}_tree_unchanged"] = same_arrays(getattr(split, shared), before)
  if lora.adapter_count(split):
    summary["adapter_params"] = lora.adapter_count(split)
    base_tree = nnx.filter_state(split.prefill if trainability != "decode" else split.decode,
                                 nnx.Not(nnx.LoRAParam))
    summary["adapted_tree_base_unchanged"] = same_arrays(base_tree, base.prefill)
  return split, summary


def evaluate_task_model(split: jaxsun.SplitModel, task: str, tokenizer, *, split_name: str,
                        items: int, loss_items: int, batch_size: int, seq_len: int,
                        data_dir: str | None) -> dict:
  """Exact match by greedy generation through the split on the first `items` items of
  `split_name`, and the teacher-forced answer-token loss on the first `loss_items`."""
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  loss_batches = -(-loss_items // batch_size)
  loss = evaluate_loss(split, data_lib.task_batches(
      task, tokenizer, seq_len=seq_len, batch_size=batch_size, split=split_name,
      data_dir=data_dir), max_batches=loss_batches)
  prompts, answers = data_lib.task_eval_items(task, tokenizer, split=split_name,
                                              limit=items, data_dir=data_dir)
  answer_tokens = max(len(tokenizer.encode(a)) for a in answers)
  em = common.exact_match_eval(split, prompts, answers, tokenizer, batch_size=batch_size,
                               max_new_tokens=answer_tokens + 1,
                               exact_match=data_lib.exact_match)
  return {"accuracy": em["accuracy"], "items": em["items"], "correct": em["correct"],
          "loss": loss["loss"], "loss_tokens": loss["tokens"], "examples": em["examples"],
          "eval_time_s": round(time.perf_counter() - t0, 2)}
