"""`jaxsun_corpus`: a committed text corpus as chunks, feature `text`.

One BuilderConfig per corpus in `jaxsun.data.corpora.CORPORA`; pass a `CorpusConfig`
with `max_documents` for a small variant (tests):

    CorpusConfig(name="shakespeare_3", corpus="shakespeare", max_documents=3)

Splits: `train` and `validation`, deterministic by chunk (see `jaxsun.data.corpora`).
Records keep corpus order (`disable_shuffling`), so a one-pass read is the text in order.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from jaxsun.data import corpora
from jaxsun.data.tfds_builders import _common


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
  """Which corpus, and optionally only its first `max_documents` works."""

  corpus: str = ""
  max_documents: int | None = None

  def __post_init__(self):
    corpora.check_corpus(self.corpus)
    if self.max_documents is not None and self.max_documents <= 0:
      raise ValueError(f"CorpusConfig.max_documents={self.max_documents} must be positive")


class JaxsunCorpus(_common.LocalBuilder):
  """Committed corpora (jaxsun/data/files/corpora/*.jsonl.xz) cut into ~2-4 KB chunks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Chunks of whole lines; every 20th chunk is validation."}
  BUILDER_CONFIGS = [CorpusConfig(name=c, corpus=c, description=f"the {c} corpus")
                     for c in corpora.CORPORA]

  def source_file(self) -> str:
    return corpora.corpus_path(self.builder_config.corpus)

  def rebuild_args(self) -> str:
    return f"--only corpora --corpora {self.builder_config.corpus}"

  def _info(self) -> tfds.core.DatasetInfo:
    return _common.LocalDatasetInfo(
        builder=self,
        description="Text chunks of a corpus committed under jaxsun/data/files/corpora.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True,
        metadata=self._metadata(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    self._record_fingerprint()
    docs = corpora.load_corpus(self.builder_config.corpus,
                               self.builder_config.max_documents)
    return {split: self._generate_examples(docs, split) for split in corpora.SPLITS}

  def _generate_examples(self, docs, split):
    for i, chunk in enumerate(corpora.split_chunks(docs, split)):
      yield i, {"text": chunk}
