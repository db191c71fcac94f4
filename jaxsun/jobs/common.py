"""Pieces the jobs share: workdirs, atomic files, configs to dataclasses, the reproduce
command and resumable results of the studies, exact match."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np

import jaxsun
from jaxsun.train.optim import OptimizerConfig


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates `workdir` and checks that it can be written, before any work starts."""
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"workdir {str(workdir)!r} cannot be written: {e}") from None
  return workdir


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` via a temporary file and a rename: readers never see half a file."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON atomically (`write_bytes_atomic`)."""
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def to_dict(config) -> dict:
  """A ConfigDict (or a plain mapping) as a JSON-able dict."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d, default=str))


def flatten(d: Mapping, prefix: str = "") -> dict:
  """A nested mapping as {"a.b.c": leaf}: the keys `--config.a.b.c=...` overrides name."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def command_line(config, workdir, config_file: str, template) -> str:
  """The launch command reproducing `config`: `config_file:variant` plus one
  `--config.key=value` per leaf that differs from `template` (the variant's defaults)."""
  variant = config.get("variant", "tiny")
  base = flatten(to_dict(template))
  args = [f"--config={config_file}:{variant}", f"--workdir={workdir}"]
  for k, v in flatten(to_dict(config)).items():
    if base.get(k, object()) != v:
      v = tuple(v) if isinstance(v, list) else v
      args.append(f"--config.{k}={v!r}" if isinstance(v, (str, tuple)) else
                  f"--config.{k}={v}")
  return "python -m experiments.launch " + " ".join(shlex.quote(a) for a in args)


def write_command(workdir: pathlib.Path, command: str, footer: str) -> None:
  """COMMAND.md: the reproduce command, this process's argv and a line on time/machine."""
  text = ["# Reproduce", "", "```", command, "```", "",
          f"argv of this run: `{' '.join(sys.argv)}`", "", footer, ""]
  write_bytes_atomic(pathlib.Path(workdir) / "COMMAND.md", "\n".join(text).encode())


def load_previous(path: pathlib.Path, ident: Mapping, job: str) -> dict:
  """An earlier results.json written with the same `identity` (the settings its finished
  runs depend on), so a study resumes where it stopped; {} if absent, unreadable, or
  written with other settings."""
  if not path.exists():
    return {}
  try:
    prev = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return {}
  if prev.get("identity") != json.loads(json.dumps(ident)):
    print(f"{job}: results.json was written with other settings: starting over",
          flush=True)
    return {}
  return prev


def model_config(model_cfg, vocab_size: int, name: str) -> jaxsun.ModelConfig:
  """`jaxsun.ModelConfig` from a config section (a preset name plus field overrides)."""
  fields = to_dict(model_cfg)
  preset = fields.pop("preset", None)
  fields["vocab_size"] = vocab_size
  try:
    if preset:  # keeps the preset's name (`preset`'s first argument is that name)
      return jaxsun.ModelConfig.preset(preset, **fields)
    return jaxsun.ModelConfig(name=name, **fields)
  except TypeError as e:  # an unknown field
    raise ValueError(f"config.model: {e}") from None


def optimizer_config(opt_cfg) -> OptimizerConfig:
  try:
    return OptimizerConfig(**to_dict(opt_cfg))
  except TypeError as e:
    raise ValueError(f"config optimizer section: {e}") from None


class Stopwatch:
  """Wall time since construction, and named laps."""

  def __init__(self):
    self.t0 = time.perf_counter()
    self.laps: dict[str, float] = {}

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def lap(self, name: str, seconds: float) -> None:
    self.laps[name] = round(self.laps.get(name, 0.0) + seconds, 3)


def exact_match_eval(split: jaxsun.SplitModel, prompts: Sequence[Sequence[int]],
                     answers: Sequence[str], tokenizer, *, batch_size: int,
                     max_new_tokens: int, exact_match) -> dict:
  """Greedy generation through the split, scored by exact match of the decoded text.

  Prompts are padded to one length and the last batch is filled up, so one compiled
  prefill and one decode step serve the whole set.

  Args:
    split: the model (prefill tree reads the prompt, decode tree writes the answer).
    prompts: token lists (BOS included).
    answers: the reference answer strings.
    tokenizer: decodes generated ids (generation stops at `tokenizer.eos_id`).
    batch_size: rows per generate call.
    max_new_tokens: generation budget per row (answer tokens + EOS).
    exact_match: `(prediction, answer) -> bool`.

  Returns:
    {"accuracy", "items", "correct", "examples": the first few (prompt, answer, output)}.
  """
  if len(prompts) != len(answers) or not prompts:
    raise ValueError(f"need as many prompts as answers (> 0), got {len(prompts)} and "
                     f"{len(answers)}")
  width = max(len(p) for p in prompts)
  cfg = split.cfg
  max_new_tokens = min(max_new_tokens, cfg.max_len - width)
  if max_new_tokens < 1:
    raise ValueError(f"prompts of {width} tokens leave no room to generate within "
                     f"ModelConfig.max_len={cfg.max_len}")
  outputs: list[str] = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)  # fixed shapes: one compilation
    toks = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    for i, p in enumerate(chunk):
      toks[i, :len(p)] = p
    lengths = np.array([len(p) for p in chunk], np.int32)
    out = jaxsun.generate(split, toks, lengths, max_new_tokens=max_new_tokens,
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    gen, glen = np.asarray(out.tokens), np.asarray(out.lengths)
    for i in range(n):
      ids = [int(t) for t in gen[i, :glen[i]] if t != tokenizer.eos_id]
      outputs.append(tokenizer.decode(ids))
  hits = [bool(exact_match(o, a)) for o, a in zip(outputs, answers)]
  return {"accuracy": float(np.mean(hits)), "items": len(hits), "correct": int(sum(hits)),
          "examples": [{"answer": a, "output": o} for o, a in list(zip(outputs, answers))[:3]]}
