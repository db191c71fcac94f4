"""grain input pipelines over TFDS data sources: packed LM batches and task batches.

    tok = get_tokenizer("bpe4k")
    train = lm_batches(["shakespeare", "task:spell_backward"], tok, seq_len=256,
                       batch_size=32, seed=0, weights=[0.9, 0.1])
    batch = next(train)  # {"tokens": i32[B, S], "boundary": i32[B], "loss_mask": f32[B, S]}
    state = train.get_state()  # a JSON-serializable dict; set_state(state) resumes exactly

    sft = task_batches("basic_arithmetic", tok, seq_len=64, batch_size=64, seed=0)
    prompts, answers = task_eval_items("basic_arithmetic", tok, split="test", limit=200)

Batches are numpy arrays in the layout `jaxsun.next_token_loss` takes: `boundary` is the
number of prompt tokens of each row (1 for LM rows: no prompt) and `loss_mask[b, t]`
weights token t *as a target*.

* **LM**: every document becomes its tokens followed by `eos_id`; each source's stream is
  cut into consecutive windows of `seq_len` tokens (no token is dropped or repeated; a
  document may span two windows). With several sources, windows are drawn from source i
  with probability `weights[i]`, so the weights are fractions of tokens. Training
  (`repeat=True`, the default for split "train") shuffles each source's documents with a
  seed derived from `seed`, reshuffles every epoch and never ends. Evaluation
  (`repeat=False`) reads the sources once, in order, and pads the last window and batch
  (`loss_mask` 0 on padding).
* **Tasks**: a row is `[bos] + encode(format_prompt(ex)) + encode(format_answer(ex)) +
  [eos]` then padding; `boundary` counts the prompt tokens incl. bos and `loss_mask` is 1
  exactly on the answer tokens and the eos. Examples longer than `seq_len` are dropped
  and counted (`Batches.num_dropped`).

Sources are names resolved by `prepare` (TFDS datasets under `data_dir`): a corpus of
`jaxsun.data.corpora.CORPORA`, a task of `jaxsun.data.tasks.TASKS` (records `prompt`,
`answer`; in LM pipelines the text is `format_text`), a `CorpusConfig`/`TaskConfig`, or
the name of a TFDS dataset the user prepared in array_record format with a `text`
feature (e.g. "lm1b"). "task:<name>" reads a task's committed file directly (no TFDS).
Any random-access sequence (`len` and `[]`) of str/bytes/records also works as one
source; wrap it in a list, `lm_batches([docs], ...)`, since a list is a list of sources.
When a source lacks split "validation" its "test" split is used, and vice versa.

`data_dir` defaults to `$JAXSUN_TFDS_DIR`, else `~/.cache/jaxsun/tfds`. Nothing is ever
downloaded: our builders read `data/`, and a user dataset that is not prepared is an
error.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from jaxsun.data import corpora
from jaxsun.data.local_tasks import task_name
from jaxsun.data import paths as data_paths
from jaxsun.data import tasks as tasks_lib
from jaxsun.data.tokenizers import Tokenizer, get_tokenizer

TFDS_DIR_ENV = "JAXSUN_TFDS_DIR"
TASK_TEXT_PREFIX = "task:"
# A background thread tokenizes ahead of the consumer; order and state stay exact.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- TFDS


def tfds_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """`data_dir`, else `$JAXSUN_TFDS_DIR`, else `~/.cache/jaxsun/tfds`."""
  if data_dir is None:
    data_dir = os.environ.get(TFDS_DIR_ENV) or pathlib.Path.home() / ".cache/jaxsun/tfds"
  return os.fspath(pathlib.Path(data_dir).expanduser())


def _builder(source, data_dir: str):
  """(builder, ours) for a name or config; never prepares anything."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from jaxsun.data import tfds_builders as tb  # pylint: disable=import-outside-toplevel
  if isinstance(source, tb.CorpusConfig):
    return tb.JaxsunCorpus(config=source, data_dir=data_dir), True
  if isinstance(source, tb.TaskConfig):
    return tb.JaxsunTasks(config=source, data_dir=data_dir), True
  if not isinstance(source, str):
    raise TypeError(f"source must be a dataset name or a CorpusConfig/TaskConfig, got "
                    f"{type(source).__name__}")
  if source in corpora.CORPORA:
    return tb.JaxsunCorpus(config=source, data_dir=data_dir), True
  if source in tasks_lib.TASKS:
    return tb.JaxsunTasks(config=source, data_dir=data_dir), True
  family, _, config = source.partition("/")
  if family in ("jaxsun_corpus", "jaxsun_tasks"):
    config = config.partition(":")[0]
    if family == "jaxsun_corpus":
      corpora.check_corpus(config)
      return tb.JaxsunCorpus(config=config, data_dir=data_dir), True
    tasks_lib.check_task(config)
    return tb.JaxsunTasks(config=config, data_dir=data_dir), True
  try:
    return tfds.builder(source, data_dir=data_dir), False
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:  # or a bad name
    raise ValueError(
        f"unknown dataset {source!r}: not a jaxsun corpus {list(corpora.CORPORA)}, "
        f"task {list(tasks_lib.TASKS)}, 'task:<task>', nor a TFDS dataset name "
        f"({str(e).splitlines()[0]})") from e


