"""Synthetic prompt/answer tasks with exact-match answers, generated on the fly.

Copy / reverse a random symbol string: a prompt `[BOS, TASK, s_1 .. s_n, SEP]` asks for
`s_1 .. s_n` (copy) or `s_n .. s_1` (reverse), followed by EOS. Small models learn both
in a few hundred steps, which makes them handy for demos and end-to-end tests of the
prefill/decode split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

PAD, BOS, SEP, EOS, COPY, REVERSE = 0, 1, 2, 3, 4, 5
TASKS = {"copy": COPY, "reverse": REVERSE}
FIRST_SYMBOL = 6


@dataclasses.dataclass(frozen=True)
class SymbolTask:
  """Copy/reverse strings of 1..`max_symbols` symbols from an alphabet of `n_symbols`."""

  n_symbols: int = 16
  max_symbols: int = 8

  def __post_init__(self):
    if self.n_symbols < 2 or self.max_symbols < 1:
      raise ValueError(f"SymbolTask needs n_symbols >= 2 and max_symbols >= 1, got {self}")

  @property
  def vocab_size(self) -> int:
    return FIRST_SYMBOL + self.n_symbols

  @property
  def seq_len(self) -> int:
    return 2 * self.max_symbols + 4  # BOS TASK s.. SEP a.. EOS

  def examples(self, rng: np.random.Generator, batch: int, task: str):
    """Returns (tokens i32[B, seq_len], boundary i32[B], answers list of token lists)."""
    if task not in TASKS:
      raise ValueError(f"unknown task {task!r}; available: {sorted(TASKS)}")
    tokens = np.full((batch, self.seq_len), PAD, np.int32)
    boundary = np.zeros((batch,), np.int32)
    answers = []
    for i in range(batch):
      n = int(rng.integers(1, self.max_symbols + 1))
      syms = rng.integers(FIRST_SYMBOL, self.vocab_size, size=n)
      ans = syms if task == "copy" else syms[::-1]
      prompt = [BOS, TASKS[task], *syms.tolist(), SEP]
      answer = [*ans.tolist(), EOS]
      tokens[i, :len(prompt) + len(answer)] = prompt + answer
      boundary[i] = len(prompt)
      answers.append(answer)
    return tokens, boundary, answers

  def loss_mask(self, tokens: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """f32[B, S]: answer tokens (EOS included), not the padding after them."""
    pos = np.arange(tokens.shape[1])[None, :]
    return ((pos >= boundary[:, None]) & (tokens != PAD)).astype(np.float32)
