"""Quantization schemes: what a rule turns a dense layer into.

    IntScheme     integer weights (RTN, GPTQ, AWQ, FlexRound, LRQ; UniQuanF / BCQ store
                  them as binary codes), optional activation and KV quantization
    Fp8Scheme     `jaxsun.nn.fp8_linear.Fp8Linear` ("current" inference, "delayed" training)
    CodebookScheme  `jaxsun.quant.layers.CodebookLinear` (Psumbook GEMM)

The papers' schemes are presets of `IntScheme` (`parse_scheme`):

    "w8a8"    8-bit per-channel symmetric weights, 8-bit per-tensor *static* activations
    "w4a8"    4-bit per-channel asymmetric weights, 8-bit per-token activations and
              8-bit K/V projections (the LRQ code's "W4A8" is W4A8KV8)
    "w8a16", "w4a16", "w3a16", "w2a16"   weight-only, per channel; "w4a16g128" adds
              groups of 128
"""

from __future__ import annotations

import dataclasses
import re

from jaxsun.quant.ptq.quantizers import UniformScheme

ACT_GRANULARITIES = ("token", "tensor")


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """Fake quantization of a layer's input (or output) activations.

  Attributes:
    bits: integer width, in [2, 16].
    granularity: "token" (one range per row, dynamic) or "tensor" (one range for the
      whole tensor).
    symmetric: absmax (True) or min/max with a zero point (False).
    static: the per-tensor range is calibrated once and stored in the layer (W8A8);
      False computes it from each tensor (dynamic). Per-token ranges are always dynamic.
  """

  bits: int = 8
  granularity: str = "token"
  symmetric: bool = False
  static: bool = False

  def __post_init__(self):
    if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
      raise ValueError(f"ActQuant.bits={self.bits!r} must be an int in [2, 16]")
    if self.granularity not in ACT_GRANULARITIES:
      raise ValueError(f"ActQuant.granularity={self.granularity!r} is not one of "
                       f"{ACT_GRANULARITIES}")
    if self.static and self.granularity != "tensor":
      raise ValueError("ActQuant.static=True needs granularity='tensor' (per-token "
                       "ranges are dynamic)")


@dataclasses.dataclass(frozen=True)
class IntScheme:
  """Integer weights, optionally with quantized activations and K/V projections.

  Attributes:
    weight: the weight grid (bits, group size, symmetric).
    act: input-activation quantization, or None (weight-only).
    kv: quantization of the outputs of `k_proj` / `v_proj` (the K/V cache entries), or
      None; applied only to layers whose path ends in one of `kv_layers`.
    name: a label for reports.
  """

  weight: UniformScheme
  act: ActQuant | None = None
  kv: ActQuant | None = None
  name: str = ""

  def __post_init__(self):
    if not isinstance(self.weight, UniformScheme):
      raise TypeError(f"IntScheme.weight must be a UniformScheme, got {self.weight!r}")

  @property
  def label(self) -> str:
    if self.name:
      return self.name
    w = self.weight
    g = "" if w.group_size is None else f"g{w.group_size}"
    a = "16" if self.act is None else str(self.act.bits)
    return f"w{w.bits}a{a}{g}" + ("" if self.kv is None else f"kv{self.kv.bits}")


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
  """FP8 matmuls (`Fp8Linear`): "current" (inference) or "delayed" (training) scaling."""

  mode: str = "current"
  history: int = 16

  def __post_init__(self):
    if self.mode not in ("current", "delayed"):
      raise ValueError(f"Fp8Scheme.mode={self.mode!r} must be 'current' or 'delayed'")
    if not isinstance(self.history, int) or self.history < 1:
      raise ValueError(f"Fp8Scheme.history={self.history!r} must be a positive int")

  @property
  def label(self) -> str:
    return f"fp8-{self.mode}"


@dataclasses.dataclass(frozen=True)
class CodebookScheme:
  """Codebook (AQLM-style) weights run by the Psumbook GEMM.

  Attributes:
    fmt: a `pallas_kernels.psumbook_gemm.CodebookFormat` or its name ("m1v4g128").
    cfg: a `jaxsun.quant.codebook.QuantizerConfig` (None: its defaults).
    backend: the `psumbook_matmul` backend.
  """

  fmt: object = "m1v4g128"
  cfg: object = None
  backend: str = "auto"

  def format(self):
    from pallas_kernels.psumbook_gemm import CodebookFormat  # pylint: disable=g-import-not-at-top
    return self.fmt if isinstance(self.fmt, CodebookFormat) else CodebookFormat.parse(self.fmt)

  @property
  def label(self) -> str:
    return f"codebook-{self.format().name}"


Scheme = IntScheme | Fp8Scheme | CodebookScheme

_PER_TOKEN8 = ActQuant(bits=8, granularity="token", symmetric=False)
PRESETS = {
    "w8a8": lambda g: IntScheme(UniformScheme(8, g, symmetric=True),
                                act=ActQuant(8, "tensor", symmetric=True, static=True)),
    "w4a8": lambda g: IntScheme(UniformScheme(4, g), act=_PER_TOKEN8, kv=_PER_TOKEN8),
    "w8a16": lambda g: IntScheme(UniformScheme(8, g)),
    "w4a16": lambda g: IntScheme(UniformScheme(4, g)),
    "w3a16": lambda g: IntScheme(UniformScheme(3, g)),
    "w2a16": lambda g: IntScheme(UniformScheme(2, g)),
}
_NAME = re.compile(r"(w\da\d+)(?:g(\d+))?")


def parse_scheme(scheme: str | Scheme, field: str = "scheme") -> Scheme:
  """A scheme object from a preset name ("w4a16", "w3a16g64", "fp8", "codebook:m1v4g128").

  Args:
    scheme: a name or a scheme object (returned as is).
    field: the config field named in errors.
  """
  if isinstance(scheme, (IntScheme, Fp8Scheme, CodebookScheme)):
    return scheme
  if not isinstance(scheme, str):
    raise ValueError(f"{field}={scheme!r} must be a scheme name or object")
  if scheme in ("fp8", "fp8-current"):
    return Fp8Scheme("current")
  if scheme == "fp8-delayed":
    return Fp8Scheme("delayed")
  if scheme.startswith("codebook:"):
    return CodebookScheme(scheme.split(":", 1)[1])
  m = _NAME.fullmatch(scheme)
  if m is None or m.group(1) not in PRESETS:
    raise ValueError(f"{field}={scheme!r} is not a known scheme: one of "
                     f"{sorted(PRESETS)} (optionally with g<group>, e.g. 'w4a16g128'), "
                     f"'fp8', 'fp8-delayed' or 'codebook:<format>'")
  group = None if m.group(2) is None else int(m.group(2))
  if group is not None and group < 1:
    raise ValueError(f"{field}={scheme!r}: the group size must be positive")
  s = PRESETS[m.group(1)](group)
  return dataclasses.replace(s, name=scheme)
