"""What both builders share: local-only preparation and a fingerprint of their input."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import tensorflow_datasets as tfds

from jaxsun.data import paths

FINGERPRINT_KEY = "jaxsun_fingerprint"


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo of a builder whose data is never on GCS."""

  def initialize_from_bucket(self) -> None:
    # tfds calls this for every unprepared builder; it only makes (and leaks) an empty
    # temp dir before finding GCS disabled. Nothing of ours is on GCS.
    pass


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose only input is one committed file under the data root.

  `fingerprint()` hashes that file and the builder config; it is stored in the prepared
  dataset's metadata so that `pipeline.prepare` can tell a stale preparation apart.
  """

  def __init__(self, **kwargs):
    kwargs.setdefault("file_format", "array_record")  # the format readable without TF
    super().__init__(**kwargs)

  def source_file(self) -> str:
    """The input file, relative to the data root."""
    raise NotImplementedError

  def rebuild_args(self) -> str:
    raise NotImplementedError

  def fingerprint(self) -> str:
    path = paths.data_file(self.source_file(), rebuild=self.rebuild_args())
    h = hashlib.sha256(path.read_bytes())
    fields = {f.name: getattr(self.builder_config, f.name)
              for f in dataclasses.fields(self.builder_config)
              if f.name not in ("release_notes", "supported_versions", "tags")}
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()

  def _metadata(self) -> tfds.core.MetadataDict:
    return tfds.core.MetadataDict()

  def _record_fingerprint(self) -> None:
    self.info.metadata[FINGERPRINT_KEY] = self.fingerprint()

  def prepared_fingerprint(self) -> str | None:
    metadata = self.info.metadata
    return None if metadata is None else metadata.get(FINGERPRINT_KEY)
