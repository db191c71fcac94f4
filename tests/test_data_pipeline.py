"""TFDS builders and grain pipelines: determinism, resumption, packing, masks, errors.

Every test here runs with sockets disabled, so any attempt to download fails loudly.
"""

import gzip
import json
import socket

import numpy as np
import pytest

pytest.importorskip("grain")
tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("tokenizers")

from jaxsun.data import corpora  # pylint: disable=wrong-import-position
from jaxsun.data import paths
from jaxsun.data import pipeline
from jaxsun.data import tasks
from jaxsun.data import tokenizers as toks
from jaxsun.data.tfds_builders import CorpusConfig, TaskConfig

SMALL_CORPUS = CorpusConfig(name="shakespeare_first3", corpus="shakespeare", max_documents=3)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  # tfds makes an empty temp dir per unprepared builder before finding GCS disabled.
  monkeypatch.setattr(tfds.core.DatasetInfo, "initialize_from_bucket", lambda self: None)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def bpe():
  return toks.get_tokenizer("bpe4k")


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys() == {"tokens", "boundary", "loss_mask"}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_corpus_builder_matches_the_committed_chunks(tfds_dir):
  sources = pipeline.prepare(SMALL_CORPUS, tfds_dir)
  docs = corpora.load_corpus("shakespeare", max_documents=3)
  for split in ("train", "validation"):
    want = corpora.split_chunks(docs, split)
    got = [sources[split][i]["text"].decode() for i in range(len(sources[split]))]
    assert got == want
  # Prepared once: a second call reuses the files.
  info = f"{tfds_dir}/jaxsun_corpus/shakespeare_first3/1.0.0/dataset_info.json"
  before = open(info).read()
  pipeline.prepare(SMALL_CORPUS, tfds_dir)
  assert open(info).read() == before


def test_tasks_builder_matches_load_task(tfds_dir):
  cfg = TaskConfig(name="basic_arithmetic_first50", task="basic_arithmetic",
                   max_examples=50)
  sources = pipeline.prepare(cfg, tfds_dir)
  for split in ("train", "validation", "test"):
    got = [tasks.Example(r["prompt"].decode(), r["answer"].decode())
           for r in (sources[split][i] for i in range(len(sources[split])))]
    assert got == tasks.load_task("basic_arithmetic", split)[:50]
  # As an LM source, a task record is its format_text; "validation" is its own split.
  for split in ("validation", "test"):
    it = pipeline.lm_batches(cfg, "byte", seq_len=64, batch_size=4, split=split,
                             data_dir=tfds_dir)
    text = toks.ByteTokenizer().decode(np.concatenate([b["tokens"] for b in it]).reshape(-1))
    assert text == "".join(tasks.format_text(ex)
                           for ex in tasks.load_task("basic_arithmetic", split)[:50])


def test_stale_preparation_is_rebuilt(tmp_path, monkeypatch):
  monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
  path = tmp_path / tasks.task_path("spell_backward")
  path.parent.mkdir()

  def write(records):
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))

  records = [{"split": s, "prompt": f"p{i}", "answer": f"a{i}"}
             for i, s in enumerate(["train", "train", "test", "validation"])]
  write(records)
  cfg, data_dir = TaskConfig(name="stale_check", task="spell_backward"), tmp_path / "tfds"
  assert pipeline.prepare(cfg, data_dir)["train"][1]["prompt"] == b"p1"
  records[1]["prompt"] = "changed"
  write(records)
  assert pipeline.prepare(cfg, data_dir)["train"][1]["prompt"] == b"changed"


def lm(tok, tfds_dir, **kw):
  args = dict(sources=[SMALL_CORPUS, "task:spell_backward"], seq_len=48, batch_size=3,
              seed=0, weights=[0.75, 0.25], data_dir=tfds_dir)
  args.update(kw)
  return pipeline.lm_batches(args.pop("sources"), tok, **args)


def test_lm_batches_are_deterministic_and_seeded(bpe, tfds_dir):
  a = take(lm(bpe, tfds_dir), 6)
  assert_same_batches(a, take(lm(bpe, tfds_dir), 6))
  b = take(lm(bpe, tfds_dir, seed=1), 6)
  assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(a, b))
  for batch in a:
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (3, 48)
    assert batch["boundary"].dtype == np.int32 and (batch["boundary"] == 1).all()
    assert batch["loss_mask"].dtype == np.float32 and (batch["loss_mask"] == 1).all()
    assert (batch["tokens"] >= 0).all() and (batch["tokens"] < bpe.vocab_size).all()
  # Both sources show up: task text has "Q: Spell", the corpus does not.
  texts = [bpe.decode(row) for batch in a for row in batch["tokens"]]
  assert any("Spell this word backward" in t for t in texts)
  assert any("Spell this word backward" not in t for t in texts)


def test_lm_state_resumes_exactly_after_a_json_round_trip(bpe, tfds_dir):
  it = lm(bpe, tfds_dir)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 3)
  fresh = lm(bpe, tfds_dir)
  fresh.set_state(state)
  assert_same_batches(take(fresh, 3), expected)
  # And rewinding the original works too.
  it.set_state(state)
  assert_same_batches(take(it, 3), expected)
  with pytest.raises(ValueError, match=r"different pipeline \(differs in \['seed'\]\)"):
    lm(bpe, tfds_dir, seed=5).set_state(state)


