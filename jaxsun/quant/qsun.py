"""QSUN: SUN's shared decode module in low bit.

SUN fine-tunes only the prefill tree of each task model, so every task model decodes
with the same frozen base tree. QSUN quantizes that shared tree once, with any rule set
of `jaxsun.quant.api` (integer schemes and their methods, FP8, codebook), and attaches it
to every task model:

    qdecode, report = shared_decode(base, [(ALL_LINEARS, "w4a16g32")], method="awq",
                                    calib_tokens=calib)
    task_q = attach(task_model, qdecode)          # prefill tree untouched

Optionally the prefill tree is then fine-tuned against the quantized decode tree
(quantization-aware prefill training, `qa_base`): the task model learns to write the KV
cache the quantized decoder reads best. The SUN paper does not say whether it does this.
"""

from __future__ import annotations

from flax import nnx

from jaxsun import split as split_lib
from jaxsun.quant import api

ALL_LINEARS = r"layers/\d+/(attn|mlp)/.*"


def shared_decode(base: split_lib.SplitModel, rules, **quantize_kw):
  """The quantized shared decode module of `base` (its decode tree; the prefill tree
  when tied) and `api.quantize`'s report."""
  return api.quantize(split_lib.check_split(base, "base").decode_module(), rules,
                      **quantize_kw)


def attach(task: split_lib.SplitModel, decode_module: nnx.Module) -> split_lib.SplitModel:
  """`task` with its decode tree replaced by `decode_module` (the prefill tree is kept).

  A tied task model (a base model, or full fine-tuning) is untied first: its own tree
  keeps running the prompt.
  """
  task = split_lib.check_split(task, "task").untie()
  gd, state = nnx.split(decode_module)
  return task.replace(decode=state, decode_graphdef=None if gd == task.graphdef else gd)


def qa_base(base: split_lib.SplitModel, decode_module: nnx.Module) -> split_lib.SplitModel:
  """The starting point of quantization-aware prefill fine-tuning: `base`'s prefill
  tree (trainable in the "prefill" regime) with the quantized decode tree (frozen)."""
  return attach(base, decode_module)


def weight_bytes(module: nnx.Module) -> dict:
  """Bytes of the dense layers' weights a decode step reads, by storage kind.

  Integer codes count at their scheme's bit width (what a packed low-bit kernel reads;
  qwix stores 2- and 3-bit codes as int4), BCQ codes at one bit per plane, scales /
  offsets / float kernels at their dtype.
  """
  from jaxsun.nn.layers import Linear  # pylint: disable=g-import-not-at-top
  from jaxsun.quant import qlinear  # pylint: disable=g-import-not-at-top
  out = {"float": 0, "quantized": 0}
  for _, m in nnx.iter_modules(module):
    if type(m) is Linear:
      out["float"] += m.kernel[...].nbytes
    elif isinstance(m, qlinear.IntLinear):
      bits = m.weight_scheme.bits  # as a packed kernel reads them (qwix stores int4/int8)
      n = m.qvalue[...].size * bits // 8 + m.scale[...].nbytes
      n += 0 if m.zero_point is None else m.zero_point[...].size * bits // 8
      out["quantized"] += n
    elif isinstance(m, qlinear.BCQLinear):
      out["quantized"] += m.b[...].size // 8 + m.alpha[...].nbytes + m.offset[...].nbytes
  out["total"] = out["float"] + out["quantized"]
  return out
