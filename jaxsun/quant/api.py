"""One quantization interface: rules (layer-path regex -> scheme) applied to a model.

    rules = [Rule(r"layers/\\d+/(attn|mlp)/.*", "w4a16g128")]
    qmodel, report = quantize(model, rules, method="lrq", calib_tokens=calib,
                              recon=ReconConfig(steps=500), method_options={"rank": 64})

A rule's `path` is a regular expression matched in full against a `Linear`'s path
("layers/0/mlp/up_proj"); the first matching rule wins (as in qwix). Its `scheme` is an
`IntScheme` (or a preset name, `jaxsun.quant.schemes.parse_scheme`), an `Fp8Scheme` or a
`CodebookScheme`. `method` says how integer weights are found:

    "rtn"                           round to nearest (qwix's PTQ grid, no calibration)
    "gptq", "awq", "smoothquant"    qwix's algorithms (calibration inputs per layer)
    "flexround", "lrq", "uniquanf"  block reconstruction (`jaxsun.quant.ptq.reconstruct`)
    "bcq"                           alternating BCQ (weight-only, non-uniform)

Integer results become `IntLinear`s (a qwix QArray), non-uniform ones `BCQLinear`s;
`storage="bcq"` converts uniform results exactly to BCQ too. FP8 rules give `Fp8Linear`s
(`ModelConfig.fp8` is applied through this function) and codebook rules
`CodebookLinear`s. A scanned Decoder is quantized in the unrolled layout and restacked.
`quantize_split` applies rules to one tree of a `SplitModel` (QSUN: the shared decode tree).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun.nn.layers import Linear
from jaxsun.quant import qlinear
from jaxsun.quant.ptq import methods as methods_lib
from jaxsun.quant.ptq import quantizers
from jaxsun.quant.schemes import (CodebookScheme, Fp8Scheme, IntScheme, Scheme,
                                  parse_scheme)

STORAGES = ("auto", "int", "bcq")
KV_SUFFIXES = ("attn/k_proj", "attn/v_proj")


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantize the `Linear`s whose path matches `path` (full match) with `scheme`."""

  path: str
  scheme: Any

  def __post_init__(self):
    try:
      re.compile(self.path)
    except (re.error, TypeError) as e:
      raise ValueError(f"Rule.path={self.path!r} is not a regular expression: {e}") from e
    object.__setattr__(self, "scheme", parse_scheme(self.scheme, field="Rule.scheme"))

  def matches(self, name: str) -> bool:
    return re.fullmatch(self.path, name) is not None


def as_rules(rules) -> list[Rule]:
  """Rules from a Rule, a (path, scheme) pair, or a sequence of either."""
  if isinstance(rules, (Rule, tuple)) and not (
      isinstance(rules, tuple) and rules and isinstance(rules[0], (Rule, tuple))):
    rules = [rules]
  out = [r if isinstance(r, Rule) else Rule(*r) for r in rules]
  if not out:
    raise ValueError("rules is empty: give at least one Rule(path, scheme)")
  return out


def _path_name(path) -> str:
  return "/".join(map(str, path))


def linear_paths(model: nnx.Module) -> dict[str, tuple]:
  """{"layers/0/mlp/up_proj": path} of every plain `Linear` in `model`."""
  return {_path_name(p): p for p, m in nnx.iter_modules(model) if type(m) is Linear}


def match(model: nnx.Module, rules: Sequence[Rule]) -> dict[str, tuple[tuple, Scheme]]:
  """{layer name: (path, scheme)}: each Linear with the first rule that matches it."""
  out = {}
  for name, path in linear_paths(model).items():
    for r in rules:
      if r.matches(name):
        out[name] = (path, r.scheme)
        break
  if not out:
    names = list(linear_paths(model))
    raise ValueError(f"no rule matches a Linear layer (rules: {[r.path for r in rules]}); "
                     f"layers: {names[:8]}{'...' if len(names) > 8 else ''}")
  return out


def _get(root, path):
  mod = root
  for p in path:
    mod = mod[p] if isinstance(p, int) else getattr(mod, p)
  return mod


