"""`CodebookLinear` and `quantize_model`: codebook-quantize a jaxsun model's dense layers.

`quantize_model` is the codebook rule of `jaxsun.quant.api.quantize`, kept under its
name; `capture_inputs` is the calibration pass every rule uses.

    qmodel, report = quantize_model(model, calib_tokens, pattern=r"layers/\\d+/(attn|mlp)/.*",
                                    fmt=CodebookFormat.parse("m1v4g128"))

Layers are chosen by a regular expression on their path ("layers/0/mlp/up_proj"),
calibrated on the inputs they see when the float model runs `calib_tokens`, quantized
with `jaxsun.quant.codebook.quantize_linear`, and replaced in place of a copy of the
model by a `CodebookLinear`, which computes `x @ W` with
`pallas_kernels.psumbook_gemm.psumbook_matmul` (Psumbook lookups for decode batches,
dequantize-then-matmul for prefill).

Patterns address the unrolled layout ("layers/<i>/..."). A scanned Decoder
(`ModelConfig.scan_layers`) is quantized in the unrolled layout and stacked again, so a
pattern keeps its per-layer meaning (it must then select the same layers of every block).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun.nn.layers import Linear
from jaxsun.quant import codebook
from pallas_kernels.psumbook_gemm import CodebookFormat, QuantizedWeight, psumbook_matmul


class Codes(nnx.Variable):
  """Integer codes of a codebook layer (not trained by gradient descent)."""


class CodebookLinear(nnx.Module):
  """A drop-in `Linear` whose weight is a `QuantizedWeight`.

  Args:
    weight: the quantized `[in, out]` weight.
    dtype: compute dtype of the output (as `Linear`'s).
    backend: `psumbook_matmul` backend ("auto" picks by platform and batch).
  """

  def __init__(self, weight: QuantizedWeight, *, dtype=jnp.float32, backend: str = "auto"):
    self.codebooks = nnx.Param(jnp.asarray(weight.codebooks))
    self.codes = Codes(jnp.asarray(weight.codes))
    self.scales = nnx.Param(jnp.asarray(weight.scales))
    self.in_features, self.out_features = weight.shape
    self.dtype = jnp.dtype(dtype)
    self.backend = backend

  @property
  def weight(self) -> QuantizedWeight:
    return QuantizedWeight(self.codebooks[...], self.codes[...], self.scales[...])

  def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:  # [..., in] -> [..., out]
    out_dtype = self.dtype if out_dtype is None else out_dtype
    lead = x.shape[:-1]
    y = psumbook_matmul(x.reshape(-1, self.in_features), self.weight, backend=self.backend)
    return y.reshape(*lead, self.out_features).astype(out_dtype)


def _scanned(model) -> bool:
  return bool(getattr(getattr(model, "cfg", None), "scan_layers", False))


def select_linears(model: nnx.Module, pattern: str) -> dict[str, tuple]:
  """{"layers/0/mlp/up_proj": path} of the `Linear`s whose path matches `pattern`.

  Paths are those of `model`'s own layout; `quantize_model` unstacks a scanned Decoder
  first, so its patterns use the per-layer paths.
  """
  regex = re.compile(pattern)
  found = {"/".join(map(str, path)): path for path, mod in nnx.iter_modules(model)
           if isinstance(mod, Linear) and regex.fullmatch("/".join(map(str, path)))}
  if not found:
    names = ["/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, Linear)]
    hint = (" (a scanned Decoder: unstack it with jaxsun.nn.decoder.unstack_layers for "
            "per-layer paths)" if _scanned(model) else "")
    raise ValueError(f"pattern {pattern!r} matches no Linear layer; layers: "
                     f"{names[:8]}...{hint}")
  return found


class _Recorder:
  """Wraps a Linear's call to keep the inputs it sees (eager calibration pass)."""

  def __init__(self, inputs: list):
    self.inputs = inputs

  def __call__(self, module, x, out_dtype=None):
    self.inputs.append(jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1]))
    return Linear.__call__(module, x, out_dtype)


def capture_inputs(model: nnx.Module, tokens: jax.Array, paths: dict[str, tuple]
                   ) -> dict[str, jax.Array]:
  """The inputs each selected Linear sees when `model` runs `tokens` (train mode)."""
  store = {name: [] for name in paths}
  recorders = {}
  for name, path in paths.items():
    mod = model
    for p in path:
      mod = mod[p] if isinstance(p, int) else getattr(mod, p)
    recorders[name] = mod
    rec = _Recorder(store[name])
    # A per-instance subclass records calls; restored below.
    mod.__class__ = type("Recording" + type(mod).__name__, (type(mod),),
                         {"__call__": lambda self, x, out_dtype=None, _r=rec: _r(self, x,
                                                                             out_dtype)})
  # The recorders keep concrete values: no tracing under `jax.checkpoint` (remat).
  cfg = getattr(model, "cfg", None)
  if getattr(cfg, "remat", "none") != "none":
    model.cfg = cfg.replace(remat="none")
  try:
    model(tokens)
  finally:
    for mod in recorders.values():
      mod.__class__ = Linear
    if cfg is not None:
      model.cfg = cfg
  return {name: jnp.concatenate(xs, axis=0) for name, xs in store.items()}


def quantize_model(model: nnx.Module, calib_tokens: jax.Array, *, pattern: str,
                   fmt: CodebookFormat, cfg: codebook.QuantizerConfig = codebook.QuantizerConfig(),
                   backend: str = "auto") -> tuple[nnx.Module, dict]:
  """A copy of `model` with the matching Linears codebook-quantized; returns (model, report).

  The codebook rule of `jaxsun.quant.api.quantize` (`Rule(pattern, CodebookScheme(...))`)
  under its historical name. The report maps each layer to its relative output error
  after initialisation and after each quantizer round. A scanned Decoder is quantized in
  the unrolled layout (per-layer calibration inputs, per-layer `pattern`) and returned
  scanned.
  """
  from jaxsun.quant import api  # pylint: disable=g-import-not-at-top  (api imports this module)
  from jaxsun.quant.schemes import CodebookScheme  # pylint: disable=g-import-not-at-top
  rule = api.Rule(pattern, CodebookScheme(fmt, cfg, backend))
  select_linears(decoder_unrolled(model), pattern)  # the historical error for no match
  qmodel, report = api.quantize(model, [rule], calib_tokens=calib_tokens)
  return qmodel, {name: entry["history"] for name, entry in report["layers"].items()}


def decoder_unrolled(model: nnx.Module) -> nnx.Module:
  """`model` in the unrolled layout (per-layer paths), unstacking a scanned Decoder."""
  if not _scanned(model):
    return model
  from jaxsun.nn import decoder  # pylint: disable=g-import-not-at-top  (cycle via fp8)
  return decoder.unstack_layers(model)
