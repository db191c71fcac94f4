"""Data: committed corpora and tasks, tokenizers, TFDS builders and grain pipelines.

    from jaxsun import data
    tok = data.get_tokenizer("bpe4k")                  # "byte", "bpe4k", "gpt2"
    train = data.load_task("spell_backward", "train")  # list[Example(prompt, answer)]
    it = data.lm_batches("shakespeare", tok, seq_len=256, batch_size=32, seed=0)

The files live under `data/` at the repository root (`JAXSUN_DATA_ROOT` overrides) and
are built by `scripts/build_data.py`, the only code that downloads. Importing this
package does not import tensorflow_datasets or grain (the GPU machines lack them): the
pipeline names below (`lm_batches`, `task_batches`, `task_eval_items`, `prepare`,
`data_source`, `Batches`) load `jaxsun.data.pipeline`, and with it grain, on first use.
The synthetic copy/reverse task is `jaxsun.data.synthetic`; a user's own prompt/answer
file (e.g. the papers' MetaMathQA-40K) is a `LocalTask`, accepted wherever a task name is.
"""

from __future__ import annotations

import importlib

from jaxsun.data.corpora import CORPORA, Document, corpus_chunks, load_corpus
from jaxsun.data.local_tasks import PAPER_TASKS, LocalTask, paper_task
from jaxsun.data.paths import data_root
from jaxsun.data.tasks import (TASKS, Example, exact_match, format_answer, format_prompt,
                               format_text, load_task)
from jaxsun.data.tokenizers import (TOKENIZERS, ByteTokenizer, Tokenizer,
                                    get_tokenizer)

_PIPELINE = ("lm_batches", "task_batches", "task_eval_items", "prepare", "data_source",
             "Batches", "encode_example", "tfds_data_dir")

__all__ = [
    "CORPORA", "Document", "corpus_chunks", "load_corpus", "data_root", "TASKS",
    "Example", "exact_match", "format_answer", "format_prompt", "format_text",
    "load_task", "TOKENIZERS", "ByteTokenizer", "Tokenizer", "get_tokenizer", "LocalTask",
    "PAPER_TASKS", "paper_task", *_PIPELINE,
]


def __getattr__(name: str):
  if name in _PIPELINE:
    return getattr(importlib.import_module("jaxsun.data.pipeline"), name)
  raise AttributeError(f"module 'jaxsun.data' has no attribute {name!r}")
