"""The attention-variant pretraining study: the `pretrain_attention` job.

    python -m experiments.launch --config=configs/pretrain_attention.py:tiny --workdir=/tmp/a

For every attention kind x seed (`configs/pretrain_attention.py`) a tied decoder is
pretrained from scratch on the same packed batches (the data order depends on the seed
only, so kinds see identical data), optionally distilled from a teacher
(`jaxsun.train.Trainer(teacher=...)`); every step's loss and gradient norm are logged.
Each run is then measured (`measure_run`): final train loss, validation loss and
perplexity, gradient-norm variance and loss spikes (`jaxsun.analysis.stability`), and
attention statistics of validation sequences (`jaxsun.analysis.attention_stats`, one
layer at a time). `aggregate` gives mean +- std over seeds per kind; `write_report`
writes results.json, results.md and the plots.

Positive controls (`config.controls`, `Control`): configurations expected to differ from
the softmax baseline by a modest, known margin (e.g. softmax with half the layers),
trained and measured for every seed exactly like a kind (same batches in the same order).
`instrument_check` compares their difference from softmax with the seed noise: if the
control's difference exceeds 2 standard errors the instrument resolves a difference of
that size, and the kinds' differences read against it.

Layout of the workdir:

    checkpoints/<kind>_s<seed>/   the run's checkpoint (a teacher for a later study);
                                  a control's runs are <control name>_s<seed>
    logs/<kind>_s<seed>/          metrics.jsonl (every step) and TensorBoard events
    runs/<kind>_s<seed>.json      the run's measurements (a rerun reuses them)
    runs/<kind>_s<seed>.npz       its loss / grad-norm series, query masses, a map
    results.json, results.md, *.png

The functions are importable (a notebook calls `run_study` or the pieces).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

import jaxsun
from jaxsun import analysis
from jaxsun.config import AffineConfig, ModelConfig, RopeScaling
from jaxsun.jobs import common
from jaxsun.jobs import finetune as ft
from jaxsun.train import metrics as metrics_lib
from jaxsun.train.checkpoints import Checkpointer
from jaxsun.train.progress import Progress
from jaxsun.train.trainer import TrainConfig, Trainer, evaluate_loss

JOB = "pretrain_attention"
KINDS = ("softmax", "off_by_one", "sink", "gated", "affine", "affine_gated")
SCALARS = ("final_train_loss", "validation_loss", "validation_perplexity",
           "grad_norm_variance", "grad_norm_mean", "spikes_k6", "spikes_k9",
           "entropy_mean", "first_token_mass_mean", "first_token_share_mean",
           "query_mass_mean_mean", "query_mass_std_mean", "head_diversity_jsd_mean")

# The paper's numbers (papers.md §2.4, [P]) at ITS scales: 0.5B/1B/3B students distilled
# on 20B FineWeb-Edu tokens. For reference only; not comparable in absolute value with a
# small model on the shipped corpus.
PAPER_REFERENCE = {
    "source": "Affine-Scaled Attention (arXiv 2602.23057), Tables 1, 2, 4, 5 - the "
              "paper's numbers at its scales (0.5B/1B/3B students, KD, 20B FineWeb-Edu "
              "tokens, seq 2048); NOT measured here and not comparable in absolute value",
    "kind_names": {"softmax": "Baseline", "sink": "Sink", "affine": "Affine",
                   "gated": "Gated", "affine_gated": "Affine + Gated",
                   "off_by_one": "(not in the paper's tables)"},
    "final_train_loss": {
        "0.5B": {"softmax": 2.82, "sink": 2.83, "affine": 2.82},
        "1B": {"softmax": 2.73, "sink": 2.73, "affine": 2.72, "gated": 2.71,
               "affine_gated": 2.71},
        "3B": {"softmax": 2.65, "sink": 2.65, "affine": 2.64, "gated": 2.65,
               "affine_gated": 2.63}},
    "c4_perplexity": {
        "0.5B": {"softmax": 71.7, "sink": 81.5, "affine": 70.6},
        "1B": {"softmax": 61.9, "sink": 68.3, "affine": 58.9, "gated": 56.6,
               "affine_gated": 56.2},
        "3B": {"softmax": 44.9, "sink": 48.5, "affine": 40.8, "gated": 44.6,
               "affine_gated": 42.7}},
    "grad_norm_variance_steps_0_500": {
        "0.5B": {"softmax": 0.257, "sink": 0.259, "affine": 0.203},
        "1B": {"softmax": 3.934, "sink": 3.951, "affine": 2.897}},
    "spikes_k9_steps_0_500": {"0.5B": {"softmax": 30, "sink": 31, "affine": 22},
                              "1B": {"softmax": 28, "sink": 35, "affine": 27}},
    "spikes_k6_steps_0_500": {"0.5B": {"softmax": 40, "sink": 44, "affine": 42},
                              "1B": {"softmax": 53, "sink": 67, "affine": 54}},
    "delta_params_millions": {"0.5B": {"affine": 0.4}, "1B": {"affine": 1.0, "gated": 67.1,
                                                             "affine_gated": 68.2},
                              "3B": {"affine": 2.1, "gated": 264.2, "affine_gated": 266.3}},
}


# ----------------------------------------------------------------------------- config


def run_name(kind: str, seed: int) -> str:
  """`<kind>_s<seed>`; a control's runs are `<control name>_s<seed>`."""
  return f"{kind}_s{int(seed)}"


# ModelConfig fields a control may not override: the kind sets `attention`.
_CONTROL_FIXED_FIELDS = ("attention",)
# Train overrides a control may set (as "train.<key>"): anything else would change the
# data (seq_len, batch_size) or the measurements (final_window, eval_batches).
_CONTROL_TRAIN_KEYS = ("steps",)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclasses.dataclass(frozen=True)
class Control:
  """One entry of `config.controls`: `(name, kind, overrides)`.

  A positive control: the attention `kind` with `overrides` of `config.model` (keys of
  `ModelConfig`; a mapping value such as `affine` is merged into the section's) and,
  as "train.steps" / "train.optimizer.<field>", of `config.train`. Trained for every
  seed on the same batches as the kinds; its runs are `<name>_s<seed>`.
  """

  name: str
  kind: str
  overrides: Mapping[str, Any]

  @property
  def model_overrides(self) -> dict:
    return {k: v for k, v in self.overrides.items() if not k.startswith("train.")}

  @property
  def train_overrides(self) -> dict:
    """{"steps": ..., "optimizer.learning_rate": ...} (without the "train." prefix)."""
    return {k[len("train."):]: v for k, v in self.overrides.items()
            if k.startswith("train.")}

  def describe(self) -> str:
    """E.g. "softmax with n_layers=2"."""
    return f"{self.kind} with " + ", ".join(
        f"{k}={v!r}" for k, v in self.overrides.items()) if self.overrides else self.kind


def controls(config) -> tuple[Control, ...]:
  """`config.controls` as `Control`s (() when the config has none). Checks the shape of
  each entry; `check_config` checks the rest."""
  raw = config.get("controls", ()) or ()
  if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
    raise ValueError(f"config.controls={raw!r} must be a tuple of (name, kind, "
                     "overrides) entries")
  out = []
  for i, entry in enumerate(raw):
    if (isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence)
        or len(entry) != 3 or not isinstance(entry[0], str)
        or not isinstance(entry[1], str) or not isinstance(entry[2], Mapping)):
      raise ValueError(f"config.controls[{i}]={entry!r} must be a (name, kind, overrides)"
                       " triple: two strings and a dict of ModelConfig field overrides")
    out.append(Control(entry[0], entry[1], dict(entry[2])))
  return tuple(out)


