"""Writes colab/serving.ipynb (its cells live here, as code, so they diff).

    python scripts/make_serving_notebook.py
"""

import pathlib

import nbformat
from nbformat import v4

OUT = pathlib.Path(__file__).parents[1] / "colab" / "serving.ipynb"

CELLS = [
    ("md", """# Serving SUN task models: one shared decode pool, behind an OpenAI-compatible API

SUN task models each have their own **prefill** tree and share one frozen **decode** tree,
so their decode requests can batch together on the same decode workers. This notebook
1. builds two SUN task models on the shipped byte-level Llama base (their prefill trees
   are random here: this shows the machinery, not the quality of a fine-tune; point the
   specs at your own checkpoints, see `configs/serving.py`);
2. serves them in a **"sun"** deployment (one prefill pool per model, **one shared decode
   pool**) behind the OpenAI-compatible HTTP API, and streams completions through the
   official `openai` client;
3. checks that every streamed answer equals `jaxsun.generate` on that task model;
4. runs a small Poisson workload against the server and plots the latency CDFs (TTFT,
   TPOT, end-to-end), next to the conventional deployment (a decode pool per model).

The test suite runs this notebook on a small setting."""),
    ("code", """# Install (Colab): clone the repository next to this notebook, then install it (a regular,
# non-editable install) with the serving extras. Skipped when jaxsun is importable.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("jaxsun") is None:
  repo = os.environ.get("JAXSUN_REPO", "..")  # the folder holding pyproject.toml
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         f"{repo}[serving,notebook]"])"""),
    ("code", """import dataclasses, os
import numpy as np
import openai
import jaxsun
from configs import serving as serving_config
from jaxsun.data.tokenizers import get_tokenizer
from jaxsun.serving import api, bench, launch, metrics, workload
from jaxsun.serving.engine import Params
from jaxsun.serving.system import ServingSystem

SMALL = os.environ.get("JAXSUN_NOTEBOOK_SMALL") == "1"  # the tests' setting
N_REQUESTS = 16 if SMALL else 200
config = serving_config.get_config("tiny")
models = launch.build_models(config)  # {"math": SUN task model, "code": SUN task model}
tok = get_tokenizer("byte")
for name, m in models.items():  # content ids of the trees: what the engine checks KV against
  print(f"{name}: prefill tree {Params.prefill_of(m).tree_id}, "
        f"decode tree {Params.decode_of(m).tree_id}")"""),
    ("md", "## 1. One shared decode pool behind the HTTP API"),
    ("code", """dep = launch.deployment_config(config)  # kind="sun": per-model prefill, shared decode
system = ServingSystem(dep, models, eos_id=tok.eos_id, tokenizer="byte")
server = api.serve(system)  # uvicorn on 127.0.0.1, a free port
client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
print("serving", [m.id for m in client.models.list().data], "at", server.url)
print("workers:", [w.worker_id for w in system.prefill_workers + system.decode_workers])"""),
    ("code", """def reference(name, text, n):
  ids = [tok.bos_id] + tok.encode(text)
  out = jaxsun.generate(models[name], [ids], max_new_tokens=n, eos_id=tok.eos_id)
  return tok.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]).tolist())

for name, text in (("math", "Q: 12+30?\\nA:"), ("code", "def add(a, b):")):
  stream = client.completions.create(model=name, prompt=text, max_tokens=24, temperature=0,
                                     stream=True)
  pieces = [c.choices[0].text for c in stream if c.choices]
  streamed = "".join(pieces)
  print(f"{name}: {len(pieces)} chunks streamed: {streamed!r}")
  print(f"{name}: streamed == jaxsun.generate: {streamed == reference(name, text, 24)}")"""),
    ("md", """## 2. A workload, and where the requests ran

Poisson arrivals, the two models equally popular, prompts of 8-24 tokens and 16 output
tokens. Every request's decode ran on the one shared decode worker."""),
    ("code", """spec = workload.WorkloadSpec(models=("math", "code"), num_requests=N_REQUESTS, rate=20.0,
                            prompt_len=workload.LengthDist.uniform(8, 24), output_len=16,
                            vocab=(0, 256), seed=0)
items = workload.make_workload(spec)
result = bench.run_workload(server.url, items)
summary = result.summary(occupancy=system.occupancy())
print({k: summary[k] for k in ("completed", "failed", "rejected", "request_throughput",
                               "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms")})
print("decode workers used:", sorted({r.decode_worker for r in system.records if r.ok}))
print(f"mean decode-batch occupancy: {summary['mean_occupancy']:.2f}")"""),
    ("md", "## 3. The same workload on the conventional deployment (a decode pool per model)"),
    ("code", """server.stop()
conv = ServingSystem(dataclasses.replace(dep, kind="conventional"), models,
                     eos_id=tok.eos_id, tokenizer="byte")
conv_server = api.serve(conv)
conv_result = bench.run_workload(conv_server.url, items)
conv_server.stop()
print("conventional decode workers:", sorted({r.decode_worker for r in conv.records if r.ok}))
path = metrics.plot_latency_cdfs({"sun (shared decode)": result.records,
                                  "conventional": conv_result.records}, "serving_cdf.png")
from IPython.display import Image, display
display(Image(filename=str(path)))"""),
]


def main():
  nb = v4.new_notebook()
  nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                               "name": "python3"}
  nb.cells = [v4.new_markdown_cell(src) if kind == "md" else v4.new_code_cell(src)
              for kind, src in CELLS]
  nbformat.validate(nb)
  nbformat.write(nb, OUT)
  print("wrote", OUT)


if __name__ == "__main__":
  main()