def test_packing_keeps_every_token_of_the_stream():
  rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
  tok = toks.ByteTokenizer()
  docs = ["".join(rng.choice(list("abcdé€ \n"), int(rng.integers(0, 90))))
          for _ in range(int(rng.integers(5, 30)))]
  stream = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
  seq_len, batch_size = int(rng.integers(3, 40)), int(rng.integers(1, 5))
  batches = list(pipeline.lm_batches([docs], tok, seq_len=seq_len, batch_size=batch_size,
                                     seed=0, split="validation"))
  rows = np.concatenate([b["tokens"] for b in batches])
  mask = np.concatenate([b["loss_mask"] for b in batches])
  assert rows.shape[1] == seq_len and all(len(b["tokens"]) == batch_size for b in batches)
  n = len(stream)
  assert rows.reshape(-1)[:n].tolist() == stream  # consecutive windows, nothing lost
  assert (mask.reshape(-1)[:n] == 1).all() and (mask.reshape(-1)[n:] == 0).all()
  assert (rows.reshape(-1)[n:] == tok.pad_id).all()
  windows = -(-n // seq_len)
  assert len(rows) == -(-windows // batch_size) * batch_size


def test_training_stream_repeats_and_packs_the_shuffled_documents():
  tok = toks.ByteTokenizer()
  docs = [f"doc{i}." for i in range(7)]
  it = pipeline.lm_batches([docs], tok, seq_len=10, batch_size=2, seed=3)
  flat = np.concatenate([b["tokens"].reshape(-1) for b in take(it, 20)]).tolist()
  text = tok.decode([t if t != tok.eos_id else ord("|") for t in flat])
  pieces = text.split("|")[:-1]
  assert len(pieces) >= 14
  for epoch in range(2):  # each epoch is a permutation of the documents
    assert sorted(pieces[7 * epoch:7 * epoch + 7]) == sorted(docs)
  assert pieces[:7] != docs  # shuffled


def test_validation_pass_reads_the_corpus_once_in_order(bpe, tfds_dir):
  it = pipeline.lm_batches(SMALL_CORPUS, bpe, seq_len=128, batch_size=4, seed=0,
                           split="validation", data_dir=tfds_dir)
  batches = list(it)
  tokens = np.concatenate([b["tokens"] for b in batches]).reshape(-1)
  mask = np.concatenate([b["loss_mask"] for b in batches]).reshape(-1)
  chunks = corpora.split_chunks(corpora.load_corpus("shakespeare", 3), "validation")
  want = [t for c in chunks for t in bpe.encode(c) + [bpe.eos_id]]
  assert tokens[mask == 1].tolist() == want


def test_user_prepared_tfds_dataset_by_name(tmp_path, bpe, monkeypatch):
  class JaxsunTestUserText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(9), "test": self._generate_examples(4)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"text": f"user document {i}"}

  JaxsunTestUserText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  # From here on, nothing may prepare or download.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("download_and_prepare called"))
  it = pipeline.lm_batches("jaxsun_test_user_text", bpe, seq_len=16, batch_size=2,
                           split="validation", data_dir=str(tmp_path))  # -> "test"
  tokens = np.concatenate([b["tokens"] for b in it]).reshape(-1)
  text = bpe.decode(tokens)
  assert sorted(text.split("user document ")[1:]) == ["0", "1", "2", "3"]


def test_not_prepared_user_dataset_is_an_error_not_a_download(tmp_path, bpe, monkeypatch):
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("download_and_prepare called"))
  with pytest.raises(FileNotFoundError, match=r"TFDS dataset 'lm1b' is not prepared under "
                                              r".*jaxsun never downloads it"):
    pipeline.lm_batches("lm1b", bpe, seq_len=16, batch_size=2, data_dir=str(tmp_path))
  assert not list(tmp_path.rglob("*.array_record*"))
  with pytest.raises(ValueError, match=r"unknown dataset 'no_such_dataset_xyz'"):
    pipeline.prepare("no_such_dataset_xyz", str(tmp_path))
  with pytest.raises(ValueError, match=r"unknown dataset 'doc 1\.'"):  # docs not in a list
    pipeline.lm_batches(["doc 1.", "doc 2."], bpe, seq_len=8, batch_size=2,
                        data_dir=str(tmp_path))


