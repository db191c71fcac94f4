"""A user's own prompt/answer files (the papers' datasets) through the task pipeline."""

import json

import numpy as np
import pytest

from jaxsun import data
from jaxsun.data import local_tasks, tasks


def write_metamath(path, n=400, jsonl=False):
  records = [{"query": f"What is {i} + {i + 1}?", "response": f"{i} + {i + 1} = {2 * i + 1}. "
              f"The answer is: {2 * i + 1}", "type": "GSM_AnsAug"} for i in range(n)]
  if jsonl:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  else:
    path.write_text(json.dumps(records))
  return records


@pytest.mark.parametrize("jsonl", [False, True])
def test_local_file_splits_deterministically_and_disjointly(tmp_path, jsonl):
  path = tmp_path / ("math.jsonl" if jsonl else "math.json")
  records = write_metamath(path, jsonl=jsonl)
  task = data.paper_task("metamathqa", str(path))
  splits = {s: task.load(s) for s in tasks.SPLITS}
  assert sum(len(v) for v in splits.values()) == len(records)
  prompts = {s: {ex.prompt for ex in v} for s, v in splits.items()}
  assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
  assert 0 < len(splits["test"]) < 60 and 0 < len(splits["validation"]) < 60
  ex = splits["train"][0]
  src = next(r for r in records if r["query"] == ex.prompt)
  assert ex.answer == src["response"]
  # The split of a record depends on its prompt only, not on the file order.
  shuffled = tmp_path / "shuffled.json"
  shuffled.write_text(json.dumps(list(reversed(records))))
  again = data.paper_task("metamathqa", str(shuffled))
  assert {e.prompt for e in again.load("test")} == prompts["test"]


def test_local_task_batches_like_a_committed_task(tmp_path):
  path = tmp_path / "xlam.json"
  path.write_text(json.dumps([{"query": f"weather in city {i}?",
                               "tools": [{"name": "get_weather", "parameters": {"city": "str"}}],
                               "answers": [{"name": "get_weather", "arguments": {"city": i}}]}
                              for i in range(100)]))
  task = data.paper_task("xlam_function_calling", str(path))
  ex = task.load("train")[0]
  assert ex.prompt.startswith('[{"name": "get_weather"') and "\n\nweather in city" in ex.prompt
  assert json.loads(ex.answer)[0]["name"] == "get_weather"
  batches = data.task_batches(task, "byte", seq_len=256, batch_size=4, seed=0)
  b = next(batches)
  assert b["tokens"].shape == (4, 256) and batches.spec["task"] == "xlam_function_calling"
  assert (b["loss_mask"].sum(1) > 0).all()
  prompts, answers = data.task_eval_items(task, "byte", split="test")
  assert len(prompts) == len(task.load("test")) and answers[0] == task.load("test")[0].answer


def test_missing_files_and_fields_are_clear_errors(tmp_path):
  task = data.paper_task("evol_instruct_code", str(tmp_path / "nope.json"),
                         config_key="config.data.files.evol_instruct_code")
  with pytest.raises(FileNotFoundError, match=r"nope.json.*config.data.files."
                                              r"evol_instruct_code.*never downloads"):
    task.load("train")
  path = tmp_path / "code.json"
  path.write_text(json.dumps([{"instruction": "x"}]))
  with pytest.raises(ValueError, match="record 0 .* has no field 'output'"):
    data.paper_task("evol_instruct_code", str(path)).load("train")
  with pytest.raises(ValueError, match="unknown paper task"):
    data.paper_task("gsm8k", str(path))
  with pytest.raises(ValueError, match="test_fraction"):
    local_tasks.LocalTask("t", str(path), test_fraction=0.6, validation_fraction=0.5)
  with pytest.raises(FileNotFoundError, match="tokenizer file .* does not exist"):
    data.get_tokenizer("file:" + str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="file:<path"):
    data.get_tokenizer("llama3")


def test_a_users_tokenizer_file(tmp_path):
  """`file:<path>` loads a Hugging Face tokenizer.json with Llama-3-style specials."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|end_of_text|>"]
  tok.train_from_iterator(["hello world " * 50, "the quick brown fox"],
                          trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  loaded = data.get_tokenizer(f"file:{path}")
  assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (0, 1, 2)
  ids = loaded.encode("hello world")
  assert loaded.decode(ids) == "hello world" and np.all(np.asarray(ids) > 2)
