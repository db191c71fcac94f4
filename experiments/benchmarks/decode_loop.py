"""Decode throughput: `generate`'s on-device chunks vs one on-device loop vs a host loop.

    python -m experiments.benchmarks.decode_loop            # 0.8M-parameter model, batch 8
    python -m experiments.benchmarks.decode_loop --tiny     # seconds, for the tests

Three ways to run the same greedy decode steps from the same prefilled cache:
  * `host_loop`: one jitted `decode_step` per token with a host sync per token (what
    `generate` did before on-device chunks);
  * `generate_chunks`: `jaxsun.generation.decode_loop`, the path `generate`, the
    shared-module paths and the serving engine use (chunks of up to `DECODE_CHUNK` steps
    in a `lax.while_loop`, the next chunk dispatched before the previous one is read);
  * `on_device`: all steps in one `decode_slots` call (no host sync at all), the bound.
Writes JSON + markdown with tokens/s and the ratios to `on_device`, measured in one run.
Imports jax and jaxsun's model only (runs on the GPU machines).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxsun
from jaxsun import generation
from experiments.benchmarks import common

MODEL = dict(vocab_size=259, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
             max_len=512)
TINY_MODEL = dict(vocab_size=259, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                  max_len=64)


def run(model: dict, *, batch: int, prompt_len: int, new_tokens: int, trials: int) -> dict:
  cfg = jaxsun.ModelConfig(name="bench", init_std=0.1, **model)
  split = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, cfg.vocab_size)
  lengths = jnp.full((batch,), prompt_len, jnp.int32)
  greedy = generation.SamplingConfig()
  steps = new_tokens - 1  # the first token comes from prefill

  def prefilled():
    cache = split.prefill_module().init_cache(batch, prompt_len + new_tokens)
    logits, cache = generation.prefill(split, prompts, lengths, cache)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache

  def host_loop():
    tok, cache = prefilled()
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    out = []
    for _ in range(steps):
      tok, _, cache = generation.decode_step(split, tok, cache, None, greedy)
      out.append(int(tok[0]))  # the host sync per token
    return time.perf_counter() - t0, None

  def generate_chunks():
    tok, cache = prefilled()
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    res = generation.decode_loop(split, tok, cache, max_new_tokens=new_tokens,
                                 sampling=greedy, key=None, eos_id=None, pad_id=0)
    jax.block_until_ready(res.tokens)
    return time.perf_counter() - t0, res.tokens[:, 1:]

  def on_device():
    tok, cache = prefilled()
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    ds = generation.slot_state(tok, cache, steps=steps, sampling=greedy, key=None,
                               eos_id=None)
    _, chunk = generation.decode_slots(split, ds, jnp.asarray(steps, jnp.int32), size=steps,
                                       kv_len=prompt_len + new_tokens, pad_id=0)
    out = jax.block_until_ready(chunk.tokens)
    return time.perf_counter() - t0, out

  paths = {name: fn for name, fn in (("host_loop", host_loop), ("generate_chunks", generate_chunks),
                   ("on_device", on_device))}
  all_times, outputs = common.interleaved_trials(paths, trials)
  results = {}
  for name, times in all_times.items():
    t = statistics.median(times)
    results[name] = {"seconds": t, "tokens_per_s": batch * steps / t,
                     "trials_s": [round(x, 6) for x in times]}
  bound = results["on_device"]["tokens_per_s"]
  for r in results.values():
    r["ratio_to_on_device"] = r["tokens_per_s"] / bound
  same = bool((outputs["generate_chunks"] == outputs["on_device"]).all())
  return common.environment(
      benchmark="decode_loop", model={**model, "num_params": cfg.num_params()},
      batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
      decode_chunk=generation.DECODE_CHUNK, results=results,
      chunks_equal_on_device_tokens=same)


def markdown(result: dict) -> str:
  lines = [f"# decode throughput ({result['machine']['device_kind']}, "
           f"{result['model']['num_params']:,} parameters, batch {result['batch']}, "
           f"{result['new_tokens']} new tokens)", "",
           "| path | tokens/s | ratio to on-device loop |", "| --- | --- | --- |"]
  for name, r in result["results"].items():
    lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['ratio_to_on_device']:.3f} |")
  lines += ["", f"generate's chunks and the single on-device loop give the same tokens: "
            f"{result['chunks_equal_on_device_tokens']}", ""]
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="a tiny model, a few tokens (tests)")
  ap.add_argument("--trials", type=int, default=9)
  ap.add_argument("--out", default=str(common.RESULTS), help="folder for JSON and markdown")
  args = ap.parse_args(argv)
  if args.tiny:
    result = run(TINY_MODEL, batch=2, prompt_len=4, new_tokens=8, trials=1)
  else:
    result = run(MODEL, batch=8, prompt_len=16, new_tokens=128, trials=args.trials)
  print(markdown(result))
  common.write_results(result, markdown(result), name="decode_loop", tiny=args.tiny,
                       out=args.out)
  return result


if __name__ == "__main__":
  main()