def test_task_rows_mask_exactly_the_answer_and_eos(bpe):
  seq_len = 40
  it = pipeline.task_batches("spell_backward", bpe, seq_len=seq_len, batch_size=16,
                             split="test")
  examples = tasks.load_task("spell_backward", "test")
  kept = [ex for ex in examples
          if sum(map(len, pipeline.encode_example(ex, bpe))) <= seq_len]
  assert it.num_dropped == len(examples) - len(kept) and it.num_examples == len(kept)
  rows = [(b["tokens"][i], b["boundary"][i], b["loss_mask"][i])
          for b in it for i in range(len(b["tokens"]))]
  assert len(rows) == -(-len(kept) // 16) * 16
  for ex, (tokens, boundary, mask) in zip(kept, rows):
    assert tokens[0] == bpe.bos_id
    assert bpe.decode(tokens[1:boundary]) == tasks.format_prompt(ex)
    assert (mask[:boundary] == 0).all()
    answer = tokens[mask == 1]
    assert answer[-1] == bpe.eos_id and len(answer) >= 2
    assert bpe.decode(answer) == tasks.format_answer(ex)
    assert tasks.exact_match(bpe.decode(answer), ex.answer)
    end = boundary + len(answer)
    assert (mask[boundary:end] == 1).all() and (tokens[end:] == bpe.pad_id).all()
  last_boundary = rows[len(kept) - 1][1]
  for tokens, boundary, mask in rows[len(kept):]:  # batch padding: empty, no loss
    # The boundary repeats the last real one, which keeps the prefill window tight.
    assert (tokens == bpe.pad_id).all() and (mask == 0).all() and boundary == last_boundary


def test_task_batches_deterministic_resumable_and_epoch_shuffled():
  make = lambda seed=0: pipeline.task_batches("basic_arithmetic", "byte", seq_len=48,
                                              batch_size=8, seed=seed)
  it = make()
  first = take(it, 4)
  assert_same_batches(first, take(make(), 4))
  assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(first, take(make(1), 4)))
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 3)
  fresh = make()
  fresh.set_state(state)
  assert_same_batches(take(fresh, 3), expected)
  # 4000 examples / 8 = 500 batches per epoch; the second epoch is another permutation.
  tok = toks.ByteTokenizer()
  rows = lambda batches: [tok.decode(r) for b in batches for r in b["tokens"]]
  epoch1 = rows(first + expected + take(it, 493))
  epoch2 = rows(take(it, 500))
  assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2
  assert len(set(epoch1)) == 4000


def test_task_eval_items(bpe):
  prompts, answers = pipeline.task_eval_items("letter_counting", bpe, split="test", limit=7)
  examples = tasks.load_task("letter_counting", "test")[:7]
  assert answers == [ex.answer for ex in examples]
  for p, ex in zip(prompts, examples):
    assert p[0] == bpe.bos_id and bpe.decode(p[1:]) == tasks.format_prompt(ex)
  prompts_all, _ = pipeline.task_eval_items("letter_counting", "byte")
  assert len(prompts_all) == 500


def test_all_examples_too_long_names_seq_len():
  with pytest.raises(ValueError, match=r"all 500 examples of task 'gsm_symbolic' \(test\) "
                                       r"are longer than seq_len=8 tokens"):
    pipeline.task_batches("gsm_symbolic", "byte", seq_len=8, batch_size=2, split="test")


def test_unknown_task_and_bad_arguments(bpe, tfds_dir):
  with pytest.raises(ValueError, match=r"unknown task 'sort'; available: \["):
    pipeline.task_batches("sort", bpe, seq_len=8, batch_size=2)
  with pytest.raises(ValueError, match=r"unknown task 'sort'"):
    pipeline.lm_batches("task:sort", bpe, seq_len=8, batch_size=2)
  with pytest.raises(ValueError, match=r"unknown task 'sort'"):
    pipeline.prepare("jaxsun_tasks/sort", tfds_dir)
  with pytest.raises(ValueError, match=r"seq_len=0 must be a positive integer"):
    pipeline.task_batches("spell_backward", bpe, seq_len=0, batch_size=2)
  with pytest.raises(ValueError, match=r"weights=\[1.0\] must be 2 positive numbers"):
    pipeline.lm_batches([["a"], ["b"]], bpe, seq_len=8, batch_size=2, weights=[1])
  with pytest.raises(ValueError, match=r"weights=\[1.0, 0.0\] must be 2 positive"):
    pipeline.lm_batches([["a"], ["b"]], bpe, seq_len=8, batch_size=2, weights=[1, 0])
  with pytest.raises(ValueError, match=r"split 'dev' not in source"):
    pipeline.lm_batches(SMALL_CORPUS, bpe, seq_len=8, batch_size=2, split="dev",
                        data_dir=tfds_dir)


def test_missing_and_empty_files_give_the_rebuild_command(tmp_path, monkeypatch, bpe):
  monkeypatch.setenv(paths.DATA_ROOT_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"corpora/shakespeare.jsonl.xz is missing; "
                                              r"rebuild it with: python scripts/build_data"):
    pipeline.prepare(SMALL_CORPUS, str(tmp_path / "tfds"))
  with pytest.raises(FileNotFoundError, match=r"tasks/letter_counting.jsonl.gz is missing"):
    pipeline.task_batches("letter_counting", bpe, seq_len=64, batch_size=2)
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks/letter_counting.jsonl.gz").write_bytes(b"")
  with pytest.raises(ValueError, match=r"letter_counting.jsonl.gz is empty"):
    pipeline.lm_batches("task:letter_counting", bpe, seq_len=64, batch_size=2)
