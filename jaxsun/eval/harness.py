"""lm-evaluation-harness adapter: any `SplitModel` as an `lm_eval` model, through the split.

    from jaxsun.eval import harness
    lm = harness.JaxsunLM(split, tokenizer, batch_size=16)
    results = harness.evaluate(lm, ["jaxsun_letter_counting_mc"], limit=100)

Every request runs the way the model is served: the context (prompt) by the prefill
tree, the continuation by the decode tree (`jaxsun.split_forward` with the context
length as the boundary), so a SUN or PrefillShare task model is scored as it would
answer. Requests are sorted by length and padded to power-of-two length buckets and a
fixed batch size, so a whole task compiles a handful of shapes.

The shipped tasks (`TASK_DIR`, lm-eval YAMLs over local JSONL, loaded without any
download) are listed in `SHIPPED_TASKS`; pass `include_path` for your own.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from jaxsun import generation
from jaxsun import split as split_lib
from jaxsun.generation import bucket
from jaxsun.eval.harness_tasks import SHIPPED_TASKS  # pylint: disable=unused-import

TASK_DIR = os.path.join(os.path.dirname(__file__), "harness_tasks")
MIN_BUCKET = 16


@functools.partial(jax.jit, static_argnames=("window",))
def _continuation_scores(split, tokens, boundary, n_tokens, window=None):
  """Per row: (sum of log p of tokens [boundary, n_tokens), all of them greedy?).

  tokens: i32[B, S + 1]; the model reads the first S (the last token is only a target).
  """
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  logits = split_lib.split_forward(split, inputs, boundary, window=window)  # f32[B, S, V]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  pos = jnp.arange(1, tokens.shape[1])[None, :]  # index of each target token
  mask = (pos >= boundary[:, None]) & (pos < n_tokens[:, None])  # bool[B, S]
  token_logp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  greedy = jnp.argmax(logp, -1) == targets
  return (jnp.sum(jnp.where(mask, token_logp, 0.0), -1),
          jnp.all(greedy | ~mask, -1))


class JaxsunLM(TemplateLM):
  """A `SplitModel` + tokenizer as an lm-eval `TemplateLM`.

  Args:
    split: the model (tied base model or untied task model).
    tokenizer: `encode(str) -> list[int]`, `decode(ids) -> str`, and `eos_id` (a jaxsun
      tokenizer from `jaxsun.data.get_tokenizer`).
    batch_size: rows per forward (the last batch is padded).
    max_length: longest scored sequence; default `ModelConfig.max_len`.
    max_gen_toks: default generation budget when a request does not set one.
    eot_token_id: end-of-text id (default: the tokenizer's `eos_id`).
  """

  def __init__(self, split: split_lib.SplitModel, tokenizer, *, batch_size: int = 8,
               max_length: int | None = None, max_gen_toks: int = 32,
               eot_token_id: int | None = None):
    super().__init__()
    self.split = split_lib.check_split(split)
    self.jaxsun_tokenizer = tokenizer
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    self.batch_size = batch_size
    self.max_length = max_length or self.split.cfg.max_len
    if self.max_length > self.split.cfg.max_len:
      raise ValueError(f"max_length={self.max_length} exceeds ModelConfig.max_len="
                       f"{self.split.cfg.max_len}")
    self.max_gen_toks = max_gen_toks
    eot = getattr(tokenizer, "eos_id", None) if eot_token_id is None else eot_token_id
    if eot is None:
      raise ValueError("the tokenizer has no eos_id; pass eot_token_id")
    self._eot = int(eot)

  # --- TemplateLM interface ------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self._eot

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs) -> list[int]:
    del add_special_tokens, kwargs  # jaxsun tokenizers add no specials on encode
    return list(self.jaxsun_tokenizer.encode(string))

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.jaxsun_tokenizer.decode(list(ids))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    """Scores (context_enc, continuation_enc) pairs; keeps the last max_length tokens."""
    del kwargs
    rows = []
    for _, context, continuation in requests:
      if not continuation:
        raise ValueError("a loglikelihood request has an empty continuation")
      if len(continuation) > self.max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit "
                         f"max_length={self.max_length}")
      # The model reads at most max_length tokens; the last one is only a target.
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole, len(whole) - len(continuation)))
    return self._score(rows, disable_tqdm)

  def _score(self, rows: list[tuple[list[int], int]], disable_tqdm: bool
             ) -> list[tuple[float, bool]]:
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[Any] = [None] * len(rows)
    for start in tqdm(range(0, len(order), self.batch_size), desc="jaxsun loglikelihood",
                      disable=disable_tqdm):
      idx = order[start:start + self.batch_size]
      length = bucket(max(len(rows[i][0]) for i in idx) - 1, self.max_length,
                             MIN_BUCKET)
      tokens = np.zeros((self.batch_size, length + 1), np.int32)
      boundary = np.ones((self.batch_size,), np.int32)
      n_tokens = np.ones((self.batch_size,), np.int32)  # padding rows score nothing
      for r, i in enumerate(idx):
        whole, ctx = rows[i]
        tokens[r, :len(whole)] = whole
        boundary[r], n_tokens[r] = ctx, len(whole)
      boundary[len(idx):] = boundary[0]
      window = split_lib.prefill_window(self.split, boundary, length)
      ll, greedy = _continuation_scores(self.split, jnp.asarray(tokens),
                                        jnp.asarray(boundary), jnp.asarray(n_tokens),
                                        window=window)
      ll, greedy = np.asarray(ll), np.asarray(greedy)
      for r, i in enumerate(idx):
        out[i] = (float(ll[r]), bool(greedy[r]))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Total log-likelihood of each text, in disjoint windows of `max_length`."""
    results = []
    for (text,) in [req.args for req in requests]:
      windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)]
      scores = self._loglikelihood_tokens([((None, None), c, t) for c, t in windows],
                                          disable_tqdm=True)
      results.append(float(sum(s for s, _ in scores)))
    return results

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy generation through the split, batched, cut at the first stop string."""
    jobs = []
    for context, gen_kwargs in [req.args for req in requests]:
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
      until = (until,) if isinstance(until, str) else tuple(until)
      max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
      if gen_kwargs.pop("do_sample", False) or (gen_kwargs.get("temperature") or 0) > 0:
        raise ValueError("JaxsunLM.generate_until is greedy only (do_sample=False, "
                         "temperature=0)")
      if not 1 <= max_new < self.max_length:
        raise ValueError(f"max_gen_toks={max_new} must lie in [1, max_length="
                         f"{self.max_length})")
      prompt = self.tok_encode(context)[-(self.max_length - max_new):]
      jobs.append((prompt or [self.prefix_token_id], until, max_new))
    out: list[Any] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for i, (_, until, max_new) in enumerate(jobs):
      groups.setdefault((until, max_new), []).append(i)
    for (until, max_new), members in groups.items():
      members = sorted(members, key=lambda i: len(jobs[i][0]))
      for start in tqdm(range(0, len(members), self.batch_size), desc="jaxsun generate",
                        disable=disable_tqdm):
        idx = members[start:start + self.batch_size]
        prompts = [jobs[i][0] for i in idx]
        prompts += [prompts[-1]] * (self.batch_size - len(idx))  # one batch shape
        res = generation.generate(self.split, prompts, max_new_tokens=max_new,
                                  eos_id=self.eot_token_id)
        tokens, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
        for r, i in enumerate(idx):
          ids = [int(t) for t in tokens[r, :lengths[r]] if t != self.eot_token_id]
          text = self.tok_decode(ids)
          for stop in until:
            if stop and stop in text:
              text = text[:text.index(stop)]
          out[i] = text
    return out


def task_manager(include_path: str | Sequence[str] | None = None):
  """An lm-eval `TaskManager` that knows the shipped tasks (and `include_path`)."""
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  paths = [TASK_DIR] + ([include_path] if isinstance(include_path, str)
                        else list(include_path or []))
  return TaskManager(include_path=paths, include_defaults=False)


def evaluate(lm: JaxsunLM, tasks: Sequence[str], *, limit: int | None = None,
             num_fewshot: int | None = None, include_path=None, seed: int = 0) -> dict:
  """Runs lm-eval's `simple_evaluate` offline on `tasks`; returns its results dict."""
  import lm_eval  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  return lm_eval.simple_evaluate(
      model=lm, tasks=list(tasks), task_manager=task_manager(include_path), limit=limit,
      num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
      bootstrap_iters=0)
