"""Perplexity in the protocol of the quantization papers (GPTQ, AWQ, LRQ, UniQuanF, ...).

Join the held-out texts with "\\n\\n", tokenize once, cut the ids into non-overlapping
windows of `seq_len` tokens, drop the remainder, and report `exp(mean NLL)` over every
predicted token (positions 1..seq_len-1 of each window; the first token of a window has
no context and is not scored). One function, used by every quantization study, so their
numbers are comparable with each other.

GPTQ's script multiplies each window's mean loss by `seq_len` and divides by
`n_windows * seq_len`, which is the same mean. The windows run through
`jaxsun.split_forward`, so an untied task model is scored as it would be served: the
first `boundary` positions of each window by the prefill tree, the rest by the decode
tree (default `boundary = seq_len`: all by the prefill tree, the plain model when tied).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsun import split as split_lib
from jaxsun import validation


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """`perplexity = exp(nll)`; `nll` is the mean over `n_tokens` scored tokens (nats)."""

  perplexity: float
  nll: float
  n_windows: int
  n_tokens: int
  seq_len: int
  dropped_tokens: int


@functools.partial(jax.jit, static_argnames=("window",))
def _window_sums(split, tokens, boundary, weights, window=None):
  mask = jnp.broadcast_to(weights[:, None], tokens.shape).astype(jnp.float32)
  return split_lib.next_token_loss_sums(split, tokens, boundary, mask, window=window)


def token_perplexity(split: split_lib.SplitModel, ids: Sequence[int] | np.ndarray, *,
                     seq_len: int, batch_size: int = 8, boundary: int | None = None
                     ) -> PerplexityResult:
  """Perplexity of one token stream, cut into non-overlapping `seq_len` windows.

  Args:
    split: the model (a tied base model or an untied task model).
    ids: i32[N] token ids.
    seq_len: window length (the model's context in the papers: 2048 for Llama).
    batch_size: windows per forward.
    boundary: positions of each window run by the prefill tree (1..seq_len); default
      seq_len.
  """
  split = split_lib.check_split(split)
  validation.check_positive_int("seq_len", seq_len)
  validation.check_positive_int("batch_size", batch_size)
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len} must be >= 2 (one context token, one target)")
  if seq_len > split.cfg.max_len:
    raise ValueError(f"seq_len={seq_len} exceeds ModelConfig.max_len={split.cfg.max_len}")
  boundary = seq_len if boundary is None else boundary
  if not 1 <= boundary <= seq_len:
    raise ValueError(f"boundary={boundary} must lie in [1, seq_len={seq_len}]")
  ids = np.asarray(ids, np.int32).reshape(-1)
  n_windows = ids.size // seq_len
  if n_windows == 0:
    raise ValueError(f"the text has {ids.size} tokens, fewer than one window of "
                     f"seq_len={seq_len}")
  windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len)
  window = split_lib.prefill_window(split, np.full((1,), boundary), seq_len)
  total = count = 0.0
  for start in range(0, n_windows, batch_size):
    chunk = windows[start:start + batch_size]
    n = chunk.shape[0]
    weights = np.zeros((batch_size,), np.float32)
    weights[:n] = 1.0
    if n < batch_size:  # pad with copies of the last window, weighted 0: one shape
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, 0)])
    s, c = _window_sums(split, jnp.asarray(chunk), jnp.full((batch_size,), boundary,
                                                            jnp.int32),
                        jnp.asarray(weights), window=window)
    total += float(s)
    count += float(c)
  nll = total / count
  return PerplexityResult(perplexity=math.exp(nll), nll=nll, n_windows=n_windows,
                          n_tokens=int(count), seq_len=seq_len,
                          dropped_tokens=int(ids.size - n_windows * seq_len))


def text_perplexity(split: split_lib.SplitModel, texts: Sequence[str], tokenizer, *,
                    seq_len: int, separator: str = "\n\n", **kwargs) -> PerplexityResult:
  """Perplexity of held-out texts: joined with `separator`, tokenized once, windowed.

  Args:
    split: the model.
    texts: held-out documents (e.g. `jaxsun.data.corpora.corpus_chunks(name,
      "validation")`).
    tokenizer: has `encode(str) -> list[int]` (`jaxsun.data.get_tokenizer`).
    seq_len: window length.
    separator: joins the texts (WikiText-2 in the papers: "\\n\\n").
    **kwargs: `batch_size`, `boundary` for `token_perplexity`.
  """
  if isinstance(texts, str):
    raise TypeError("texts must be a sequence of strings, not one string")
  return token_perplexity(split, tokenizer.encode(separator.join(texts)), seq_len=seq_len,
                          **kwargs)