def prepare(source, data_dir: str | os.PathLike | None = None) -> dict[str, Sequence]:
  """The random-access data sources (split -> source) of a TFDS dataset.

  Our builders (corpora, tasks) are prepared under `data_dir` on first use (a fraction
  of a second for Shakespeare) from the committed files, and prepared again when those
  files or the config changed. Any other name is a TFDS dataset the user has already
  prepared under `data_dir` in array_record format; it is never downloaded.

  Args:
    source: a corpus or task name, "jaxsun_corpus/<corpus>", "jaxsun_tasks/<task>", a
      `CorpusConfig`/`TaskConfig`, or a prepared TFDS dataset name such as "lm1b".
    data_dir: the TFDS data directory (see `tfds_data_dir`).

  Raises:
    FileNotFoundError: a user dataset that is not prepared under `data_dir`, or a
      missing committed file.
    ValueError: an unknown name, or a dataset prepared in a format without random access.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  data_dir = tfds_data_dir(data_dir)
  builder, ours = _builder(source, data_dir)
  if ours:
    tfds.disable_progress_bar()
    if builder.is_prepared() and builder.prepared_fingerprint() != builder.fingerprint():
      # Our own generated files, for this config and version only.
      log.warning("re-preparing %s: its committed source or config changed",
                  builder.data_dir)
      shutil.rmtree(builder.data_dir)
      builder, _ = _builder(source, data_dir)
    builder.download_and_prepare()  # reads data/ only; a no-op once prepared
  elif not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {source!r} is not prepared under {data_dir} (looked in "
        f"{builder.data_dir}); jaxsun never downloads it. Prepare it yourself, e.g. "
        f"tfds.builder({source!r}, data_dir={data_dir!r}, file_format='array_record')"
        f".download_and_prepare(), or pass the data_dir that holds it.")
  try:
    return dict(builder.as_data_source())
  except NotImplementedError as e:
    raise ValueError(f"TFDS dataset {source!r} under {data_dir} has no random-access "
                     f"files; prepare it with file_format='array_record'") from e


def data_source(source, split: str, data_dir: str | os.PathLike | None = None) -> Sequence:
  """One split of `prepare(source, data_dir)`, with the validation/test fallback."""
  sources = prepare(source, data_dir)
  return sources[_resolve_split(sources, split, source)]


def _resolve_split(available, split: str, source) -> str:
  if split in available:
    return split
  alias = {"validation": "test", "test": "validation"}.get(split)
  if alias in available:
    return alias
  raise ValueError(f"split {split!r} not in source {_describe(source)}; available: "
                   f"{sorted(available)}")


# ----------------------------------------------------------------------------- records


def _text(record) -> str:
  """The text of one record: str, bytes, {"text": ...} or {"prompt", "answer"}."""
  if isinstance(record, dict):
    if "text" in record:
      record = record["text"]
    elif "prompt" in record and "answer" in record:
      return tasks_lib.format_text(tasks_lib.Example(_text(record["prompt"]),
                                                     _text(record["answer"])))
    else:
      raise ValueError(f"record has no 'text' (or 'prompt'/'answer') feature; keys: "
                       f"{sorted(record)}")
  if isinstance(record, np.ndarray) and record.ndim == 0:
    record = record.item()
  if isinstance(record, bytes):
    return record.decode("utf-8")
  if isinstance(record, str):
    return record
  raise TypeError(f"cannot read text from a record of type {type(record).__name__}")


def _describe(source) -> str:
  if isinstance(source, str):
    return source
  if hasattr(source, "name") and hasattr(source, "version"):  # a BuilderConfig
    return f"{type(source).__name__}({source.name})"
  return f"<{type(source).__name__} of {len(source)} records>"


def _lm_records(source, split: str, data_dir) -> Sequence:
  """A random-access sequence of text records for one LM source."""
  if isinstance(source, str) and source.startswith(TASK_TEXT_PREFIX):
    task = source[len(TASK_TEXT_PREFIX):]
    tasks_lib.check_task(task)
    task_split = _resolve_split(tasks_lib.SPLITS, split, source)
    return [tasks_lib.format_text(ex) for ex in tasks_lib.load_task(task, task_split)]
  if isinstance(source, str) or hasattr(source, "version"):
    return data_source(source, split, data_dir)
  if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
    return source
  raise TypeError(f"an LM source must be a dataset name, a builder config, 'task:<name>' "
                  f"or a random-access sequence, got {type(source).__name__}")


def _as_tokenizer(tokenizer) -> Tokenizer:
  return get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


def _tokenizer_spec(tok: Tokenizer) -> str:
  return f"{getattr(tok, 'name', type(tok).__name__)}:{tok.vocab_size}"


def _check_positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name}={value!r} must be a positive integer")


def _source_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


# ----------------------------------------------------------------------------- iterators


class Batches:
  """An endless (training) or one-pass (evaluation) iterator of batch dicts.

  `get_state()` is a JSON-serializable dict; `set_state(state)` on an iterator built
  with the same arguments makes its next batches those the saved one would have given.
  The state records those arguments and `set_state` refuses a state from another
  pipeline.

  Attributes:
    spec: the arguments that define the stream (JSON types).
    num_examples: task pipelines: examples kept; LM pipelines: records per source.
    num_dropped: task pipelines: examples dropped for exceeding seq_len.
    boundary_range: task pipelines: (shortest, longest) prompt of the kept examples,
      so a trainer can compile one `split_forward` window for the whole stream.
  """

  def __init__(self, dataset: grain.IterDataset, spec: dict[str, Any], *,
               num_examples, num_dropped: int = 0,
               boundary_range: tuple[int, int] | None = None):
    self.spec = json.loads(json.dumps(spec))  # the form a JSON round trip gives back
    self.num_examples = num_examples
    self.num_dropped = num_dropped
    self.boundary_range = boundary_range
    self._it = iter(dataset)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    state = {"spec": self.spec, "iterator": self._it.get_state()}
    # Guard the JSON promise: a grain upgrade with non-JSON state fails here, loudly.
    return json.loads(json.dumps(state))

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or "iterator" not in state:
      raise ValueError("state must be a dict from Batches.get_state()")
    if state.get("spec") != self.spec:
      theirs = state.get("spec") or {}
      diff = sorted(k for k in set(theirs) | set(self.spec)
                    if theirs.get(k) != self.spec.get(k))
      raise ValueError(f"state comes from a different pipeline (differs in {diff}): "
                       f"saved {theirs}, this one {self.spec}")
    self._it.set_state(state["iterator"])


class _PackIterator(grain.DatasetIterator):
  """Cuts a stream of token arrays into consecutive windows of `seq_len` tokens.

  State: the parent's state *before* the document being cut, and the offset in it, so a
  restore re-reads that one document instead of storing tokens.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len, self._pad_id = seq_len, pad_id
    self._doc, self._pos, self._doc_state = None, 0, None

  def __next__(self) -> dict[str, np.ndarray]:
    pieces, n = [], 0
    while n < self._seq_len:
      if self._doc is None or self._pos == len(self._doc):
        self._doc_state = self._parent.get_state()
        try:
          self._doc, self._pos = next(self._parent), 0
        except StopIteration:
          self._doc = None
          break
      take = min(self._seq_len - n, len(self._doc) - self._pos)
      pieces.append(self._doc[self._pos:self._pos + take])
      self._pos += take
      n += take
    if n == 0:
      raise StopIteration
    tokens = np.full((self._seq_len,), self._pad_id, np.int32)  # i32[S]
    tokens[:n] = np.concatenate(pieces)
    loss_mask = np.zeros((self._seq_len,), np.float32)  # f32[S]
    loss_mask[:n] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "doc_parent": None, "pos": 0}
    return {"parent": None, "doc_parent": self._doc_state, "pos": self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["doc_parent"] is None:
      self._parent.set_state(state["parent"])
      self._doc, self._pos, self._doc_state = None, 0, None
    else:
      self._parent.set_state(state["doc_parent"])
      self._doc_state = state["doc_parent"]
      self._doc, self._pos = next(self._parent), state["pos"]


class _PackIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int):
    super().__init__(parent)
    self._seq_len, self._pad_id = seq_len, pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)


