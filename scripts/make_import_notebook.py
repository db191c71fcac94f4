"""Writes colab/import_and_evaluate.ipynb (its cells live here, as code, so they diff).

    python scripts/make_import_notebook.py
"""

import pathlib

import nbformat
from nbformat import v4

OUT = pathlib.Path(__file__).parents[1] / "colab" / "import_and_evaluate.ipynb"

CELLS = [
    ("md", """# Bring a Hugging Face checkpoint: import, evaluate with lm-eval, fine-tune with SUN

This notebook
1. imports a Hugging Face Llama checkpoint (`config.json` + `*.safetensors`) into a jaxsun
   `SplitModel` and checks its logits against the ones transformers computed;
2. evaluates it with **lm-evaluation-harness**, offline, on jaxsun's shipped tasks
   (multiple choice, generation, rolling perplexity), every request through the split;
3. fine-tunes a **SUN** task model (prefill tree only; the decode tree stays frozen and
   shared), evaluates it the same way, and exports it as two HF checkpoints.

The checkpoint is the tiny random byte-vocabulary Llama shipped with jaxsun
(`jaxsun/data/files/checkpoints/llama_bytes`, written by transformers); point
`CHECKPOINT` at your own directory (and `TOKENIZER` at its `tokenizer.json`) to do the
same with a real model. The test suite runs this notebook on a small setting."""),
    ("code", """# Install (Colab): clone the repository next to this notebook, then install it (a regular,
# non-editable install, as a user would) with the extras this notebook needs. Skipped when
# jaxsun is already importable (local runs, tests).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("jaxsun") is None:
  repo = os.environ.get("JAXSUN_REPO", "..")  # the folder holding pyproject.toml
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         f"{repo}[data,eval,notebook]"])"""),
    ("code", """import os, pathlib, tempfile
import jax, jax.numpy as jnp, numpy as np
import jaxsun
from jaxsun import data, interop
from jaxsun.data import paths
from jaxsun.eval import harness, perplexity
from jaxsun.jobs import eval_harness, finetune as ft

SMALL = os.environ.get("JAXSUN_NOTEBOOK_SMALL") == "1"  # set by the test suite
CHECKPOINT = paths.data_root() / "checkpoints" / "llama_bytes"
TOKENIZER = "byte"  # or "file:/path/to/tokenizer.json" for your checkpoint
LIMIT = 8 if SMALL else 100  # items per lm-eval task
STEPS = 8 if SMALL else 400  # SUN fine-tuning steps
WORKDIR = pathlib.Path(tempfile.mkdtemp(prefix="import_and_evaluate_"))
tok = data.get_tokenizer(TOKENIZER)
print("jax", jax.__version__, jax.devices())"""),
    ("md", "## 1. Import the checkpoint\n\n`load_hf` reads `config.json` into a "
     "`ModelConfig` (Llama 3 RoPE scaling, GQA, Qwen2 biases, tied or untied head) and the "
     "safetensors into the parameter tree; with `mesh=` each device reads only its slice."),
    ("code", """base = interop.load_hf(str(CHECKPOINT))
print(base.cfg)
print(f"{base.cfg.num_params():,} parameters, tied split: {base.tied}")
golden = np.load(CHECKPOINT / "golden.npz")  # logits transformers computed, float32
logits, _ = base.prefill_module()(jnp.asarray(golden["tokens"]))
print("max |logit - transformers| =", float(np.max(np.abs(np.asarray(logits) - golden["logits"]))))"""),
    ("md", "## 2. lm-evaluation-harness\n\n`JaxsunLM` is an `lm_eval` `TemplateLM`: "
     "log-likelihoods (multiple choice, rolling perplexity) and greedy generation run "
     "through the split, batched in power-of-two length buckets."),
    ("code", """def lm_eval_table(split, label):
  lm = harness.JaxsunLM(split, tok, batch_size=8)
  res = harness.evaluate(lm, list(harness.SHIPPED_TASKS), limit=LIMIT)["results"]
  print(f"--- {label}")
  print(eval_harness.metrics_table(res))
  return res

before = lm_eval_table(base, "imported base model")"""),
    ("md", "## 3. Fine-tune a SUN task model\n\nRegime `prefill`: the split is untied, "
     "only the prefill tree trains; the decode tree is the base model's, bit for bit."),
    ("code", """TASK = "spell_backward"
seq_len = ft.task_seq_len(TASK, tok)
sun, summary = ft.fit_task_model(
    base, TASK, "prefill", tok, steps=STEPS, batch_size=16, seq_len=seq_len,
    optimizer={"learning_rate": 3e-3, "warmup_steps": 20}, lora_cfg=None, seed=0,
    workdir=WORKDIR, name="sun", identity={"notebook": "import_and_evaluate"},
    data_dir=str(WORKDIR / "tfds"), log_every=max(1, STEPS // 4))
print("decode tree unchanged:", summary["shared_decode_tree_unchanged"])
print("final train loss:", round(summary["final_train_loss"], 3))"""),
    ("code", """after = lm_eval_table(sun, "SUN task model (prefill tree fine-tuned)")
texts = data.corpus_chunks("shakespeare", "validation")[:4]
for name, split in (("base", base), ("SUN", sun)):
  ppl = perplexity.text_perplexity(split, texts, tok, seq_len=128)
  print(f"{name}: held-out perplexity {ppl.perplexity:.2f} over {ppl.n_tokens} tokens")"""),
    ("md", "## 4. Export the task model\n\nAn untied split exports as two Hugging Face "
     "checkpoints, `prefill/` and `decode/`, each loadable by transformers on its own."),
    ("code", """out = interop.save_hf_split(sun, str(WORKDIR / "sun_export"))
print(sorted(os.listdir(out)))
back = interop.load_hf_split(out)
same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(sun)))
print("export -> import is bitwise equal:", same)"""),
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
