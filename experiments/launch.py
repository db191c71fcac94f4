r"""Launches a job from a config file (absl + ml-collections `config_flags`, locked).

    python -m experiments.launch --config=configs/quickstart.py[:smoke] --workdir=/tmp/qs \
        [--config.finetune.steps=100]
    jaxsun-launch --config=quickstart:smoke --workdir=/tmp/qs   # installed: from anywhere

`--config` takes a path or the name of a shipped config (`configs/<name>.py`, found in
the installed package), optionally with `:variant`.

A misspelt `--config.*` key is an error (the config is locked). The logic lives in
`jaxsun.jobs` (importable from notebooks); this file only parses flags.
"""

import importlib.resources
import os
import sys

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


def shipped_configs() -> list[str]:
  root = importlib.resources.files("configs")
  return sorted(p.name[:-3] for p in root.iterdir()
                if p.name.endswith(".py") and not p.name.startswith("_"))


def resolve_config_arg(argv: list[str]) -> list[str]:
  """Rewrites `--config=<name>[:variant]` to the shipped config file's path."""
  out = []
  for arg in argv:
    if arg.startswith("--config=") or arg.startswith("--config:"):
      value = arg[len("--config="):]
      path, sep, variant = value.partition(":")
      if not os.path.exists(path):
        name = os.path.basename(path)
        name = name[:-3] if name.endswith(".py") else name
        candidate = importlib.resources.files("configs") / f"{name}.py"
        if not candidate.is_file():
          raise app.UsageError(f"--config={value}: no file {path!r} and no shipped config "
                               f"named {name!r}; shipped: {shipped_configs()}")
        arg = f"--config={candidate}{sep}{variant}"
    out.append(arg)
  return out


def cli() -> None:
  """The `jaxsun-launch` console script."""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, argv=resolve_config_arg(sys.argv))


if __name__ == "__main__":
  cli()
