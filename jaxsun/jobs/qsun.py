"""QSUN: SUN task models decoding with a quantized shared decode module.

For each task and seed: fine-tune the prefill tree (SUN, the fine-tuning study's
"prefill" regime at its chosen learning rate) and score exact match with the float
shared decode tree; then with each quantized decode tree (`config.qsun.variants`, each
computed once from the base model: it is every task's tree); and, for
`config.qsun.qa_variants`, after fine-tuning the prefill tree against the quantized
decode tree (quantization-aware prefill training). Also per variant: the bytes of dense
weights one decode step reads, and the decode-step time of a batch on this machine.

Writes results.json (after every task model, so a crash keeps what was measured),
table.md and qsun.png.
"""

from __future__ import annotations

import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsun
from jaxsun.jobs import common
from jaxsun.jobs import finetune as ft
from jaxsun.jobs import finetune_split as fs
from jaxsun.quant import qsun


def parse_variant(v: str, field: str = "config.qsun.variants") -> tuple[str, str]:
  """"awq:w4a16g32" -> ("awq", "w4a16g32"), validated."""
  from jaxsun.quant.ptq import methods as methods_lib  # pylint: disable=g-import-not-at-top
  from jaxsun.quant.schemes import parse_scheme  # pylint: disable=g-import-not-at-top
  if not isinstance(v, str) or v.count(":") != 1:
    raise ValueError(f"{field}: {v!r} must be '<method>:<scheme>', e.g. 'rtn:w4a16g32'")
  method, scheme = v.split(":")
  if method not in methods_lib.CALIBRATED:
    methods_lib.make(method, field=field)
  parse_scheme(scheme, field=field)
  return method, scheme


def check_config(config) -> dict:
  """The fine-tuning study's checks, plus the QSUN section's."""
  parts = fs.check_config(config)
  q = config.qsun
  if not q.variants:
    raise ValueError("config.qsun.variants is empty")
  for v in q.variants:
    parse_variant(v)
  for v in q.qa_variants:
    parse_variant(v, "config.qsun.qa_variants")
    if v not in q.variants:
      raise ValueError(f"config.qsun.qa_variants: {v!r} is not in config.qsun.variants")
  for t in parts["tasks"]:
    name = fs.task_name(t)
    if name not in config.lr:
      raise ValueError(f"config.lr has no learning rate for task {name!r}")
  if q.calib_sequences < 1 or q.calib_seq_len < 2:
    raise ValueError("config.qsun.calib_sequences must be >= 1 and calib_seq_len >= 2")
  return parts


def calibration_tokens(config, tokenizer, data_dir) -> jax.Array:
  """i32[n, T] rows of the pretraining corpus's train split (the base model's data)."""
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  q = config.qsun
  batch = next(iter(data_lib.lm_batches(config.pretrain.corpus, tokenizer,
                                        seq_len=q.calib_seq_len,
                                        batch_size=q.calib_sequences, seed=1234,
                                        data_dir=data_dir)))
  return jnp.asarray(batch["tokens"], jnp.int32)


def decode_step_seconds(split: jaxsun.SplitModel, vocab: int, *, batch: int = 8,
                        prompt: int = 16, new_tokens: int = 32, repeats: int = 3) -> float:
  """Seconds per decode step of `split` (greedy generation of a batch, compiled once,
  best of `repeats`; the prefill is timed apart and subtracted)."""
  tokens = jax.random.randint(jax.random.key(0), (batch, prompt), 0, vocab, jnp.int32)

  def timed(n):
    out = jaxsun.generate(split, tokens, max_new_tokens=n)
    jax.block_until_ready(out.tokens)
    best = math.inf
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(jaxsun.generate(split, tokens, max_new_tokens=n).tokens)
      best = min(best, time.perf_counter() - t0)
    return best
  return (timed(new_tokens + 1) - timed(1)) / new_tokens