def _set(root, path, value) -> None:
  parent = _get(root, path[:-1])
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _scanned(model) -> bool:
  return bool(getattr(getattr(model, "cfg", None), "scan_layers", False))


def _kv(name: str, scheme: IntScheme):
  return scheme.kv if scheme.kv is not None and name.endswith(KV_SUFFIXES) else None


def apply_fp8(module: nnx.Module, mode: str) -> nnx.Module:
  """Swaps every attention / MLP `Linear` of `module` for an `Fp8Linear`, in place.

  This is how `ModelConfig.fp8` builds its layers (a rule `(.*/)?(attn|mlp)/\\w+` with
  `Fp8Scheme(mode)`); no calibration is needed.
  """
  from jaxsun.nn.fp8_linear import Fp8Linear  # pylint: disable=g-import-not-at-top
  scheme = Fp8Scheme(mode)
  for name, path in linear_paths(module).items():
    if re.fullmatch(r"(.*/)?(attn|mlp)/\w+", name):
      _set(module, path, Fp8Linear.from_linear(_get(module, path), mode=scheme.mode,
                                               history=scheme.history))
  return module


def _capture(model, tokens, names_paths: dict[str, tuple]) -> dict[str, jax.Array]:
  from jaxsun.quant import layers as codebook_layers  # pylint: disable=g-import-not-at-top
  return codebook_layers.capture_inputs(model, tokens, names_paths)


