"""Rebuilds the lm-eval tasks shipped in jaxsun/eval/harness_tasks/*.jsonl.

    python scripts/build_harness_tasks.py

From the committed data only (no download):
  * letter_counting_mc.jsonl: 200 test items of `letter_counting` as 4-way multiple
    choice (the true count and three nearby counts, in a seeded order);
  * spell_backward_gen.jsonl: 200 test items of `spell_backward` for generation;
  * shakespeare_ppl.jsonl: the first 16 held-out (validation) chunks of the shipped
    Shakespeare corpus, for rolling perplexity.
The YAMLs beside them are written by hand.
"""

import json
import os

import numpy as np

from jaxsun.data import corpora
from jaxsun.data import tasks

OUT = os.path.join(os.path.dirname(__file__), "..", "jaxsun", "eval", "harness_tasks")
N_ITEMS, N_CHUNKS = 200, 16


def write(name, rows):
  with open(os.path.join(OUT, name), "w") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  print(f"{name}: {len(rows)} rows")


def letter_counting_mc():
  rng = np.random.default_rng(0)
  rows = []
  for ex in tasks.load_task("letter_counting", "test")[:N_ITEMS]:
    n = int(ex.answer)
    wrong = [m for m in (n + 1, n - 1, n + 2, n + 3) if m >= 0][:3]
    choices = [str(n)] + [str(m) for m in wrong]
    perm = rng.permutation(4)
    rows.append({"prompt": ex.prompt, "choices": [choices[i] for i in perm],
                 "label": int(np.argmin(perm))})
  write("letter_counting_mc.jsonl", rows)


def spell_backward_gen():
  write("spell_backward_gen.jsonl", [{"prompt": ex.prompt, "answer": ex.answer}
                                     for ex in tasks.load_task("spell_backward", "test")[:N_ITEMS]])


def shakespeare_ppl():
  write("shakespeare_ppl.jsonl", [{"text": t} for t in
                                  corpora.corpus_chunks("shakespeare", "validation")[:N_CHUNKS]])


if __name__ == "__main__":
  os.makedirs(OUT, exist_ok=True)
  letter_counting_mc()
  spell_backward_gen()
  shakespeare_ppl()
