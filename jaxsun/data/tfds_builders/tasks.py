"""`jaxsun_tasks`: a committed task as prompt/answer pairs, features `prompt`, `answer`.

One BuilderConfig per task in `jaxsun.data.tasks.TASKS`; `TaskConfig(max_examples=...)`
keeps only the first examples of each split (tests). Splits `train`, `validation`
and `test`, in file order, exactly `jaxsun.data.tasks.load_task(task, split)`.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from jaxsun.data import tasks
from jaxsun.data.tfds_builders import _common


@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
  """Which task, and optionally only the first `max_examples` of each split."""

  task: str = ""
  max_examples: int | None = None

  def __post_init__(self):
    tasks.check_task(self.task)
    if self.max_examples is not None and self.max_examples <= 0:
      raise ValueError(f"TaskConfig.max_examples={self.max_examples} must be positive")


class JaxsunTasks(_common.LocalBuilder):
  """reasoning-gym tasks committed under jaxsun/data/files/tasks (see jaxsun.data.tasks)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Prompt/answer pairs; train and test disjoint by prompt.",
                   "1.1.0": "A validation split (500 items after the test items)."}
  BUILDER_CONFIGS = [TaskConfig(name=t, task=t, description=f"the {t} task")
                     for t in tasks.TASKS]

  def source_file(self) -> str:
    return tasks.task_path(self.builder_config.task)

  def rebuild_args(self) -> str:
    return f"--only tasks --tasks {self.builder_config.task}"

  def _info(self) -> tfds.core.DatasetInfo:
    return _common.LocalDatasetInfo(
        builder=self,
        description="Prompt/answer pairs generated with reasoning-gym 0.1.25.",
        features=tfds.features.FeaturesDict({"prompt": tfds.features.Text(),
                                             "answer": tfds.features.Text()}),
        disable_shuffling=True,
        metadata=self._metadata(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    self._record_fingerprint()
    n = self.builder_config.max_examples
    return {split: self._generate_examples(tasks.load_task(self.builder_config.task,
                                                           split)[:n])
            for split in tasks.SPLITS}

  def _generate_examples(self, examples):
    for i, ex in enumerate(examples):
      yield i, {"prompt": ex.prompt, "answer": ex.answer}
