r"""Starts the OpenAI-compatible server for a deployment config.

    python -m jaxsun.serving --config=configs/serving.py:tiny --port=8000
    python -m jaxsun.serving --config=configs/serving.py:tiny \
        --config.deployment.kind=prefillshare --config.runtime=ray

The config is locked (a misspelt key is an error); the logic lives in
`jaxsun.serving.launch` and `jaxsun.serving.api`.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a configs/serving.py-style file, optionally with :variant",
    lock_config=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
_PORT = flags.DEFINE_integer("port", 8000, "port to listen on (0: any free port)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxsun.serving import api, launch  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  system = launch.build_system(config)
  kw = {}
  if config.chat_template == "qa":
    kw["chat_template"] = api.qa_chat_template
  try:
    api.run(system, _HOST.value, _PORT.value, **kw)  # drains the system on the way out
  except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled: a clean stop here
    pass


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