def summarize(per_seed: dict) -> dict:
  out = {}
  for task, rows in per_seed.items():
    out[task] = {}
    for key in rows[0]:
      if key.endswith("_accuracy") or key.endswith("_loss"):
        out[task][key] = fs.mean_std([r[key] for r in rows])
  return out


def format_table(results: dict) -> str:
  variants = ["sun"] + [f"qsun:{v}" for v in results["variants"]] + [
      f"qsun_qa:{v}" for v in results["qa_variants"]]
  lines = ["| task | decode tree | prefill tree | exact match (test) | / SUN | answer loss |",
           "|---|---|---|---|---|---|"]
  for task, s in results["summary"].items():
    sun = s["sun_accuracy"]["mean"]
    for v in variants:
      acc, loss = s.get(f"{v}_accuracy"), s.get(f"{v}_loss")
      if acc is None:
        continue
      tree = "float" if v == "sun" else v.split(":", 1)[1]
      prefill = "QA-tuned" if v.startswith("qsun_qa") else "SUN"
      ratio = acc["mean"] / sun if sun > 0 else float("nan")
      lines.append(f"| {task} | {tree} | {prefill} | {acc['mean']:.3f} ± {acc['std']:.3f} | "
                   f"{ratio:.2f} | {loss['mean']:.3f} ± {loss['std']:.3f} |")
  lines += ["", f"mean ± std over {len(results['config']['seeds'])} fine-tuning seeds; "
            "one base model; QA-tuned = prefill tree fine-tuned against that quantized "
            "decode tree", "", "| decode tree | dense-weight bytes / step | "
            "decode step (ms, batch 8) | bytes vs float | step time vs float |",
            "|---|---|---|---|---|"]
  dec = results["decode"]
  for v, d in dec.items():
    lines.append(f"| {v} | {d['bytes']:,} | {1e3 * d['step_s']:.2f} | "
                 f"{d['bytes'] / dec['float']['bytes']:.3f} | "
                 f"{d['step_s'] / dec['float']['step_s']:.2f} |")
  lines.append(f"\nstep times on {results['backend']} ({results['devices'][0]}): "
               "on a CPU the integer layers dequantize before a float dot, so the bytes "
               "column is what a memory-bound GPU decode step would gain, not this "
               "machine's times.")
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> pathlib.Path:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  variants = ["sun"] + [f"qsun:{v}" for v in results["variants"]] + [
      f"qsun_qa:{v}" for v in results["qa_variants"]]
  tasks = list(results["summary"])
  fig, ax = plt.subplots(figsize=(2 + 1.6 * len(variants), 3.6))
  width = 0.8 / len(tasks)
  for j, task in enumerate(tasks):
    s = results["summary"][task]
    m = [s[f"{v}_accuracy"]["mean"] for v in variants]
    e = [s[f"{v}_accuracy"]["std"] for v in variants]
    ax.bar(np.arange(len(variants)) + j * width, m, width, yerr=e, capsize=3, label=task)
  ax.set_xticks(np.arange(len(variants)) + width * (len(tasks) - 1) / 2)
  ax.set_xticklabels([v.replace("qsun_qa:", "QA ").replace("qsun:", "") for v in variants],
                     rotation=20, fontsize=8)
  ax.set_ylabel("exact match (test)")
  ax.set_title("SUN vs QSUN (quantized shared decode tree)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def run(config, workdir: str | os.PathLike) -> dict:
  """Runs the QSUN study; returns (and writes) results.json's contents."""
  sw = common.Stopwatch()
  workdir = common.prepare_workdir(workdir)
  parts = check_config(config)
  data_dir = config.data_dir or str(workdir / "tfds")
  tokenizer = parts["tokenizer"]
  base, base_summary = fs.base_model(config, parts, workdir, data_dir)
  calib = calibration_tokens(config, tokenizer, data_dir)
  q = config.qsun
  decoders, reports = {}, {}
  for v in q.variants:
    method, scheme = parse_variant(v)
    decoders[v], rep = qsun.shared_decode(base, [(qsun.ALL_LINEARS, scheme)], method=method,
                                          calib_tokens=calib)
    reports[v] = {"seconds": rep["seconds"], "weight_rel_error": float(np.mean(
        [e["weight_rel_error"] for e in rep["layers"].values()]))}
    print(f"qsun: shared decode tree {v}: mean relative weight error "
          f"{reports[v]['weight_rel_error']:.4f}", flush=True)
  decode = {"float": {"bytes": qsun.weight_bytes(base.decode_module())["total"],
                      "step_s": decode_step_seconds(base, parts["model"].vocab_size)}}
  for v, dec in decoders.items():
    decode[v] = {"bytes": qsun.weight_bytes(dec)["total"],
                 "step_s": decode_step_seconds(qsun.attach(base, dec),
                                               parts["model"].vocab_size)}
  fc, ec = config.finetune, config.eval
  per_seed = {}
  results = {"job": "qsun", "config": common.to_dict(config), "base": base_summary,
             "variants": list(q.variants), "qa_variants": list(q.qa_variants),
             "quantization": reports, "decode": decode, "per_seed": per_seed,
             "jax": jax.__version__, "backend": jax.default_backend(),
             "devices": [str(d) for d in jax.devices()]}
  for task in parts["tasks"]:
    tname = fs.task_name(task)
    seq_len = ft.task_seq_len(task, tokenizer, fc.seq_len)
    lr = float(config.lr[tname])
    per_seed[tname] = []

    def evaluate(split):
      return ft.evaluate_task_model(split, task, tokenizer, split_name="test",
                                    items=ec.test_items, loss_items=ec.test_items,
                                    batch_size=ec.batch_size, seq_len=seq_len,
                                    data_dir=data_dir)

    def fit(start, seed, name):
      identity = {"finetune": common.to_dict(fc), "task": tname, "learning_rate": lr,
                  "seed": seed, "model": common.to_dict(config.model), "name": name}
      split, _ = ft.fit_task_model(start, task, "prefill", tokenizer, steps=fc.steps,
                                   batch_size=fc.batch_size, seq_len=seq_len,
                                   optimizer=ft.with_learning_rate(fc.optimizer, lr),
                                   lora_cfg=None, seed=seed, workdir=workdir,
                                   name=f"{name}/{tname}/seed{seed}", identity=identity,
                                   data_dir=data_dir, log_every=fc.log_every)
      return split

    for seed in config.seeds:
      row = {"seed": seed}
      sun = fit(base, seed, "sun")
      for v, split in [("sun", sun)] + [(f"qsun:{v}", qsun.attach(sun, decoders[v]))
                                        for v in q.variants]:
        ev = evaluate(split)
        row[f"{v}_accuracy"], row[f"{v}_loss"] = ev["accuracy"], ev["loss"]
      for v in q.qa_variants:
        qa = fit(qsun.qa_base(base, decoders[v]), seed, f"qsun_qa_{v.replace(':', '_')}")
        ev = evaluate(qa)
        row[f"qsun_qa:{v}_accuracy"], row[f"qsun_qa:{v}_loss"] = ev["accuracy"], ev["loss"]
      per_seed[tname].append(row)
      print(f"  {tname} seed {seed}: " + ", ".join(
          f"{k[:-9]} {row[k]:.3f}" for k in row if k.endswith("_accuracy")), flush=True)
      results["summary"] = summarize(per_seed)
      results["wall_time_s"] = round(sw.elapsed(), 2)
      common.write_json_atomic(workdir / "results.json", results)
  table = format_table(results)
  results["plot"] = plot(results, workdir / "qsun.png").name
  common.write_json_atomic(workdir / "results.json", results)
  common.write_bytes_atomic(workdir / "table.md", (table + "\n").encode())
  print(table)
  return results