class _Tokenize:
  """document -> i32[n + 1]: its tokens and eos."""

  def __init__(self, tokenizer: Tokenizer):
    self._tok = tokenizer

  def __call__(self, record) -> np.ndarray:
    ids = self._tok.encode(_text(record))
    ids.append(self._tok.eos_id)
    return np.asarray(ids, np.int32)


def _finish_batches(ds: grain.IterDataset, batch_size: int, pad_id: int,
                    seq_len: int) -> grain.IterDataset:
  """Batches rows; a short last batch is padded with empty rows (loss_mask 0)."""

  def pad(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    b = batch["tokens"].shape[0]
    if "boundary" not in batch:  # LM rows: no prompt
      batch["boundary"] = np.ones((b,), np.int32)
    if b < batch_size:
      extra = batch_size - b
      batch = {
          "tokens": np.concatenate([batch["tokens"],
                                    np.full((extra, seq_len), pad_id, np.int32)]),
          # Empty rows repeat the last boundary: it keeps the prefill window tight.
          "boundary": np.concatenate([batch["boundary"],
                                      np.full((extra,), batch["boundary"][-1], np.int32)]),
          "loss_mask": np.concatenate([batch["loss_mask"],
                                       np.zeros((extra, seq_len), np.float32)]),
      }
    return {"tokens": batch["tokens"].astype(np.int32),          # i32[B, S]
            "boundary": batch["boundary"].astype(np.int32),      # i32[B]
            "loss_mask": batch["loss_mask"].astype(np.float32)}  # f32[B, S]

  return ds.batch(batch_size, drop_remainder=False).map(pad)


# ----------------------------------------------------------------------------- LM


def lm_batches(sources, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
               split: str = "train", weights: Sequence[float] | None = None,
               repeat: bool | None = None,
               data_dir: str | os.PathLike | None = None) -> Batches:
  """Packed language-modelling batches from one or more text sources.

  Args:
    sources: one source or a list of sources (see the module docstring for the forms);
      an in-memory list of documents is one source, so pass `[docs]`.
    tokenizer: a `Tokenizer` or a name for `get_tokenizer`.
    seq_len: tokens per row.
    batch_size: rows per batch.
    seed: shuffling seed (training only).
    split: "train", "validation" (falls back to "test") or another split name.
    weights: with several sources, the fraction of rows drawn from each (normalised);
      default equal. Training only.
    repeat: shuffle and repeat forever; default: `split == "train"`. False: one pass in
      order, sources one after the other.
    data_dir: the TFDS data directory (see `tfds_data_dir`).

  Returns:
    `Batches` of {"tokens": i32[B, S], "boundary": i32[B] (ones), "loss_mask": f32[B, S]}.
  """
  _check_positive("seq_len", seq_len)
  _check_positive("batch_size", batch_size)
  tok = _as_tokenizer(tokenizer)
  if isinstance(sources, (str, bytes)) or not isinstance(sources, (list, tuple)):
    sources = [sources]
  if not sources:
    raise ValueError("sources is empty")
  repeat = split == "train" if repeat is None else bool(repeat)
  if weights is not None:
    weights = [float(w) for w in weights]
    if len(weights) != len(sources) or not all(w > 0 for w in weights):
      raise ValueError(f"weights={weights} must be {len(sources)} positive numbers, one "
                       "per source (leave a source out rather than weighting it 0)")
  records = [_lm_records(s, split, data_dir) for s in sources]
  for s, r in zip(sources, records):
    if len(r) == 0:
      raise ValueError(f"source {_describe(s)} has no records in split {split!r}")

  tokenize = _Tokenize(tok)
  if repeat:
    streams = []
    for i, r in enumerate(records):
      docs = (grain.MapDataset.source(r).shuffle(seed=_source_seed(seed, i)).repeat()
              .map(tokenize).to_iter_dataset(READ_OPTIONS))
      streams.append(_PackIterDataset(docs, seq_len, tok.pad_id))
    rows = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
  else:
    docs = grain.MapDataset.concatenate([grain.MapDataset.source(r) for r in records])
    rows = _PackIterDataset(docs.map(tokenize).to_iter_dataset(READ_OPTIONS), seq_len,
                            tok.pad_id)
  spec = {"kind": "lm", "sources": [_describe(s) for s in sources], "split": split,
          "tokenizer": _tokenizer_spec(tok), "seq_len": int(seq_len),
          "batch_size": int(batch_size), "seed": int(seed), "weights": weights,
          "repeat": repeat}
  return Batches(_finish_batches(rows, batch_size, tok.pad_id, seq_len), spec,
                 num_examples=[len(r) for r in records])


# ----------------------------------------------------------------------------- tasks


def encode_example(example: tasks_lib.Example, tokenizer) -> tuple[list[int], list[int]]:
  """(prompt ids incl. bos, answer ids incl. eos) of one task example."""
  tok = _as_tokenizer(tokenizer)
  prompt = [tok.bos_id] + tok.encode(tasks_lib.format_prompt(example))
  answer = tok.encode(tasks_lib.format_answer(example)) + [tok.eos_id]
  return prompt, answer


class _TaskRow:
  """(prompt ids, answer ids) -> one padded row with its boundary and loss mask."""

  def __init__(self, seq_len: int, pad_id: int):
    self._seq_len, self._pad_id = seq_len, pad_id

  def __call__(self, pair) -> dict[str, np.ndarray]:
    prompt, answer = pair
    p, n = len(prompt), len(prompt) + len(answer)
    tokens = np.full((self._seq_len,), self._pad_id, np.int32)  # i32[S]
    tokens[:p] = prompt
    tokens[p:n] = answer
    loss_mask = np.zeros((self._seq_len,), np.float32)  # f32[S]: answer and eos
    loss_mask[p:n] = 1.0
    return {"tokens": tokens, "boundary": np.int32(p), "loss_mask": loss_mask}


def _task_examples(task, split: str, data_dir) -> tuple[str, list[tasks_lib.Example]]:
  """(split name, examples) of a task: a committed task through its TFDS builder
  (array_record), or a user's `LocalTask` file."""
  from jaxsun.data import local_tasks  # pylint: disable=import-outside-toplevel
  if isinstance(task, local_tasks.LocalTask):
    return split, task.load(split)
  tasks_lib.check_task(task)
  task_split = _resolve_split(tasks_lib.SPLITS, split, task)
  source = data_paths.data_root() / tasks_lib.task_path(task)
  stat = source.stat() if source.exists() else None
  stamp = (str(source), stat and stat.st_mtime_ns, stat and stat.st_size)
  return task_split, list(_read_task_split(task, task_split, tfds_data_dir(data_dir), stamp))


@functools.lru_cache(maxsize=32)
def _read_task_split(task: str, split: str, data_dir: str,
                     stamp: tuple) -> tuple[tasks_lib.Example, ...]:
  # Cached (a job reads the same split for every regime; Examples are frozen), keyed by
  # the committed file's path, mtime and size so that a rebuilt file is read again.
  del stamp
  records = data_source(task, split, data_dir)
  return tuple(tasks_lib.Example(_text(records[i]["prompt"]), _text(records[i]["answer"]))
               for i in range(len(records)))


def task_batches(task: str, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                 split: str = "train", repeat: bool | None = None,
                 data_dir: str | os.PathLike | None = None) -> Batches:
  """Prompt/answer batches of one task for supervised fine-tuning or evaluation loss.

  Args:
    task: a name of `jaxsun.data.tasks.TASKS` (read through its TFDS builder), or a
      `jaxsun.data.local_tasks.LocalTask` (a user's file).
    tokenizer: a `Tokenizer` or a name for `get_tokenizer`.
    seq_len: tokens per row; longer examples are dropped (`Batches.num_dropped`).
    batch_size: rows per batch.
    seed: shuffling seed (training only).
    split: "train", "validation" or "test".
    repeat: shuffle and repeat forever; default: `split == "train"`.
    data_dir: the TFDS data directory (see `tfds_data_dir`).

  Returns:
    `Batches` of {"tokens": i32[B, S], "boundary": i32[B], "loss_mask": f32[B, S]}.

  Raises:
    ValueError: unknown task or split, or every example longer than `seq_len`.
  """
  _check_positive("seq_len", seq_len)
  _check_positive("batch_size", batch_size)
  tok = _as_tokenizer(tokenizer)
  repeat = split == "train" if repeat is None else bool(repeat)
  task_split, examples = _task_examples(task, split, data_dir)
  if not examples:
    raise ValueError(f"task {task_name(task)!r} has no examples in split {task_split!r}")
  pairs = [encode_example(ex, tok) for ex in examples]
  kept = [(np.asarray(p, np.int32), np.asarray(a, np.int32)) for p, a in pairs
          if len(p) + len(a) <= seq_len]
  dropped = len(pairs) - len(kept)
  if not kept:
    longest = min(len(p) + len(a) for p, a in pairs)
    raise ValueError(f"all {len(pairs)} examples of task {task_name(task)!r} ({task_split}) are "
                     f"longer than seq_len={seq_len} tokens with tokenizer "
                     f"{_tokenizer_spec(tok)} (the shortest has {longest}); raise seq_len")
  if dropped:
    log.warning("task %s (%s): dropped %d of %d examples longer than seq_len=%d",
                task_name(task), task_split, dropped, len(pairs), seq_len)
  ds = grain.MapDataset.source(kept)
  if repeat:
    ds = ds.shuffle(seed=_source_seed(seed, 0)).repeat()
  rows = ds.map(_TaskRow(seq_len, tok.pad_id)).to_iter_dataset(READ_OPTIONS)
  spec = {"kind": "task", "task": task_name(task), "split": task_split,
          "tokenizer": _tokenizer_spec(tok), "seq_len": int(seq_len),
          "batch_size": int(batch_size), "seed": int(seed), "repeat": repeat}
  lengths = [len(p) for p, _ in kept]
  return Batches(_finish_batches(rows, batch_size, tok.pad_id, seq_len), spec,
                 num_examples=len(kept), num_dropped=dropped,
                 boundary_range=(min(lengths), max(lengths)))


def task_eval_items(task: str, tokenizer, split: str = "test", limit: int | None = None,
                    data_dir: str | os.PathLike | None = None
                    ) -> tuple[list[list[int]], list[str]]:
  """Prompts and answers for exact-match evaluation by generation.

  Returns:
    (prompts, answers): prompt token lists `[bos] + encode(format_prompt(ex))`, and the
    answer strings, for the first `limit` examples of the split in file order. Compare
    `tokenizer.decode(generated)` with `jaxsun.data.tasks.exact_match`.
  """
  tok = _as_tokenizer(tokenizer)
  _, examples = _task_examples(task, split, data_dir)
  if limit is not None:
    _check_positive("limit", limit)
    examples = examples[:limit]
  prompts = [[tok.bos_id] + tok.encode(tasks_lib.format_prompt(ex)) for ex in examples]
  return prompts, [ex.answer for ex in examples]
