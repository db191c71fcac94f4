"""Post-training quantization: pure quantizer functions, the methods built on them, and
the block-reconstruction driver (`jaxsun.quant.api.quantize` is the model-level entry).

    jaxsun.quant.ptq.quantizers   RTN, FlexRound and LRQ uniform weight quantizers
    jaxsun.quant.ptq.bcq          binary-coding quantization: format, exact uniform -> BCQ
                                  conversion, alternating solver, LUT-GEMM-style reference
    jaxsun.quant.ptq.uniquanf     UniQuanF: unified init, local/periodic mapping, export
    jaxsun.quant.ptq.methods      rtn / flexround / lrq / uniquanf / bcq as one protocol
    jaxsun.quant.ptq.reconstruct  block-output reconstruction (Adam + cosine, one jit)
"""

from jaxsun.quant.ptq.quantizers import (
    FlexRoundParams,
    LRQParams,
    UniformScheme,
    dequantize,
    fake_quant,
    flexround_init,
    flexround_quant,
    lrq_init,
    lrq_quant,
    num_params,
    quantize,
    rtn_params,
)
from jaxsun.quant.ptq import bcq  # noqa: F401  (its dequantize differs from the uniform one)
