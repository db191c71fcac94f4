"""`python -m jaxsun.serving --config=configs/serving.py:tiny` as a user starts it, queried
with the official openai client; SIGINT drains and exits cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

import jaxsun
from configs import serving as serving_config
from jaxsun.data.tokenizers import get_tokenizer
from jaxsun.serving import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
  port = free_port()
  proc = subprocess.Popen(
      [sys.executable, "-m", "jaxsun.serving", "--config=configs/serving.py:tiny",
       f"--port={port}", "--config.deployment.decode_policy=round_robin"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 180
  while True:
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200:
        break
    except httpx.HTTPError:
      pass
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"server did not start: {proc.stdout.read()[-3000:]}")
    time.sleep(0.25)
  yield proc, url
  if proc.poll() is None:
    proc.kill()


def test_cli_server_answers_like_generate_and_exits_cleanly_on_sigint(server):
  proc, url = server
  client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
  assert sorted(m.id for m in client.models.list().data) == ["code", "math"]
  tok = get_tokenizer("byte")
  models = launch.build_models(serving_config.get_config("tiny"))
  for name, text in (("math", "Q: 12+30?\nA:"), ("code", "def f(x):")):
    out = client.completions.create(model=name, prompt=text, max_tokens=10, temperature=0)
    ids = [tok.bos_id] + tok.encode(text)
    ref = jaxsun.generate(models[name], [ids], max_new_tokens=10, eos_id=tok.eos_id)
    want = tok.decode(np.asarray(ref.tokens[0, :int(ref.lengths[0])]).tolist())
    assert out.choices[0].text == want
  chunks = list(client.completions.create(model="math", prompt="Q: 12+30?\nA:",
                                          max_tokens=10, temperature=0, stream=True))
  assert "".join(c.choices[0].text for c in chunks if c.choices) == want_math(models, tok)
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model="physics", prompt="x", max_tokens=2)
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=60) == 0  # drained, then a clean exit
  log = proc.stdout.read()
  assert "Shutting down" in log and "Traceback" not in log, log[-2000:]


def want_math(models, tok):
  ids = [tok.bos_id] + tok.encode("Q: 12+30?\nA:")
  ref = jaxsun.generate(models["math"], [ids], max_new_tokens=10, eos_id=tok.eos_id)
  return tok.decode(np.asarray(ref.tokens[0, :int(ref.lengths[0])]).tolist())


def test_config_variants_build_and_refuse_unknown_ones():
  for v in ("", "tiny", "tiny_prefillshare", "tiny_conventional", "tiny_colocated"):
    c = serving_config.get_config(v)
    launch.deployment_config(c)
  with pytest.raises(ValueError, match="variant"):
    serving_config.get_config("huge")
  with pytest.raises(ValueError, match="task_models.x"):
    launch.build_task_model("x", "magic:1", launch.load_base("shipped:llama_bytes"))