def check_controls(config) -> tuple[Control, ...]:
  """Refuses a `config.controls` entry the study cannot run, naming `config.controls`."""
  from jaxsun.nn import attention  # pylint: disable=g-import-not-at-top
  ctrls = controls(config)
  kinds, seeds = tuple(config.kinds), tuple(config.seeds)
  model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
  opt_fields = set(common.to_dict(config.train.optimizer))
  seen = set(kinds)
  for i, c in enumerate(ctrls):
    where = f"config.controls[{i}] ({c.name!r})"
    if not c.name or not set(c.name) <= _NAME_CHARS:
      raise ValueError(f"{where}: the name must be non-empty letters, digits, '_', '.' "
                       "or '-' (it names the runs' directories)")
    if c.name in kinds:
      raise ValueError(f"{where}: the name collides with the attention kind {c.name!r} "
                       "of config.kinds; give the control its own name")
    if c.name in seen:
      raise ValueError(f"{where}: the name is used twice in config.controls")
    seen.add(c.name)
    if c.kind not in attention.ATTENTION_KINDS:
      raise ValueError(f"{where}: unknown attention kind {c.kind!r}; registered: "
                       f"{sorted(attention.ATTENTION_KINDS)}")
    for key, value in c.overrides.items():
      if key.startswith("train."):
        sub = key[len("train."):]
        if sub.startswith("optimizer."):
          if sub[len("optimizer."):] not in opt_fields:
            raise ValueError(f"{where}: unknown optimizer field {key!r}; fields: "
                             f"{sorted(opt_fields)}")
        elif sub not in _CONTROL_TRAIN_KEYS:
          raise ValueError(f"{where}: {key!r} cannot be overridden (a control trains on "
                           "the same data and is measured the same way); allowed: "
                           f"{['train.' + k for k in _CONTROL_TRAIN_KEYS]} and "
                           "train.optimizer.<field>")
      elif key in _CONTROL_FIXED_FIELDS:
        raise ValueError(f"{where}: {key!r} is set by the control's kind, not overridden")
      elif key not in model_fields:
        raise ValueError(f"{where}: {key!r} is not a ModelConfig field (known: "
                         f"{sorted(model_fields - set(_CONTROL_FIXED_FIELDS))}) nor a "
                         "train.* override")
    # The values: build the control's ModelConfig (vocab 1 stands in for the tokenizer's)
    # and its optimizer.
    try:
      cfg = model_config(config.model, 1, c.kind, overrides=c.model_overrides)
      tsec = train_section(config, c)
      common.optimizer_config(tsec["optimizer"])
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: {e}") from None
    need = max(config.train.seq_len, config.analysis.length)
    if cfg.max_len < need:
      raise ValueError(f"{where}: max_len={cfg.max_len} is shorter than the sequences "
                       f"({need})")
    steps = tsec["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not (
        config.train.final_window <= steps):
      raise ValueError(f"{where}: train.steps={steps!r} must be an integer >= "
                       f"config.train.final_window={config.train.final_window}")
  names = [run_name(k, s) for k in kinds + tuple(c.name for c in ctrls) for s in seeds]
  if len(set(names)) != len(names):
    raise ValueError("config.controls: the run names "
                     f"{sorted({n for n in names if names.count(n) > 1})} repeat")
  return ctrls