def quantize(model: nnx.Module, rules, *, method: str = "rtn",
             calib_tokens: jax.Array | None = None, recon=None,
             method_options: dict | None = None, storage: str = "auto",
             backend: str = "auto", log=None) -> tuple[nnx.Module, dict]:
  """A quantized copy of `model` (the original is untouched); returns (model, report).

  Args:
    model: a `jaxsun.nn.Decoder` (either layout) or any module made of `Linear`s.
    rules: `Rule`s (or (path, scheme) pairs); first match wins.
    method: how integer weights are found (module docstring).
    calib_tokens: i32[n, T] calibration sequences: required by reconstruction methods,
      qwix's calibrated algorithms, static activation scales and codebook rules.
    recon: a `jaxsun.quant.ptq.reconstruct.ReconConfig` (default settings if None).
    method_options: keyword options of the method (e.g. {"rank": 64} for LRQ).
    storage: "auto" (integer layers for uniform results, BCQ for non-uniform), "int",
      or "bcq" (uniform results converted exactly to BCQ as well).
    backend: the BCQ / Psumbook kernel backend of the new layers.
    log: optional callable(str) for progress lines.

  Returns:
    (quantized model, report) with, per layer, the scheme, the method, the
    learnable-parameter count and the relative weight error; with reconstruction, the
    per-block losses.
  """
  if storage not in STORAGES:
    raise ValueError(f"storage={storage!r} is not one of {STORAGES}")
  rules = as_rules(rules)
  if _scanned(model):
    from jaxsun.nn import decoder  # pylint: disable=g-import-not-at-top  (import cycle)
    q, report = quantize(decoder.unstack_layers(model), rules, method=method,
                         calib_tokens=calib_tokens, recon=recon,
                         method_options=method_options, storage=storage, backend=backend,
                         log=log)
    return decoder.stack_layers(q), report
  t0 = time.perf_counter()
  selected = match(model, rules)
  int_layers = {n: (p, s) for n, (p, s) in selected.items() if isinstance(s, IntScheme)}
  cb_layers = {n: (p, s) for n, (p, s) in selected.items() if isinstance(s, CodebookScheme)}
  needs_inputs = set(cb_layers)
  if method in methods_lib.CALIBRATED:
    needs_inputs |= set(int_layers)
  needs_inputs |= {n for n, (_, s) in int_layers.items() if s.act is not None and s.act.static}
  recon_method = method not in methods_lib.CALIBRATED and methods_lib.make(
      method, **(method_options or {})).trainable
  if (needs_inputs or recon_method) and calib_tokens is None:
    raise ValueError(f"calib_tokens is required (method={method!r}, or static "
                     f"activations / codebook rules)")
  opts = dict(method_options or {}) if method in methods_lib.CALIBRATED else {}
  for name in cb_layers:  # fail before the (slow) calibration pass
    path, scheme = cb_layers[name]
    scheme.format().check_shape(*_get(model, path).kernel.shape)
  inputs = (_capture(model, calib_tokens, {n: selected[n][0] for n in sorted(needs_inputs)})
            if needs_inputs else {})
  act_scales = {n: qlinear.static_scale(inputs[n], s.act) for n, (_, s) in int_layers.items()
                if s.act is not None and s.act.static}

  qmodel = nnx.clone(model)
  report: dict[str, Any] = {"method": method, "layers": {}}
  # Integer layers: exports from the method.
  if int_layers:
    exports, in_scales, counts = _int_exports(model, int_layers, method, method_options,
                                              calib_tokens, recon, inputs, act_scales,
                                              report, log, opts)
    for name, (path, scheme) in int_layers.items():
      lin = _get(model, path)
      w = jnp.asarray(lin.kernel[...], jnp.float32)
      ex = exports[name]
      layer = _make_layer(ex, scheme, name, lin.dtype, act_scales.get(name),
                          in_scales.get(name), storage, backend)
      w_hat = layer.dequantized()
      if name in in_scales:
        w_hat = w_hat / in_scales[name][:, None]
      _set(qmodel, path, layer)
      report["layers"][name] = {
          "scheme": scheme.label, "method": method, "params": counts.get(name, 0),
          "storage": type(layer).__name__,
          "weight_rel_error": float(jnp.linalg.norm(w_hat - w) / jnp.linalg.norm(w))}
  for name, (path, scheme) in selected.items():
    if isinstance(scheme, Fp8Scheme):
      from jaxsun.nn.fp8_linear import Fp8Linear  # pylint: disable=g-import-not-at-top
      _set(qmodel, path, Fp8Linear.from_linear(_get(model, path), mode=scheme.mode,
                                               history=scheme.history))
      report["layers"][name] = {"scheme": scheme.label, "method": "fp8"}
    elif isinstance(scheme, CodebookScheme):
      from jaxsun.quant import codebook  # pylint: disable=g-import-not-at-top
      from jaxsun.quant.layers import CodebookLinear  # pylint: disable=g-import-not-at-top
      lin = _get(model, path)
      fmt = scheme.format()
      cfg = codebook.QuantizerConfig() if scheme.cfg is None else scheme.cfg
      qw, history = codebook.quantize_linear(lin.kernel[...], inputs[name], fmt, cfg)
      _set(qmodel, path, CodebookLinear(qw, dtype=lin.dtype, backend=scheme.backend))
      report["layers"][name] = {"scheme": scheme.label, "method": "codebook",
                                "history": history}
  report["seconds"] = time.perf_counter() - t0
  return qmodel, report


