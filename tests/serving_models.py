"""Tiny SUN and PrefillShare task models for the serving tests (random weights).

SUN task models: own prefill trees, one shared decode tree (the base's).
PrefillShare task models: one shared prefill tree (the base's), own decode trees, and
`last_prompt_token="decode"` (the task's decode tree picks the first output token).
"""

from __future__ import annotations

import functools

import numpy as np
from flax import nnx

import jaxsun

CFG = jaxsun.ModelConfig(name="serve-test", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                         n_kv_heads=1, d_ff=64, max_len=128, init_std=0.2)


@functools.lru_cache(maxsize=None)
def tree(seed: int):
  return jaxsun.SplitModel.from_model(jaxsun.Decoder(CFG, rngs=nnx.Rngs(seed)))


def base() -> jaxsun.SplitModel:
  return tree(0)


@functools.lru_cache(maxsize=None)
def sun_models() -> dict[str, jaxsun.SplitModel]:
  b = base()
  return {name: jaxsun.SplitModel(graphdef=b.graphdef, prefill=tree(seed).prefill,
                                  decode=b.prefill)
          for name, seed in (("math", 1), ("code", 2))}


@functools.lru_cache(maxsize=None)
def prefillshare_models() -> dict[str, jaxsun.SplitModel]:
  b = base()
  return {name: jaxsun.SplitModel(graphdef=b.graphdef, prefill=b.prefill,
                                  decode=tree(seed).prefill, last_prompt_token="decode")
          for name, seed in (("planner", 3), ("critic", 4))}


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 30) -> list[tuple[int, ...]]:
  rng = np.random.default_rng(seed)
  return [tuple(int(t) for t in rng.integers(1, CFG.vocab_size, size=int(rng.integers(lo, hi))))
          for _ in range(n)]


REF_WIDTH = 64  # references pad prompts to one width: one compilation per model shape


def references(model: jaxsun.SplitModel, prompts, max_new_tokens: int,
               eos_id: int | None = None) -> list[list[int]]:
  """`jaxsun.generate`'s greedy tokens for each prompt (one batched call), cut after EOS."""
  arr = np.zeros((len(prompts), REF_WIDTH), np.int32)
  for i, p in enumerate(prompts):
    arr[i, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  out = jaxsun.generate(model, arr, lengths, max_new_tokens=max_new_tokens, eos_id=eos_id)
  toks, n = np.asarray(out.tokens), np.asarray(out.lengths)
  return [[int(t) for t in toks[i, :n[i]]] for i in range(len(prompts))]


def reference(model: jaxsun.SplitModel, prompt, max_new_tokens: int,
              eos_id: int | None = None) -> list[int]:
  return references(model, [prompt], max_new_tokens, eos_id)[0]