def check_config(config) -> None:
  """Refuses a config the study cannot run, naming the field."""
  from jaxsun.nn import attention  # pylint: disable=g-import-not-at-top
  kinds = tuple(config.kinds)
  if not kinds or len(set(kinds)) != len(kinds):
    raise ValueError(f"config.kinds={kinds!r} must be non-empty, without repeats")
  unknown = [k for k in kinds if k not in attention.ATTENTION_KINDS]
  if unknown:
    raise ValueError(f"config.kinds has unknown attention kinds {unknown}; registered: "
                     f"{sorted(attention.ATTENTION_KINDS)}")
  seeds = tuple(config.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or not all(
      isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise ValueError(f"config.seeds={seeds!r} must be distinct integers (at least one)")
  tc = config.train
  if tc.final_window < 1 or tc.final_window > tc.steps:
    raise ValueError(f"config.train.final_window={tc.final_window} must be in [1, "
                     f"config.train.steps={tc.steps}]")
  if tc.progress_every < 1:
    raise ValueError(f"config.train.progress_every={tc.progress_every} must be >= 1")
  ac = config.analysis
  for name in ("sequences", "length", "spike_window", "map_len"):
    if ac[name] < 1:
      raise ValueError(f"config.analysis.{name}={ac[name]} must be >= 1")
  if not ac.spike_ks or not all(k > 0 for k in ac.spike_ks):
    raise ValueError(f"config.analysis.spike_ks={tuple(ac.spike_ks)} must be positive")
  if ac.detrend < 0 or ac.stability_start < 0 or ac.stability_stop < 0:
    raise ValueError("config.analysis.detrend, stability_start and stability_stop must "
                     "be >= 0")
  if ac.stability_stop and ac.stability_stop <= ac.stability_start:
    raise ValueError(f"config.analysis.stability_stop={ac.stability_stop} must exceed "
                     f"stability_start={ac.stability_start} (or be 0: to the end)")
  if ac.length > config.model.get("max_len", ac.length):
    raise ValueError(f"config.analysis.length={ac.length} exceeds config.model.max_len="
                     f"{config.model.max_len}")
  if len(config.data.sources) != len(config.data.weights):
    raise ValueError(f"config.data.sources ({len(config.data.sources)}) and "
                     f"config.data.weights ({len(config.data.weights)}) must have the "
                     "same length")
  w = config.distill.weight
  if not 0.0 <= w <= 1.0:
    raise ValueError(f"config.distill.weight={w} must be in [0, 1]")
  if not config.distill.temperature > 0:
    raise ValueError(f"config.distill.temperature={config.distill.temperature} must be > 0")
  tcfg = config.teacher
  if tcfg.workdir and tcfg.hf_path:
    raise ValueError("set one of config.teacher.workdir and config.teacher.hf_path, not both")
  if w > 0 and not (tcfg.workdir or tcfg.hf_path):
    raise ValueError(f"config.distill.weight={w} > 0 needs a teacher: set "
                     "config.teacher.workdir (a jaxsun workdir with a checkpoint) or "
                     "config.teacher.hf_path (a Hugging Face checkpoint directory)")
  check_controls(config)


def tokenizer_name(config) -> str:
  """`config.tokenizer`, or for "" the teacher's `<teacher.hf_path>/tokenizer.json`."""
  if config.tokenizer:
    return config.tokenizer
  if config.teacher.hf_path:
    return "file:" + os.path.join(config.teacher.hf_path, "tokenizer.json")
  raise ValueError("config.tokenizer is empty and there is no config.teacher.hf_path to "
                   "take the tokenizer from; set config.tokenizer (e.g. "
                   "file:/path/to/tokenizer.json)")


def model_config(model_section, tokenizer_vocab: int, kind: str,
                 overrides: Mapping[str, Any] | None = None) -> ModelConfig:
  """The `ModelConfig` of one run: the config's model section with `attention=kind`.

  Args:
    model_section: `config.model` (fields of `ModelConfig`, optionally `preset`;
      `affine` and `rope_scaling` as sub-sections; vocab_size 0: the preset's, else the
      tokenizer's).
    tokenizer_vocab: the tokenizer's vocabulary size; the model's must not be smaller.
    kind: the attention kind.
    overrides: a control's field overrides, applied on top of the section (a mapping
      value, e.g. `affine`, is merged into the section's mapping).
  """
  fields = common.to_dict(model_section)
  for key, value in common.to_dict(overrides or {}).items():
    if isinstance(value, Mapping) and isinstance(fields.get(key), Mapping):
      fields[key] = {**fields[key], **value}
    else:
      fields[key] = value
  preset = fields.pop("preset", None)
  if isinstance(fields.get("affine"), Mapping):
    fields["affine"] = AffineConfig(**fields["affine"])
  if isinstance(fields.get("rope_scaling"), Mapping):
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
  vocab = int(fields.pop("vocab_size", 0) or 0)
  fields["attention"] = kind
  try:
    if preset:
      if vocab:
        fields["vocab_size"] = vocab
      cfg = ModelConfig.preset(preset, **fields)
    else:
      cfg = ModelConfig(name=JOB, vocab_size=vocab or tokenizer_vocab, **fields)
  except TypeError as e:  # an unknown field
    raise ValueError(f"config.model: {e}") from None
  if cfg.vocab_size < tokenizer_vocab:
    raise ValueError(f"config.model vocab_size {cfg.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer_vocab}")
  return cfg


def model_config_to_dict(cfg: ModelConfig) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def model_config_from_dict(d: Mapping) -> ModelConfig:
  """Inverse of `model_config_to_dict`."""
  d = dict(d)
  if isinstance(d.get("affine"), Mapping):
    d["affine"] = AffineConfig(**d["affine"])
  if isinstance(d.get("rope_scaling"), Mapping):
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  return ModelConfig(**d)


def train_section(config, control: Control | None = None) -> dict:
  """`config.train` as a dict, with a control's "train.*" overrides applied."""
  tc = common.to_dict(config.train)
  if control is not None:
    for key, value in control.train_overrides.items():
      if key.startswith("optimizer."):
        tc["optimizer"][key[len("optimizer."):]] = value
      else:
        tc[key] = value
  return tc


def train_config(config, seed: int, control: Control | None = None) -> TrainConfig:
  tc = train_section(config, control)
  return TrainConfig(steps=tc["steps"], trainability="both",
                     optimizer=common.optimizer_config(tc["optimizer"]),
                     accum_steps=tc["accum_steps"], log_every=1,
                     checkpoint_every=tc["checkpoint_every"], seed=seed,
                     device_memory_gb=tc["device_memory_gb"],
                     distill_weight=float(config.distill.weight),
                     distill_temperature=float(config.distill.temperature))


# ----------------------------------------------------------------------------- teacher


def _strip_value(tree):
  """A restored nnx state dict with its {"value": array} leaves turned into arrays."""
  if isinstance(tree, Mapping):
    if set(tree.keys()) == {"value"} and not isinstance(tree["value"], Mapping):
      return tree["value"]
    return {k: _strip_value(v) for k, v in tree.items()}
  return tree


def load_teacher_from_workdir(workdir: str | os.PathLike, run: str = "",
                              step: int | None = None) -> tuple[jaxsun.SplitModel, dict]:
  """A teacher from a jaxsun workdir (`configs/lm.py`'s or this study's) checkpoint.

  The architecture comes from the run's `run.json` (this study records the full
  `ModelConfig`; the lm job its model section and tokenizer).

  Args:
    workdir: the workdir holding `checkpoints/<run>/`.
    run: the run's name ("pretrain" for the lm job, "<kind>_s<seed>" here); "" picks
      the only run, or "pretrain".
    step: the checkpoint step (default the latest).

  Returns:
    (the tied teacher split, info: workdir, run, step, tokenizer, model config).
  """
  root = pathlib.Path(workdir) / "checkpoints"
  if not root.is_dir():
    raise ValueError(f"config.teacher.workdir={str(workdir)!r} has no checkpoints/ "
                     "directory (a workdir of configs/lm.py or configs/pretrain_attention.py)")
  runs = sorted(p.name for p in root.iterdir() if (p / "steps").is_dir())
  if not run:
    if len(runs) == 1:
      run = runs[0]
    elif "pretrain" in runs:
      run = "pretrain"
    else:
      raise ValueError(f"{root} holds several runs {runs}; choose one with "
                       "config.teacher.run")
  if run not in runs:
    raise ValueError(f"config.teacher.run={run!r} is not among the runs in {root}: {runs}")
  identity = json.loads((root / run / "run.json").read_text())
  tokenizer = identity.get("tokenizer")
  if "model_config" in identity:
    cfg = model_config_from_dict(identity["model_config"])
  elif "model" in identity and tokenizer:
    from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
    cfg = common.model_config(identity["model"],
                              data_lib.get_tokenizer(tokenizer).vocab_size, "teacher")
  else:
    raise ValueError(f"{root / run / 'run.json'} does not describe the model")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with Checkpointer(root / run / "steps", async_save=False) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{root / run} holds no checkpoint")
    restored = ckpt._manager.restore(  # pylint: disable=protected-access
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  params = _strip_value(restored.state["params"])
  if "prefill" not in params:
    raise ValueError(f"the checkpoint in {root / run} has no prefill tree")
  graphdef = nnx.graphdef(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))

  def fill(tree):
    """A fresh teacher state with every array taken from the restored `tree`."""
    state = nnx.state(jaxsun.Decoder(cfg, rngs=nnx.Rngs(0)))
    want = dict(nnx.to_flat_state(state))
    got = {tuple(map(str, kp)): v for kp, v in traversals.flatten_mapping(tree).items()}
    missing = sorted("/".join(map(str, k)) for k in want if tuple(map(str, k)) not in got)
    if missing:
      raise ValueError(f"the checkpoint in {root / run} lacks {missing[:5]} of the "
                       f"teacher's {len(want)} arrays")
    for k, v in want.items():
      shape = tuple(np.shape(got[tuple(map(str, k))]))
      if shape != tuple(np.shape(v.get_value())):
        raise ValueError(f"teacher array {'/'.join(map(str, k))} has shape {shape} in "
                         f"the checkpoint, {tuple(np.shape(v.get_value()))} in the model")
    nnx.replace_by_pure_dict(state, tree)
    return state

  prefill = fill(params["prefill"])
  split = jaxsun.SplitModel(graphdef=graphdef, prefill=prefill)
  if "decode" in params:  # an untied run
    split = split.replace(decode=fill(params["decode"]))
  info = {"workdir": str(workdir), "run": run, "step": int(step), "tokenizer": tokenizer,
          "model_config": model_config_to_dict(cfg)}
  return split, info


def load_teacher(config, tokenizer_vocab: int) -> tuple[jaxsun.SplitModel | None, dict]:
  """The teacher named by `config.teacher` (None, {} when distillation is off)."""
  if config.distill.weight <= 0:
    return None, {}
  tc = config.teacher
  if tc.hf_path:
    from jaxsun.interop import hf  # pylint: disable=g-import-not-at-top
    teacher = hf.load_hf(tc.hf_path, max_len=max(config.train.seq_len,
                                                 config.analysis.length))
    info = {"hf_path": tc.hf_path, "model_config": model_config_to_dict(teacher.cfg)}
  else:
    teacher, info = load_teacher_from_workdir(tc.workdir, tc.run)
    want = tokenizer_name(config)
    if info.get("tokenizer") and info["tokenizer"] != want:
      raise ValueError(f"the teacher in {tc.workdir} was trained with tokenizer "
                       f"{info['tokenizer']!r}, this study uses {want!r}")
  if teacher.cfg.vocab_size < tokenizer_vocab:
    raise ValueError(f"the teacher's vocab_size {teacher.cfg.vocab_size} is smaller than "
                     f"the tokenizer's {tokenizer_vocab}")
  return teacher, info


# ----------------------------------------------------------------------------- attention


def layer_attention_weights(model: jaxsun.Decoder, tokens) -> Iterator[np.ndarray]:
  """Train-mode effective attention weights, one layer at a time: f32[B, H, T, T] each
  (`Decoder.layer_attention_weights`, as numpy)."""
  for w in model.layer_attention_weights(jnp.asarray(tokens, jnp.int32)):
    yield np.asarray(w, np.float32)


def attention_statistics(model: jaxsun.Decoder, tokens, valid=None, *, map_len: int = 64,
                         keep_map: bool = False) -> tuple[dict, dict]:
  """The paper's attention measures of `model` on `tokens`, layer by layer.

  Returns:
    (summary, arrays). summary: {"entropy", "first_token_mass": {"per_layer_head" [L][H],
    "per_layer" [L], "mean"}, "query_mass": {"mean" [L], "std" [L], "quantiles"},
    "head_diversity": {"jsd" [L], "cosine" [L]}, "valid_queries"} (as
    `jaxsun.analysis.summarize`). arrays: "query_mass" f32[L, H, N] (the per-query
    masses of valid queries) and, with `keep_map`, "attention_map" f32[L, 1, H, m, m]
    (row 0's weights, the first `map_len` queries and keys).
  """
  ent, ftm, qm_vals, qm_mean, qm_std, jsd, cos, maps = [], [], [], [], [], [], [], []
  quantiles: dict[str, list] = {}
  for w in layer_attention_weights(model, tokens):
    w5 = w[None]
    ent.append(analysis.attention_entropy(w5, valid)[0])
    ftm.append(analysis.first_token_mass(w5, valid)[0])
    qm = analysis.query_mass(w5, valid)
    qm_vals.append(np.asarray(qm.values, np.float32)[0])
    qm_mean.append(float(np.asarray(qm.mean)[0]))
    qm_std.append(float(np.asarray(qm.std)[0]))
    for q, v in zip(qm.q, np.asarray(qm.quantiles)[0]):
      quantiles.setdefault(f"{float(q):g}", []).append(float(v))
    jsd.append(float(analysis.head_diversity(w5, valid, metric="jsd")[0]))
    cos.append(float(analysis.head_diversity(w5, valid, metric="cosine")[0]))
    if keep_map:
      maps.append(w[:1, :, :map_len, :map_len])
  summary = {}
  for name, per_head in (("entropy", np.stack(ent)), ("first_token_mass", np.stack(ftm))):
    per_head = per_head.astype(np.float64)
    summary[name] = {"per_layer_head": _clean(per_head), "per_layer":
                     _clean(per_head.mean(axis=1)), "mean": _clean(np.nanmean(per_head))}
  summary["query_mass"] = {"mean": _clean(qm_mean), "std": _clean(qm_std),
                           "quantiles": {k: _clean(v) for k, v in quantiles.items()}}
  summary["head_diversity"] = {"jsd": _clean(jsd), "cosine": _clean(cos)}
  summary["valid_queries"] = (int(np.asarray(valid).sum()) if valid is not None
                              else int(np.prod(np.shape(tokens))))
  arrays = {"query_mass": np.stack(qm_vals)}
  if keep_map:
    arrays["attention_map"] = np.stack(maps)
  return summary, arrays


def _clean(x):
  """Nested lists of floats with NaN/inf as None (JSON)."""
  arr = np.asarray(x, np.float64)
  if arr.ndim == 0:
    v = float(arr)
    return v if math.isfinite(v) else None
  return [_clean(a) for a in arr]


def validation_tokens(config, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(i32[n, length] validation rows, bool[n, length] not padding) for the statistics."""
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  ac = config.analysis
  batches = data_lib.lm_batches(config.data.eval_source, tokenizer, seq_len=ac.length,
                                batch_size=ac.sequences, split="validation",
                                data_dir=config.data_dir or None)
  tokens = np.asarray(next(iter(batches))["tokens"], np.int32)
  return tokens, tokens != tokenizer.pad_id


# ----------------------------------------------------------------------------- one run


def _series(logdir: pathlib.Path, key: str) -> np.ndarray:
  path = logdir / "metrics.jsonl"
  if not path.exists():
    return np.zeros((0,))
  return np.asarray([v for _, v in metrics_lib.scalar_series(
      metrics_lib.read_jsonl(path), key)], np.float64)


def _write_npz_atomic(path: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  common.write_bytes_atomic(path, buf.getvalue())


def run_identity(config, kind: str, seed: int, model_cfg: ModelConfig, teacher_info: dict,
                 control: Control | None = None) -> dict:
  """What must match for a rerun to resume (checkpoints) or reuse (measurements).

  Per run, not the whole config: adding kinds or `config.controls` to a study leaves the
  identities of its earlier runs unchanged, so a rerun in the same workdir reuses them.
  A control's identity also names the control and its overrides (its model config and
  train section already include them).
  """
  identity = {"job": JOB, "kind": kind, "seed": int(seed),
              "tokenizer": tokenizer_name(config),
              "model_config": model_config_to_dict(model_cfg),
              "train": train_section(config, control),
              "distill": common.to_dict(config.distill),
              "teacher": {k: v for k, v in teacher_info.items() if k != "model_config"},
              "sources": [str(s) for s in config.data.sources],
              "weights": list(config.data.weights)}
  if control is not None:
    identity["control"] = {"name": control.name,
                           "overrides": common.to_dict(control.overrides)}
  return identity


def train_one(config, kind: str, seed: int, tokenizer, workdir: pathlib.Path, *,
              teacher=None, teacher_info: dict | None = None,
              control: Control | None = None) -> tuple[jaxsun.SplitModel, dict]:
  """Pretrains one (kind, seed) run, or one seed of a control (`kind` must be the
  control's), resuming its checkpoint. Returns (split, info)."""
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  tc = config.train
  name = run_name(control.name if control else kind, seed)
  model_cfg = model_config(config.model, tokenizer.vocab_size, kind,
                           overrides=control.model_overrides if control else None)
  identity = run_identity(config, kind, seed, model_cfg, teacher_info or {}, control)
  steps = train_section(config, control)["steps"]
  batches = data_lib.lm_batches(list(config.data.sources), tokenizer, seq_len=tc.seq_len,
                                batch_size=tc.batch_size, seed=seed,
                                weights=list(config.data.weights),
                                data_dir=config.data_dir or None)
  split = jaxsun.SplitModel.from_model(jaxsun.Decoder(model_cfg, rngs=nnx.Rngs(seed)))
  ckpt_dir = workdir / "checkpoints" / name
  ft._check_run_identity(ckpt_dir, identity)  # pylint: disable=protected-access
  trainer = Trainer(split, train_config(config, seed, control), teacher=teacher)
  t0 = time.perf_counter()
  with metrics_lib.create_default_writer(workdir / "logs" / name) as writer, Checkpointer(
      ckpt_dir / "steps", keep=1) as ckpt:
    done = ckpt.latest_step() or 0
    tokens = tc.batch_size * tc.seq_len
    progress = Progress(total=steps, initial=done, log_every=tc.progress_every,
                        tokens_per_step=tokens, desc=name, file=sys.stdout,
                        flops_per_step=model_cfg.flops_per_token(tc.seq_len) * tokens)
    trainer.fit(batches, writer=writer, checkpointer=ckpt, progress=progress, label=name)
  return trainer.split, {"model_config": model_cfg, "identity": identity,
                         "trainable_params": trainer.num_trainable_params(),
                         "train_time_s": round(time.perf_counter() - t0, 2)}


def measure_run(config, split: jaxsun.SplitModel, logdir: pathlib.Path, tokenizer, *,
                val_tokens=None, val_valid=None, keep_map: bool = False
                ) -> tuple[dict, dict]:
  """The measurements of one trained run. Returns (record, arrays).

  record: final_train_loss (mean CE of the last `train.final_window` steps),
  final_objective (the distillation objective, when distilling), validation_loss /
  _perplexity, grad_norm_variance / _mean and spikes_k<k> over the stability range,
  "stability" (the full `jaxsun.analysis.stability_summary`), "attention"
  (`attention_statistics`) and its headline means. arrays: "loss", "grad_norm" (every
  step), "query_mass" and maybe "attention_map".
  """
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  tc, ac = config.train, config.analysis
  distilling = config.distill.weight > 0
  objective = _series(logdir, "loss")
  ce = _series(logdir, "ce_loss") if distilling else objective
  grad = _series(logdir, "grad_norm")
  if ce.size == 0 or ce.size != grad.size:
    raise ValueError(f"{logdir}/metrics.jsonl lacks the per-step loss / grad_norm series "
                     f"({ce.size} and {grad.size} values)")
  record: dict[str, Any] = {"steps": int(ce.size),
                            "final_train_loss": float(np.mean(ce[-tc.final_window:]))}
  if distilling:
    record["final_objective"] = float(np.mean(objective[-tc.final_window:]))
  ev = evaluate_loss(split, ft.limited(lambda: data_lib.lm_batches(
      config.data.eval_source, tokenizer, seq_len=tc.seq_len, batch_size=tc.batch_size,
      split="validation", data_dir=config.data_dir or None), tc.eval_batches)())
  record.update(validation_loss=ev["loss"], validation_perplexity=ev["perplexity"],
                validation_tokens=ev["tokens"])
  stop = ac.stability_stop or None
  stab = analysis.stability_summary(ce, grad, ks=tuple(ac.spike_ks),
                                    window=ac.spike_window, start=ac.stability_start,
                                    stop=stop, detrend=ac.detrend or None)
  record.update(grad_norm_variance=stab["grad_norm_variance"],
                grad_norm_mean=stab["grad_norm_mean"])
  for k in ac.spike_ks:
    record[f"spikes_k{float(k):g}"] = stab["loss_spikes"][f"{float(k):g}"]["count"]
  record["stability"] = stab
  if val_tokens is None:
    val_tokens, val_valid = validation_tokens(config, tokenizer)
  att, arrays = attention_statistics(split.prefill_module(), val_tokens, val_valid,
                                     map_len=ac.map_len, keep_map=keep_map)
  record.update(entropy_mean=att["entropy"]["mean"],
                first_token_mass_mean=att["first_token_mass"]["mean"],
                query_mass_std_mean=_clean(np.nanmean(np.asarray(
                    att["query_mass"]["std"], np.float64))),
                head_diversity_jsd_mean=_clean(np.nanmean(np.asarray(
                    att["head_diversity"]["jsd"], np.float64))))
  record["attention"] = att
  arrays.update(loss=ce, grad_norm=grad)
  return record, arrays


def run_one(config, kind: str, seed: int, tokenizer, workdir: pathlib.Path, *,
            teacher=None, teacher_info: dict | None = None, val=None,
            keep_map: bool = False, control: Control | None = None) -> tuple[dict, dict]:
  """Trains and measures one run, or reads back its finished measurements.

  With `control` (whose kind `kind` must be) the run is that control's seed `seed`,
  named `<control.name>_s<seed>`; its record also carries "control" and "overrides".
  Returns (record, arrays); both are also written to `workdir/runs/<name>.{json,npz}`.
  A record read back carries "reused": True (not stored).
  """
  if control is not None and control.kind != kind:
    raise ValueError(f"control {control.name!r} is of kind {control.kind!r}, not {kind!r}")
  name = run_name(control.name if control else kind, seed)
  runs_dir = workdir / "runs"
  runs_dir.mkdir(parents=True, exist_ok=True)
  model_cfg = model_config(config.model, tokenizer.vocab_size, kind,
                           overrides=control.model_overrides if control else None)
  identity = run_identity(config, kind, seed, model_cfg, teacher_info or {}, control)
  rec_path, npz_path = runs_dir / f"{name}.json", runs_dir / f"{name}.npz"
  analysis_cfg = common.to_dict(config.analysis)
  if rec_path.exists() and npz_path.exists():
    old = json.loads(rec_path.read_text())
    if old.get("identity") == identity and old.get("analysis") == analysis_cfg and (
        not keep_map or "attention_map" in np.load(npz_path).files):
      print(f"[{JOB}] {name}: finished earlier, measurements read from {rec_path}",
            flush=True)
      with np.load(npz_path) as z:
        return {**old, "reused": True}, {k: z[k] for k in z.files}
  split, info = train_one(config, kind, seed, tokenizer, workdir, teacher=teacher,
                          teacher_info=teacher_info, control=control)
  t0 = time.perf_counter()
  tokens, valid = val if val is not None else validation_tokens(config, tokenizer)
  record, arrays = measure_run(config, split, workdir / "logs" / name, tokenizer,
                               val_tokens=tokens, val_valid=valid, keep_map=keep_map)
  cfg = info["model_config"]
  record = {"name": name, "kind": kind, "seed": int(seed),
            **({"control": control.name, "overrides": common.to_dict(control.overrides)}
               if control else {}),
            "num_params": cfg.num_params(),
            "attention_params": cfg.n_layers * cfg.attention_params(),
            "trainable_params": info["trainable_params"], **record,
            "train_time_s": info["train_time_s"],
            "measure_time_s": round(time.perf_counter() - t0, 2),
            "identity": identity, "analysis": analysis_cfg}
  _write_npz_atomic(npz_path, arrays)
  common.write_json_atomic(rec_path, record)
  return record, arrays


# ----------------------------------------------------------------------------- aggregate


def _stats(values: Sequence[float | None]) -> dict:
  """{"mean", "std" (sample, ddof=1; 0 for one seed), "n", "values"}."""
  vals = [v for v in values if v is not None and math.isfinite(v)]
  if not vals:
    return {"mean": None, "std": None, "n": 0, "values": list(values)}
  arr = np.asarray(vals, np.float64)
  std = float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0
  return {"mean": float(arr.mean()), "std": std, "n": int(arr.size),
          "values": list(values)}


def derived_measures(record: Mapping) -> dict:
  """Measures computed from a run's attention summary (so read-back runs get them too).

  query_mass_mean_mean: the mean per-query mass sum_s w, averaged over layers (1 for
  softmax; alpha softmax + beta sums to less for the affine kinds).
  first_token_share_mean: per layer, the first-token mass over the mean per-query mass
  (the share of a query's weight on key 0, free of the overall scale), averaged over
  layers. The raw first-token mass of a variant whose rows sum to ~0.4 is ~0.4 times
  its share.
  """
  att = record["attention"]
  ftm = np.asarray([np.nan if v is None else v for v in
                    att["first_token_mass"]["per_layer"]], np.float64)
  qm = np.asarray([np.nan if v is None else v for v in att["query_mass"]["mean"]],
                  np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    share = ftm / qm
  return {"query_mass_mean_mean": _clean(np.nanmean(qm)),
          "first_token_share_mean": _clean(np.nanmean(share))}


def aggregate(records: Mapping[str, Mapping], kinds: Sequence[str],
              seeds: Sequence[int], spike_ks: Sequence[float] = (6, 9)) -> dict:
  """Mean +- std over seeds, per kind, of the scalar measures and the per-layer curves.

  `kinds` are the run groups: attention kinds or control names (runs `<group>_s<seed>`).

  Also "vs_softmax" (when "softmax" is among the kinds): per measure, the difference of
  means and whether it exceeds twice its standard error sqrt(s1^2/n1 + s2^2/n2) (a
  rough seed-noise check, not a significance test).
  """
  keys = [k for k in SCALARS if not k.startswith("spikes_")] + [
      f"spikes_k{float(k):g}" for k in spike_ks]
  out: dict[str, Any] = {}
  for kind in kinds:
    recs = [{**records[run_name(kind, s)], **derived_measures(records[run_name(kind, s)])}
            for s in seeds if run_name(kind, s) in records]
    if not recs:
      continue
    entry: dict[str, Any] = {"seeds": [r["seed"] for r in recs],
                             "attention_params": recs[0]["attention_params"],
                             "num_params": recs[0]["num_params"]}
    for key in keys:
      entry[key] = _stats([r.get(key) for r in recs])
    per_layer = {}
    for name, path in (("entropy", ("entropy", "per_layer")),
                       ("first_token_mass", ("first_token_mass", "per_layer")),
                       ("head_diversity_jsd", ("head_diversity", "jsd")),
                       ("query_mass_std", ("query_mass", "std"))):
      rows = np.asarray([[np.nan if v is None else v for v in
                          r["attention"][path[0]][path[1]]] for r in recs], np.float64)
      per_layer[name] = {"mean": _clean(np.nanmean(rows, 0)),
                         "std": _clean(np.nanstd(rows, 0, ddof=1) if len(recs) > 1
                                       else np.zeros(rows.shape[1]))}
    entry["per_layer"] = per_layer
    out[kind] = entry
  if "softmax" in out:
    base = out["softmax"]
    for kind, entry in out.items():
      if kind == "softmax":
        continue
      cmp = {}
      for key in keys:
        a, b = entry[key], base[key]
        if a["mean"] is None or b["mean"] is None:
          continue
        se = math.sqrt((a["std"] ** 2) / max(a["n"], 1) + (b["std"] ** 2) / max(b["n"], 1))
        diff = a["mean"] - b["mean"]
        cmp[key] = {"diff": diff, "se": se,
                    "beyond_2se": bool(abs(diff) > 2 * se) if a["n"] > 1 and b["n"] > 1
                    else None}
      entry["vs_softmax"] = cmp
  return out


def _z(cmp: Mapping) -> float | None:
  """diff / SE, or None without an SE (one seed, or no spread)."""
  return cmp["diff"] / cmp["se"] if cmp.get("se") else None


def instrument_check(aggregate_: Mapping[str, Mapping], controls_: Mapping[str, Mapping],
                     measure: str = "validation_loss") -> dict | None:
  """Whether the study resolves the positive controls' difference from softmax.

  Args:
    aggregate_: `aggregate` of the kinds (with "softmax" and "vs_softmax" entries).
    controls_: control name -> its aggregate entry (with "vs_softmax"), plus "kind"
      and "overrides".
    measure: the measure compared (validation loss).

  Returns:
    None without softmax or controls, else {"measure", "controls": {name: {"diff",
    "se", "z", "beyond_2se", "description"}}, "resolved": names beyond 2 SE,
    "instrument_works" (some control resolved), "largest_variant": {"kind", "diff",
    "se", "z", "beyond_2se"} (the kind with the largest |diff|), "variants_beyond_2se",
    "variant_bound" (max over kinds of |diff| + 2 SE: differences larger than this
    would most likely have been seen) and "variant_bound_kind" (whose), "sentence"}.
  """
  if "softmax" not in aggregate_ or not controls_:
    return None

  def entry(cmp):
    return {"diff": cmp["diff"], "se": cmp["se"], "z": _z(cmp),
            "beyond_2se": cmp["beyond_2se"]}

  ctrl = {}
  for name, e in controls_.items():
    cmp = e.get("vs_softmax", {}).get(measure)
    if cmp is not None:
      ctrl[name] = {**entry(cmp), "description": Control(
          name, e.get("kind", "?"), e.get("overrides", {})).describe()}
  variants = {k: entry(e["vs_softmax"][measure]) for k, e in aggregate_.items()
              if k != "softmax" and measure in e.get("vs_softmax", {})}
  largest = None
  if variants:
    kind = max(variants, key=lambda k: abs(variants[k]["diff"]))
    largest = {"kind": kind, **variants[kind]}
  beyond = [k for k, v in variants.items() if v["beyond_2se"]]
  bound = bound_kind = None
  if variants and all(v["se"] for v in variants.values()):
    reach = {k: abs(v["diff"]) + 2 * v["se"] for k, v in variants.items()}
    bound_kind = max(reach, key=reach.get)
    bound = reach[bound_kind]
  resolved = [n for n, c in ctrl.items() if c["beyond_2se"]]
  label = measure.replace("_", " ")

  def pm(c):
    out = f"{c['diff']:+.3f}"
    if c["se"]:
      out += f" ± {c['se']:.3f} ({c['z']:+.1f} SE)"
    return out

  parts = []
  for name, c in ctrl.items():
    if c["beyond_2se"] is None:
      verdict = "no standard error (one seed): the instrument is not checked"
    elif c["beyond_2se"]:
      verdict = "the instrument resolves differences of this size"
    else:
      verdict = ("within 2 SE: the instrument does NOT resolve a difference of this "
                 "size, so the kinds' null result says nothing about effects this large")
    parts.append(f"the control {name} ({c['description']}) differs from softmax by "
                 f"{pm(c)} nats of {label}: {verdict}")
  sentence = "Instrument check: " + "; ".join(parts) + "."
  if largest is not None:
    sentence += (f" The largest variant difference is {largest['kind']}'s "
                 f"{pm(largest)}")
    if beyond:
      sentence += (f"; {', '.join(beyond)} differ{'s' if len(beyond) == 1 else ''} from "
                   "softmax by more than 2 SE.")
    else:
      sentence += "; no variant differs from softmax by more than 2 SE"
      if resolved and bound is not None:
        sentence += (f", so any effect of the attention kind on {label} at this scale is "
                     f"smaller than about {bound:.2f} nats (the largest |diff| + 2 SE, "
                     f"{bound_kind}'s)")
        smallest = min(resolved, key=lambda n: abs(ctrl[n]["diff"]))
        s_kind = aggregate_[bound_kind].get(measure, {}).get("std")
        s_ctrl = controls_[smallest].get(measure, {}).get("std")
        d_ctrl = abs(ctrl[smallest]["diff"])
        if bound > d_ctrl and s_kind is not None and s_ctrl is not None:
          sentence += (f"; that bound exceeds the control's {d_ctrl:.3f} because"
                       f" {bound_kind}'s seed spread (std {s_kind:.3f}) is wider "
                       f"than the control's ({s_ctrl:.3f})")
        sentence += "."
      else:
        sentence += "."
  return {"measure": measure, "controls": ctrl, "resolved": resolved,
          "instrument_works": bool(resolved), "largest_variant": largest,
          "variants_beyond_2se": beyond, "variant_bound": bound,
          "variant_bound_kind": bound_kind, "sentence": sentence}


def _fmt(s: Mapping, digits: int = 3) -> str:
  if s.get("mean") is None:
    return "n/a"
  if s["n"] > 1:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
  return f"{s['mean']:.{digits}f}"


def markdown_report(results: Mapping) -> str:
  """results.md: the aggregated table, the comparison with softmax, the paper's numbers."""
  agg, cfg = results["aggregate"], results["config"]
  ks = [f"{float(k):g}" for k in cfg["analysis"]["spike_ks"]]
  seeds = cfg["seeds"]
  lines = [f"# Attention-variant pretraining study (`{results['variant']}`)", "",
           f"{len(results['kinds'])} kinds" + (
               f" + {len(results['controls'])} positive control"
               f"{'s' if len(results['controls']) > 1 else ''} (see Controls)"
               if results.get("controls") else "") +
           f" x {len(seeds)} seeds {list(seeds)}; "
           f"{cfg['train']['steps']} steps of {cfg['train']['batch_size']} x "
           f"{cfg['train']['seq_len']} tokens on {list(cfg['data']['sources'])}; "
           f"{results['num_params'] or '?'} parameters (softmax). Distillation weight "
           f"{cfg['distill']['weight']}. Wall time of this invocation "
           f"{results['wall_time_s'] / 60:.1f} min" + (
               f" ({len(results['reused_runs'])} of {len(results['runs'])} runs read "
               "back from an earlier invocation)" if results.get("reused_runs") else "") +
           "; the runs took "
           f"{results['runs_time_s'] / 60:.1f} min of training and measuring "
           f"({results['backend']}). Every kind of a seed sees the same batches in the "
           "same order.", "",
           "Mean ± std (sample std, ddof=1) over seeds. Final train loss: mean of the "
           f"last {cfg['train']['final_window']} steps' next-token loss. Stability over "
           f"update steps [{results['stability_range'][0]}, "
           f"{results['stability_range'][1] or 'end'}): gradient-norm variance (np.var "
           "of the pre-clipping global norm) and loss spikes, a spike being a step whose "
           "loss exceeds median + k MAD of the previous "
           f"{cfg['analysis']['spike_window']} steps after subtracting a trailing median "
           f"of {cfg['analysis']['detrend']} steps (`detrend`; without it the trailing "
           "rule misses spikes on a steeply falling loss).", ""]
  head = ["kind", "ΔParams", "final train loss", "val loss", "val ppl", "grad-norm var"] + [
      f"spikes k={k}" for k in ks]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for kind, e in agg.items():
    row = [kind, f"{e['attention_params']:,}", _fmt(e["final_train_loss"]),
           _fmt(e["validation_loss"]), _fmt(e["validation_perplexity"], 2),
           _fmt(e["grad_norm_variance"], 4)] + [_fmt(e[f"spikes_k{k}"], 1) for k in ks]
    lines.append("| " + " | ".join(row) + " |")
  lines += ["", "Attention statistics on validation sequences (means over layers and "
            "heads; per-layer curves in the plots):", ""]
  head = ["kind", "entropy (nats)", "first-token mass", "first-token share",
          "query mass mean", "query mass std", "head diversity (JSD)"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for kind, e in agg.items():
    lines.append("| " + " | ".join([kind, _fmt(e["entropy_mean"]),
                                     _fmt(e["first_token_mass_mean"]),
                                     _fmt(e["first_token_share_mean"]),
                                     _fmt(e["query_mass_mean_mean"]),
                                     _fmt(e["query_mass_std_mean"]),
                                     _fmt(e["head_diversity_jsd_mean"], 4)]) + " |")
  lines += ["", "First-token mass is the raw weight on key 0 (queries t >= 1); the share "
            "divides it by the layer's mean per-query mass sum_s w (1 for softmax and "
            "gated, below 1 for off-by-one / sink, alpha softmax + beta for the affine "
            "kinds), so it compares where a query's weight goes independently of its "
            "overall scale."]
  cmp_keys = ["final_train_loss", "validation_loss", "grad_norm_variance"] + [
      f"spikes_k{k}" for k in ks]
  if any("vs_softmax" in e for e in agg.values()):
    lines += ["", "Difference from softmax (mean − softmax mean; * where |diff| > 2 SE, "
              "SE = sqrt(s1²/n1 + s2²/n2), a rough seed-noise check):", ""]
    head = ["kind"] + cmp_keys
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, e in agg.items():
      if "vs_softmax" not in e:
        continue
      cells = []
      for key in cmp_keys:
        c = e["vs_softmax"].get(key)
        cells.append("n/a" if c is None else f"{c['diff']:+.4g}" +
                     ("*" if c["beyond_2se"] else ""))
      lines.append("| " + " | ".join([kind] + cells) + " |")
  ctrls = results.get("controls") or {}
  if ctrls:
    lines += ["", "## Controls", "",
              "Positive controls: configurations expected to differ from softmax by a "
              "modest, known margin, trained on the same batches with the same seeds and "
              "measured the same way. A control beyond 2 SE of softmax shows the "
              "instrument resolves a difference of its size.", ""]
    head = ["control", "kind + overrides", "params", "final train loss", "val loss",
            "val ppl", "grad-norm var", "Δ val loss vs softmax ± SE",
            "Δ final train loss ± SE"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in ctrls.items():
      cells = []
      for key in ("validation_loss", "final_train_loss"):
        c = e.get("vs_softmax", {}).get(key)
        if c is None:
          cells.append("n/a")
        else:
          z = _z(c)
          cells.append(f"{c['diff']:+.3f} ± {c['se']:.3f}" + (
              f" ({z:+.1f} SE)" if z is not None else "") + ("*" if c["beyond_2se"]
                                                              else ""))
      lines.append("| " + " | ".join(
          [name, Control(name, e["kind"], e["overrides"]).describe(),
           f"{e['num_params']:,}", _fmt(e["final_train_loss"]),
           _fmt(e["validation_loss"]), _fmt(e["validation_perplexity"], 2),
           _fmt(e["grad_norm_variance"], 4)] + cells) + " |")
    check = results.get("instrument_check")
    if check:
      lines += ["", f"**{check['sentence']}**"]
  ref = results["paper_reference"]
  lines += ["", "## The paper's numbers (for reference only)", "", ref["source"] + ".", ""]
  lines += ["| size | kind | final loss | C4 ppl | grad-norm var (0-500) | spikes k=6 | "
            "spikes k=9 |", "|---|---|---|---|---|---|---|"]
  for size in ("0.5B", "1B", "3B"):
    for kind in ("softmax", "sink", "affine", "gated", "affine_gated"):
      loss = ref["final_train_loss"][size].get(kind)
      if loss is None:
        continue
      cells = [ref[table].get(size, {}).get(kind, "") for table in (
          "c4_perplexity", "grad_norm_variance_steps_0_500", "spikes_k6_steps_0_500",
          "spikes_k9_steps_0_500")]
      lines.append(f"| {size} | {kind} ({ref['kind_names'][kind]}) | {loss} | " +
                   " | ".join(str(c) for c in cells) + " |")
  if results.get("plots"):
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]]
  return "\n".join(lines) + "\n"


def make_plots(records: Mapping[str, Mapping], arrays: Mapping[str, Mapping],
               kinds: Sequence[str], seeds: Sequence[int], out_dir: pathlib.Path,
               *, map_heads: Sequence[int] = (0, 1),
               curve_extra: Sequence[str] = ()) -> list[str]:
  """The study's PNGs (file names returned): training curves (mean ± std over seeds),
  entropy / first-token mass / head diversity per layer (means over seeds), the
  per-query mass distribution (all seeds pooled), attention maps (first seed, last
  layer). `curve_extra`: further run groups (the controls) drawn on the training curves
  only (their shapes may differ from the kinds')."""
  from jaxsun.analysis import plots  # pylint: disable=g-import-not-at-top

  def group(ks):
    out = {k: [run_name(k, s) for s in seeds if run_name(k, s) in records] for k in ks}
    return {k: v for k, v in out.items() if v}

  names = group(kinds)
  out = []
  curves = {k: {"loss": [arrays[n]["loss"] for n in v],
                "grad_norm": [arrays[n]["grad_norm"] for n in v]}
            for k, v in {**names, **group(curve_extra)}.items()}
  means = [np.mean(np.stack([c[: min(map(len, d["loss"]))] for c in d["loss"]]), 0)
           for d in curves.values()]
  n = min(m.size for m in means)
  lo = min(float(m[:n].min()) for m in means)
  hi = max(float(m[min(n - 1, max(1, n // 10))]) for m in means)
  ylim = (lo - 0.05 * (hi - lo), hi) if hi > lo else None
  # Spikes are counted by the detrended rule in the tables, so none are marked here (the
  # plot's own rule is not detrended); a log axis keeps one large gradient norm from
  # flattening the rest.
  out.append(plots.plot_training_curves(curves, out_dir / "training_curves.png", k=None,
                                        loss_ylim=ylim, log_grad_norm=True,
                                        title="Pretraining: loss and gradient norm (mean "
                                        "± std over seeds)").name)

  def per_layer(path):
    return {k: np.nanmean(np.asarray([[[np.nan if x is None else x for x in row]
                                        for row in _get(records[n]["attention"], path)]
                                       for n in v], np.float64), 0)
            for k, v in names.items()}

  out.append(plots.plot_entropy_per_layer(
      per_layer(("entropy", "per_layer_head")), out_dir / "entropy_per_layer.png",
      title="Attention entropy per layer, seed mean").name)
  out.append(plots.plot_first_token_mass_per_layer(
      per_layer(("first_token_mass", "per_layer_head")),
      out_dir / "first_token_mass_per_layer.png",
      title="Raw weight on the first token per layer, seed mean").name)
  div = {k: np.nanmean(np.asarray([[np.nan if x is None else x for x in
                                    records[n]["attention"]["head_diversity"]["jsd"]]
                                   for n in v], np.float64), 0) for k, v in names.items()}
  out.append(plots.plot_head_diversity_per_layer(
      div, out_dir / "head_diversity_per_layer.png",
      title="Head diversity per layer (JSD), seed mean").name)
  qm = {k: np.concatenate([arrays[n]["query_mass"] for n in v], axis=-1)
        for k, v in names.items()}
  n_layers = next(iter(qm.values())).shape[0]
  layers = sorted({0, n_layers - 1})
  out.append(plots.plot_query_mass_distribution(
      qm, out_dir / "query_mass_distribution.png", layers=layers,
      title="Per-query attention mass (all seeds)").name)
  maps = {k: arrays[v[0]]["attention_map"] for k, v in names.items()
          if "attention_map" in arrays[v[0]]}
  if maps:
    any_map = next(iter(maps.values()))
    heads = [h for h in map_heads if h < any_map.shape[2]] or [0]
    out.append(plots.plot_attention_maps(
        maps, out_dir / "attention_maps.png", layer=any_map.shape[0] - 1, heads=heads,
        title=f"Attention weights, last layer, seed {seeds[0]}, validation row 0").name)
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


# ----------------------------------------------------------------------------- the job


def run_study(config, workdir: str | os.PathLike) -> dict:
  """Every kind x seed, then the aggregate, results.json, results.md and the plots."""
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  sw = common.Stopwatch()
  check_config(config)
  ctrls = controls(config)
  workdir = common.prepare_workdir(workdir)
  tok_name = tokenizer_name(config)
  tokenizer = data_lib.get_tokenizer(tok_name)
  kinds, seeds = tuple(config.kinds), tuple(config.seeds)
  teacher, teacher_info = load_teacher(config, tokenizer.vocab_size)
  cfg0 = model_config(config.model, tokenizer.vocab_size, kinds[0])
  groups = [(k, None) for k in kinds] + [(c.kind, c) for c in ctrls]
  total = len(groups) * len(seeds)
  print(f"[{JOB}] {total} runs ({len(kinds)} kinds" + (
      f" + {len(ctrls)} control{'s' if len(ctrls) > 1 else ''} "
      f"({', '.join(c.name for c in ctrls)})" if ctrls else "") +
        f" x {len(seeds)} seeds): "
        f"{cfg0.num_params():,} parameters ({kinds[0]}), tokenizer {tok_name!r}, "
        f"{config.train.steps} steps of {config.train.batch_size} x "
        f"{config.train.seq_len}" + (f", distilling from {teacher_info}" if teacher
                                     else ""), flush=True)
  val = validation_tokens(config, tokenizer)
  records, arrays, reused = {}, {}, []
  i = 0
  for seed in seeds:  # seed-major: a partial study has every kind of the first seeds
    for kind, control in groups:  # the kinds, then the controls
      i += 1
      name = run_name(control.name if control else kind, seed)
      print(f"[{JOB}] run {i}/{total}: {name} (elapsed {sw.elapsed() / 60:.1f} min)",
            flush=True)
      rec, arr = run_one(config, kind, seed, tokenizer, workdir, teacher=teacher,
                         teacher_info=teacher_info, val=val, keep_map=seed == seeds[0],
                         control=control)
      if rec.pop("reused", False):
        reused.append(name)
      records[name], arrays[name] = rec, arr
      print(f"[{JOB}] {name}: final train loss {rec['final_train_loss']:.4f}, val loss "
            f"{rec['validation_loss']:.4f} (ppl {rec['validation_perplexity']:.2f}), "
            f"grad-norm var {rec['grad_norm_variance']:.4g}, spikes " +
            ", ".join(f"k={float(k):g}: {rec[f'spikes_k{float(k):g}']}"
                      for k in config.analysis.spike_ks), flush=True)
  names = tuple(c.name for c in ctrls)
  agg = aggregate(records, kinds + names, seeds, tuple(config.analysis.spike_ks))
  ctrl_agg = {c.name: {"kind": c.kind, "overrides": common.to_dict(c.overrides),
                       **agg.pop(c.name)} for c in ctrls if c.name in agg}
  check = instrument_check(agg, ctrl_agg)
  if check:
    print(f"[{JOB}] {check['sentence']}", flush=True)
  plots = make_plots(records, arrays, kinds, seeds, workdir, curve_extra=names)
  ac = config.analysis
  results = {
      "job": JOB, "variant": config.get("variant", ""), "config": common.to_dict(config),
      "kinds": list(kinds), "seeds": list(seeds),
      "num_params": agg.get("softmax", {}).get("num_params"),
      "stability_range": [ac.stability_start, ac.stability_stop or None],
      "notes": {
          "final_train_loss": f"mean next-token loss of the last "
                              f"{config.train.final_window} steps",
          "spikes": f"loss > median + k * MAD of the previous {ac.spike_window} steps' "
                    f"detrended losses (jaxsun.analysis.loss_spikes, window="
                    f"{ac.spike_window}, detrend={ac.detrend or None}); detrend=10 "
                    "because the trailing-median rule misses spikes on a steeply falling "
                    "loss otherwise",
          "grad_norm_variance": "np.var of the pre-clipping global gradient norm over "
                                "the stability range",
          "std": "sample standard deviation over seeds (ddof=1)",
          "controls": "positive controls (config.controls: name, kind, overrides of "
                      "config.model / train.*), trained and measured like the kinds; "
                      "their vs_softmax is the difference of means with SE = "
                      "sqrt(s1^2/n1 + s2^2/n2); instrument_check compares it with the "
                      "kinds' differences (validation loss)",
          "data": "every kind of a seed trains on the same batches in the same order "
                  "(the data order and the model init depend on the seed only)",
          "attention": f"{ac.sequences} validation sequences of {ac.length} tokens; "
                       "effective weights (alpha softmax + beta for the affine kinds, the "
                       "softmax part for gated kinds); entropy / diversity of |w| "
                       "normalised per query (jaxsun.analysis.attention_stats)"},
      "teacher": {k: v for k, v in teacher_info.items() if k != "model_config"} or None,
      "aggregate": agg,
      "controls": ctrl_agg,
      "instrument_check": check,
      "runs": {n: {k: v for k, v in r.items() if k not in ("identity",)}
               for n, r in records.items()},
      "paper_reference": PAPER_REFERENCE, "plots": plots,
      "wall_time_s": round(sw.elapsed(), 2),
      "runs_time_s": round(sum(r["train_time_s"] + r["measure_time_s"]
                               for r in records.values()), 2),
      "reused_runs": reused,
      "jax": jax.__version__,
      "backend": jax.default_backend()}
  common.write_json_atomic(workdir / "results.json", results)
  common.write_bytes_atomic(workdir / "results.md", markdown_report(results).encode())
  print(f"[{JOB}] done in {sw.elapsed() / 60:.1f} min: {workdir / 'results.json'}",
        flush=True)
  return results


def run(config, workdir: str | os.PathLike) -> dict:
  """The `pretrain_attention` job (`experiments/launch.py`)."""
  return run_study(config, workdir)