def _int_exports(model, int_layers, method, method_options, calib_tokens, recon, inputs,
                 act_scales, report, log, opts):
  """{name: export}, {name: input scale}, {name: learnable params} for integer rules."""
  in_scales, counts = {}, {}
  if method in methods_lib.CALIBRATED:
    from jaxsun.quant import qwix_adapter  # pylint: disable=g-import-not-at-top
    exports = {}
    for name, (path, scheme) in int_layers.items():
      w = jnp.asarray(_get(model, path).kernel[...], jnp.float32)
      x = inputs[name]
      if method == "gptq":  # symmetric: qwix's GPTQ supports no other grid
        int_layers[name] = (path, dataclasses.replace(
            scheme, weight=qwix_adapter.gptq_scheme(scheme.weight)))
        exports[name] = methods_lib.UniformWeight(*qwix_adapter.gptq(w, x, scheme.weight, **opts))
      elif method == "awq":
        ex, s = qwix_adapter.awq(w, x, scheme.weight, **opts)
        exports[name], in_scales[name] = methods_lib.UniformWeight(*ex), s
      else:  # smoothquant: migrate, then RTN on the scaled weight
        s = qwix_adapter.smoothquant_scales(x, w, **opts)
        ws = w * s[:, None]
        scale, zero = quantizers.rtn_params(ws, scheme.weight)
        exports[name] = methods_lib.UniformWeight(
            quantizers.quantize(ws, scale, zero, scheme.weight), scale, zero)
        in_scales[name] = s
        if name in act_scales:  # static scales of the migrated activations x / s
          act_scales[name] = qlinear.static_scale(x / s, scheme.act)
    return exports, in_scales, counts
  m = methods_lib.make(method, **(method_options or {}))
  if m.trainable:
    from jaxsun.quant.ptq import reconstruct  # pylint: disable=g-import-not-at-top
    cfg = reconstruct.ReconConfig() if recon is None else recon
    exports, rec = reconstruct.reconstruct(
        model, {n: s for n, (_, s) in int_layers.items()}, m, calib_tokens, cfg,
        act_scales=act_scales, log=log)
    report["reconstruction"] = rec["blocks"]
    return exports, in_scales, rec["params"]
  exports = {}
  for name, (path, scheme) in int_layers.items():
    w = jnp.asarray(_get(model, path).kernel[...], jnp.float32)
    params, state = m.init(w, scheme.weight, jax.random.key(0))
    exports[name] = m.export(w, params, state, scheme.weight)
  return exports, in_scales, counts


def _make_layer(export, scheme: IntScheme, name: str, dtype, act_scale, in_scale,
                storage: str, backend: str):
  kv = _kv(name, scheme)
  if isinstance(export, methods_lib.UniformWeight):
    layer = qlinear.IntLinear(export.codes, export.scale, export.zero, scheme, dtype=dtype,
                              act_scale=act_scale, in_scale=in_scale, kv=kv)
    return qlinear.uniform_to_bcq_linear(layer, backend) if storage == "bcq" else layer
  if storage == "int":
    raise ValueError(f"storage='int' but layer {name} has a non-uniform (BCQ) weight")
  return qlinear.BCQLinear(export, dtype=dtype, act=scheme.act, kv=kv, act_scale=act_scale,
                           in_scale=in_scale, backend=backend)


def to_bcq(model: nnx.Module, backend: str = "auto") -> nnx.Module:
  """A copy of `model` with every `IntLinear` converted exactly to a `BCQLinear`."""
  out = nnx.clone(model)
  for path, m in list(nnx.iter_modules(out)):
    if isinstance(m, qlinear.IntLinear):
      _set(out, path, qlinear.uniform_to_bcq_linear(m, backend))
  return out


def quantize_split(split, rules, *, tree: str = "decode", **kw):
  """`quantize` applied to one tree of a `jaxsun.split.SplitModel`.

  Args:
    split: the model (an untied SUN task model, or a base model: then the decode tree is
      untied from the prefill tree first).
    rules: as `quantize`.
    tree: "decode" (QSUN: the shared decode module) or "prefill".
    **kw: `quantize`'s keyword arguments (calibration runs the tree's own module).

  Returns:
    (SplitModel with that tree quantized, report).
  """
  from jaxsun import split as split_lib  # pylint: disable=g-import-not-at-top
  if tree not in ("decode", "prefill"):
    raise ValueError(f"tree={tree!r} must be 'decode' or 'prefill'")
  split = split_lib.check_split(split).untie()
  prefill, decode = split.prefill_module(), split.decode_module()
  if tree == "decode":
    decode, report = quantize(decode, rules, **kw)
  else:
    prefill, report = quantize(prefill, rules, **kw)
  gd_p, st_p = nnx.split(prefill)
  gd_d, st_d = nnx.split(decode)
  # The quantized tree has its own graph (quantized layers), as LoRA trees do.
  out = split_lib.SplitModel(graphdef=gd_p, prefill=st_p, decode=st_d,
                             last_prompt_token=split.last_prompt_token,
                             decode_graphdef=None if gd_d == gd_p else gd_d)
  return out, report
