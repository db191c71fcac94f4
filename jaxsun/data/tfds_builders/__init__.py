"""TFDS builders over the committed data; importing this package imports tensorflow_datasets.

    jaxsun_corpus/<corpus>   feature "text"; splits train / validation (by chunk)
    jaxsun_tasks/<task>      features "prompt", "answer"; splits train / test

They read only the files under `data/` (never download) and write array_record, the
format TFDS can read without TensorFlow. Use them through `jaxsun.data.pipeline.prepare`,
which also re-prepares a dataset whose committed source file has changed.
"""

from jaxsun.data.tfds_builders.corpus import CorpusConfig, JaxsunCorpus
from jaxsun.data.tfds_builders.tasks import JaxsunTasks, TaskConfig

__all__ = ["CorpusConfig", "JaxsunCorpus", "TaskConfig", "JaxsunTasks"]
