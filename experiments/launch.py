r"""Launches a job from a config file (absl + ml-collections `config_flags`, locked).

    python -m experiments.launch --config=configs/quickstart.py[:smoke] --workdir=/tmp/qs \
        [--config.finetune.steps=100]

A misspelt `--config.*` key is an error (the config is locked). The logic lives in
`jaxsun.jobs` (importable from notebooks); this file only parses flags.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a configs/*.py file, optionally with :variant", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  from jaxsun import jobs  # pylint: disable=g-import-not-at-top
  jobs.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
