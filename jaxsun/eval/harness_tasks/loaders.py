"""Dataset loaders for the shipped lm-eval tasks: local JSONL beside this file, no
download (referenced from the YAMLs as `custom_dataset: !function loaders.<name>`)."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _jsonl(name: str, **kwargs) -> datasets.DatasetDict:
  del kwargs  # lm-eval passes the task's metadata
  with open(os.path.join(HERE, name)) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def letter_counting_mc(**kwargs):
  return _jsonl("letter_counting_mc.jsonl", **kwargs)


def spell_backward_gen(**kwargs):
  return _jsonl("spell_backward_gen.jsonl", **kwargs)


def shakespeare_ppl(**kwargs):
  return _jsonl("shakespeare_ppl.jsonl", **kwargs)
