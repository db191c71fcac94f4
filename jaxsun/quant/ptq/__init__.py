"""Post-training quantization: pure quantizer functions (the block-reconstruction
driver and the model-level interface build on them).

    jaxsun.quant.ptq.quantizers   RTN, FlexRound and LRQ uniform weight quantizers
    jaxsun.quant.ptq.bcq          binary-coding quantization: format, exact uniform -> BCQ
                                  conversion, alternating solver, LUT-GEMM-style reference
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
