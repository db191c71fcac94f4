"""PTQ methods as quantizer objects: what the block-reconstruction driver is handed.

A method maps a float kernel `W: f32[in, out]` and a `UniformScheme` (bits, group,
symmetric) to learnable parameters, a fake-quantized weight, and an export:

    init(w, scheme, key)                  -> (params, state)
    apply(w, params, state, scheme, step) -> (w_hat f32[in, out], state)
    export(w, params, state, scheme)      -> UniformWeight | bcq.BCQWeight
    labels(params)                        -> the optimizer group of each leaf ("u" / "b")

`params` are trained by the driver (Adam, cosine decay); `state` is carried, not trained
(UniQuanF's level indices for local / periodic mapping). Methods without training
(`trainable = False`: RTN, alternating BCQ) are exported directly.

    rtn         round to nearest (min/max or absmax grid)
    flexround   FlexRound: learnable grid scale + element-wise divisor (log space)
    lrq         LRQ: FlexRound with the element-wise matrix replaced by rank-r + vectors
    uniquanf    UniQuanF: FlexRound's transformation + BCQ's non-uniform levels
    bcq         alternating BCQ (Xu et al. 2018), no reconstruction
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax

from jaxsun.quant.ptq import bcq
from jaxsun.quant.ptq import quantizers as q
from jaxsun.quant.ptq.quantizers import UniformScheme


class UniformWeight(NamedTuple):
  """An integer weight `scale * (codes - zero)` (codes [in, out], scale/zero [in//g, out])."""

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array


@dataclasses.dataclass(frozen=True)
class RTN:
  """Round to nearest: nothing to learn."""

  name = "rtn"
  trainable = False
  nonuniform = False

  def init(self, w, scheme, key):
    del w, scheme, key
    return (), ()

  def apply(self, w, params, state, scheme, step):
    del params, step
    return q.fake_quant(w, *q.rtn_params(w, scheme), scheme), state

  def export(self, w, params, state, scheme) -> UniformWeight:
    del params, state
    scale, zero = q.rtn_params(w, scheme)
    return UniformWeight(q.quantize(w, scale, zero, scheme), scale, zero)

  def labels(self, params):
    return jax.tree.map(lambda _: "u", params)


@dataclasses.dataclass(frozen=True)
class FlexRound:
  """FlexRound (Lee et al. 2023). `input_scale` adds the per-input-channel divisor s4."""

  input_scale: bool = False
  name = "flexround"
  trainable = True
  nonuniform = False

  def init(self, w, scheme, key):
    del key
    return q.flexround_init(w, scheme, self.input_scale), ()

  def apply(self, w, params, state, scheme, step):
    del step
    return q.flexround_quant(w, params, scheme), state

  def export(self, w, params, state, scheme) -> UniformWeight:
    del state
    return UniformWeight(*q.flexround_export(w, params, scheme))

  def labels(self, params):
    return jax.tree.map(lambda _: "u", params)


@dataclasses.dataclass(frozen=True)
class LRQ:
  """LRQ (Lee et al. 2025); `rank` is clipped to min(in, out) of each weight."""

  rank: int = 1024
  name = "lrq"
  trainable = True
  nonuniform = False

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LRQ.rank={self.rank!r} must be a positive int")

  def init(self, w, scheme, key):
    return q.lrq_init(w, scheme, min(self.rank, *w.shape), key), ()

  def apply(self, w, params, state, scheme, step):
    del step
    return q.lrq_quant(w, params, scheme), state

  def export(self, w, params, state, scheme) -> UniformWeight:
    del state
    return UniformWeight(*q.lrq_export(w, params, scheme))

  def labels(self, params):
    return jax.tree.map(lambda _: "u", params)


@dataclasses.dataclass(frozen=True)
class UniQuanF:
  """UniQuanF (Park et al. 2025); the official defaults (`jaxsun.quant.ptq.uniquanf`).

  The scheme's `symmetric` is ignored: UniQuanF's transformation is asymmetric.
  """

  mapping: str = "lpmapping"
  period: int = 2
  alternating_rounds: int = 15
  grad_filter: bool = True
  name = "uniquanf"
  trainable = True
  nonuniform = True

  def config(self, scheme: UniformScheme):
    from jaxsun.quant.ptq import uniquanf  # pylint: disable=g-import-not-at-top
    return uniquanf.UniQuanFConfig(bits=scheme.bits, group_size=scheme.group_size,
                                   mapping=self.mapping, period=self.period,
                                   alternating_rounds=self.alternating_rounds,
                                   grad_filter=self.grad_filter)

  def init(self, w, scheme, key):
    del key
    from jaxsun.quant.ptq import uniquanf  # pylint: disable=g-import-not-at-top
    return uniquanf.uniquanf_init(w, self.config(scheme))

  def apply(self, w, params, state, scheme, step):
    from jaxsun.quant.ptq import uniquanf  # pylint: disable=g-import-not-at-top
    return uniquanf.uniquanf_quant(w, params, state, self.config(scheme), step)

  def export(self, w, params, state, scheme) -> bcq.BCQWeight:
    from jaxsun.quant.ptq import uniquanf  # pylint: disable=g-import-not-at-top
    return uniquanf.uniquanf_export(w, params, state, self.config(scheme))

  def labels(self, params):
    from jaxsun.quant.ptq import uniquanf  # pylint: disable=g-import-not-at-top
    return uniquanf.param_labels(params)


@dataclasses.dataclass(frozen=True)
class AlternatingBCQ:
  """Alternating BCQ (Xu et al. 2018): a weight-only solver, no reconstruction."""

  rounds: int = 15
  name = "bcq"
  trainable = False
  nonuniform = True

  def _solve(self, w, scheme):
    return bcq.bcq_alternating(w, scheme.bits, scheme.group(w.shape[0]), self.rounds)

  def init(self, w, scheme, key):
    del w, scheme, key
    return (), ()

  def apply(self, w, params, state, scheme, step):
    del params, step
    return bcq.dequantize(self._solve(w, scheme)), state

  def export(self, w, params, state, scheme) -> bcq.BCQWeight:
    del params, state
    return self._solve(w, scheme)

  def labels(self, params):
    return jax.tree.map(lambda _: "u", params)


METHODS = {"rtn": RTN, "flexround": FlexRound, "lrq": LRQ, "uniquanf": UniQuanF,
           "bcq": AlternatingBCQ}
# Methods that need no reconstruction but calibration inputs (qwix's algorithms).
CALIBRATED = ("gptq", "awq", "smoothquant")


def make(method: str | Any, field: str = "method", **kw) -> Any:
  """A method object from its name (`METHODS`) and keyword options (e.g. rank=64)."""
  if not isinstance(method, str):
    return method
  if method not in METHODS:
    raise ValueError(f"{field}={method!r} is not one of {sorted(METHODS) + list(CALIBRATED)}")
  return METHODS[method](**kw)


def num_params(params) -> int:
  """Learnable scalars in a method's parameters."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def weight_of(export: UniformWeight | bcq.BCQWeight, scheme: UniformScheme) -> jax.Array:
  """f32[in, out] weight an export stands for."""
  if isinstance(export, bcq.BCQWeight):
    return bcq.dequantize(export)
  return q.dequantize(export.codes, export.scale, export.zero, scheme)
