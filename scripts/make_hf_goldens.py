"""Rebuilds tests/testdata/hf: tiny random Hugging Face checkpoints and their golden logits.

The tests compare jaxsun's logits on these checkpoints against the logits written here by
`transformers` (PyTorch, CPU, float32), so `make test` needs neither torch nor
transformers. Run it in an environment that has both, plus jaxsun:

    pip install torch transformers && pip install -e .
    python scripts/make_hf_goldens.py            # writes tests/testdata/hf/* and
                                                 # jaxsun/data/files/checkpoints/llama_bytes

Besides writing the goldens it checks the other direction, which the tests cannot: each
checkpoint imported into jaxsun and exported again loads back into transformers with the
same logits. Versions used for the committed files are in tests/testdata/hf/VERSIONS.json
(transformers 5.24.0, torch 2.14.1, CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np
import torch
import transformers

REPO = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(REPO, "tests", "testdata", "hf")
# Shipped with the package (the eval_harness job's :tiny variant and the import notebook).
SHIPPED = {"llama_bytes": os.path.join(REPO, "jaxsun", "data", "files", "checkpoints",
                                       "llama_bytes")}

# name -> (config class, config kwargs, storage dtype, sequence length, shard size).
MODELS = {
    # Llama 2-style: untied head, GQA, explicit head_dim != hidden / heads, float32.
    "llama_untied": ("LlamaConfig", dict(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
        "float32", 24, None),
    # Llama 3.2-style: tied embeddings, rope_type llama3 with a 32-token original context
    # (tokens up to 96 exercise all three frequency bands), bf16 storage, sharded files.
    "llama3_scaled": ("LlamaConfig", dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
        "bfloat16", 96, "60KB"),
    # Qwen2.5-style: q/k/v biases, tied embeddings.
    "qwen2": ("Qwen2Config", dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
        "float32", 24, None),
    # Byte-level vocabulary (jaxsun's "byte" tokenizer, 259 ids): the checkpoint the
    # eval_harness job's :tiny variant and the import notebook start from.
    "llama_bytes": ("LlamaConfig", dict(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=257, eos_token_id=258,
        pad_token_id=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
        "float32", 32, None),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Weights ~ N(0, 0.15^2), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2).

  HF initialises biases to 0 and norms to 1, which would leave those code paths untested.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith(".bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(0.15 * noise)


def logits_of(directory: str, tokens: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy().astype(np.float32)


def build(name: str, seed: int) -> dict:
  cls, kwargs, dtype, seq, shard = MODELS[name]
  config = getattr(transformers, cls)(**kwargs)
  model = transformers.AutoModelForCausalLM.from_config(config)
  randomize(model, seed)
  model = model.to(getattr(torch, dtype))
  out = SHIPPED.get(name, os.path.join(OUT, name))
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
  for extra in ("generation_config.json",):
    if os.path.exists(os.path.join(out, extra)):
      os.remove(os.path.join(out, extra))
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, kwargs["vocab_size"], size=(2, seq), dtype=np.int64)
  logits = logits_of(out, tokens)  # float32 forward from the stored weights
  np.savez_compressed(os.path.join(out, "golden.npz"), tokens=tokens.astype(np.int32),
                      logits=logits)
  return {"tokens": tokens, "logits": logits}


def verify_roundtrip(name: str, golden: dict) -> float:
  """Imports into jaxsun, exports, loads the export in transformers: max |dlogit|."""
  from jaxsun import interop  # pylint: disable=g-import-not-at-top

  src = SHIPPED.get(name, os.path.join(OUT, name))
  split = interop.load_hf(src)
  with tempfile.TemporaryDirectory() as tmp:
    dst = os.path.join(tmp, "export")
    interop.save_hf(split, dst, base_config=json.load(open(os.path.join(src,
                                                                         "config.json"))))
    back = logits_of(dst, golden["tokens"])
  return float(np.max(np.abs(back - golden["logits"])))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--skip-roundtrip", action="store_true",
                      help="do not check jaxsun's export against transformers")
  args = parser.parse_args()
  os.makedirs(OUT, exist_ok=True)
  report = {"transformers": transformers.__version__, "torch": torch.__version__,
            "seed": args.seed, "export_max_abs_dlogit": {}}
  for i, name in enumerate(MODELS):
    golden = build(name, args.seed + i)
    if not args.skip_roundtrip:
      err = verify_roundtrip(name, golden)
      report["export_max_abs_dlogit"][name] = err
      print(f"{name}: jaxsun export -> transformers max |dlogit| = {err:.3g}")
      assert err == 0.0 or err < 1e-5, (name, err)
  with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
