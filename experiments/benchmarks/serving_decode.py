"""Decode throughput of the serving engine's decode worker against an on-device loop.

    python -m experiments.benchmarks.serving_decode            # 0.8M-parameter model, 8 slots
    python -m experiments.benchmarks.serving_decode --tiny     # seconds, for the tests

Same model, same prefilled rows, greedy, every row generating `new_tokens`:
  * `on_device_loop`: `jaxsun.generation.decode_slots` for all steps in one call (no host
    round trip at all; the bound quoted in issue 11), from `generate`'s own state;
  * `engine_on_device`: the same through `Engine.generate` on the engine's slotted store
    (inserted prefixes);
  * `decode_worker`: the real `DecodeWorker` loop: admit, dispatch a chunk of `chunk`
    steps, read the previous chunk while this one runs, emit tokens to a sink, free rows.
Also reports each decode step's bytes (weights + valid KV read) against the device's
measured copy bandwidth. Writes JSON + markdown; imports jax and jaxsun only (runs on
the GPU machines).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxsun
from experiments.benchmarks import common
from jaxsun import generation
from jaxsun.serving.engine import Engine, Params
from jaxsun.serving.request import Request, RequestRecord, SamplingParams
from jaxsun.serving.transfer import KVTransfer
from jaxsun.serving.workers import DecodeWorker, Job

MODEL = dict(vocab_size=259, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
             max_len=512)
TINY_MODEL = dict(vocab_size=259, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                  max_len=64)


class _Sink:
  def __init__(self):
    self.tokens, self.finished = 0, 0

  def on_token(self, job, token, index, now):
    self.tokens += 1

  def on_finished(self, job, reason, now):
    self.finished += 1

  def on_retry(self, job, why):
    raise RuntimeError(why)


def run(model: dict, *, slots: int, prompt_len: int, new_tokens: int, chunk: int,
        trials: int) -> dict:
  cfg = jaxsun.ModelConfig(name="bench", init_std=0.1, **model)
  split = jaxsun.SplitModel.from_model(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
  capacity = prompt_len + new_tokens
  eng = Engine(cfg, slots=slots, capacity=capacity, chunk=chunk)
  pre, dec = Params.prefill_of(split), Params.decode_of(split)
  rng = np.random.default_rng(1)
  prompts = [tuple(int(t) for t in rng.integers(0, cfg.vocab_size, prompt_len))
             for _ in range(slots)]
  sampling = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
  prefixes = [eng.prefill(pre, p, sampling=sampling)[0] for p in prompts]
  steps = new_tokens - 1  # the first token comes from prefill

  def filled_state():
    ds = eng.init_decode_state()
    for i, p in enumerate(prefixes):
      ds = eng.insert(p, ds, i, sampling=sampling, valid_producers={pre.tree_id})
    return jax.block_until_ready(ds)

  def on_device_loop():
    cache = split.prefill_module().init_cache(slots, capacity)
    logits, cache = generation.prefill(split, jnp.asarray(prompts),
                                       jnp.full((slots,), prompt_len, jnp.int32), cache)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    ds = generation.slot_state(tok, cache, steps=steps, sampling=generation.SamplingConfig(),
                               key=None, eos_id=None)
    _, chunk = generation.decode_slots(split, ds, jnp.asarray(steps, jnp.int32), size=steps,
                                       kv_len=capacity, pad_id=0)
    out = np.asarray(chunk.tokens)
    return time.perf_counter() - t0, out

  def engine_on_device():
    ds = filled_state()
    t0 = time.perf_counter()
    big = Engine(cfg, slots=slots, capacity=capacity, chunk=steps)
    ds, ch = big.generate(dec, ds, max_live_length=capacity)
    out = np.asarray(ch.tokens)
    return time.perf_counter() - t0, out

  def decode_worker():
    sink = _Sink()
    w = DecodeWorker("bench", eng, dec, valid_producers={pre.tree_id}, models={"m"},
                     transfer=KVTransfer(), sink=sink)
    transfer = KVTransfer()
    for p in prefixes:
      rec = RequestRecord(request_id="", model="m", prompt_len=prompt_len, arrival=0.0)
      job = Job(request=Request(model="m", prompt=p.tokens + (0,), sampling=sampling),
                record=rec, eos_id=None, produced=1)
      w.submit(job, transfer.send(p))
    w._admit()  # admission (digest checks, inserts) is not decode time
    jax.block_until_ready(w.state)
    t0 = time.perf_counter()
    while w.slot_jobs or w.pending:
      w.run_once()
    dt = time.perf_counter() - t0
    assert sink.tokens == slots * steps and sink.finished == slots, (sink.tokens, sink.finished)
    return dt, None

  paths = {name: fn for name, fn in (("on_device_loop", on_device_loop), ("engine_on_device", engine_on_device),
                   ("decode_worker", decode_worker))}
  all_times, outs = common.interleaved_trials(paths, trials)
  results = {}
  for name, times in all_times.items():
    t = statistics.median(times)
    results[name] = {"seconds": t, "tokens_per_s": slots * steps / t,
                     "trials_s": [round(x, 6) for x in times]}
  bound = results["on_device_loop"]["tokens_per_s"]
  for r in results.values():
    r["ratio_to_on_device_loop"] = r["tokens_per_s"] / bound
  same = bool((outs["on_device_loop"] == outs["engine_on_device"][:, :steps]).all())

  bw = common.copy_bandwidth(64 << 20 if cfg.d_model < 64 else 256 << 20, trials=5) * 1e9
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(split.prefill))
  kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * cfg.dtype.itemsize
  mean_valid = prompt_len + steps / 2  # average valid KV length over the run
  step_bytes = weight_bytes + slots * mean_valid * kv_per_token
  step_s = results["decode_worker"]["seconds"] / steps
  return common.environment(
      benchmark="serving_decode", model={**model, "num_params": cfg.num_params()},
      slots=slots, prompt_len=prompt_len, new_tokens=new_tokens, chunk=chunk,
      results=results, engine_equals_generation_tokens=same,
      roofline={"copy_bandwidth_bytes_per_s": bw, "weight_bytes": weight_bytes,
                "kv_bytes_per_token": kv_per_token, "bytes_per_step": step_bytes,
                "decode_worker_step_s": step_s,
                "fraction_of_copy_bandwidth": step_bytes / step_s / bw})


def markdown(result: dict) -> str:
  r = result["roofline"]
  lines = [f"# serving decode throughput ({result['machine']['device_kind']}, "
           f"{result['model']['num_params']:,} parameters, {result['slots']} slots, "
           f"{result['new_tokens']} new tokens, chunk {result['chunk']})", "",
           "| path | tokens/s | ratio to on-device loop |", "| --- | --- | --- |"]
  for name, x in result["results"].items():
    lines.append(f"| {name} | {x['tokens_per_s']:,.0f} | {x['ratio_to_on_device_loop']:.3f} |")
  lines += ["", f"engine tokens equal the generation loop's: "
            f"{result['engine_equals_generation_tokens']}", "",
            f"decode step: {r['bytes_per_step'] / 1e6:.2f} MB read (weights "
            f"{r['weight_bytes'] / 1e6:.2f} MB + valid KV) in {r['decode_worker_step_s'] * 1e3:.3f}"
            f" ms = {r['fraction_of_copy_bandwidth']:.3f} of the measured copy bandwidth "
            f"({r['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)", ""]
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="a tiny model, a few tokens (tests)")
  ap.add_argument("--trials", type=int, default=9)
  ap.add_argument("--chunk", type=int, default=16)
  ap.add_argument("--out", default=str(common.RESULTS), help="folder for JSON and markdown")
  args = ap.parse_args(argv)
  if args.tiny:
    result = run(TINY_MODEL, slots=2, prompt_len=4, new_tokens=9, chunk=4, trials=1)
  else:
    result = run(MODEL, slots=8, prompt_len=16, new_tokens=256, chunk=args.chunk,
                 trials=args.trials)
  print(markdown(result))
  common.write_results(result, markdown(result), name="serving_decode", tiny=args.tiny,
                       out=args.out)
  return result


if __name__ == "__main__":
  main()
