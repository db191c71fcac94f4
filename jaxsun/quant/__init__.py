"""Quantization: FP8 formats and scaling, low-bit float simulation, and codebook
(AQLM-style) quantization of linear layers for the Psumbook GEMM.

    jaxsun.quant.fp8          FP8 formats, block scales, current and delayed scaling
    jaxsun.quant.float_sim    any ExMy format simulated in float32
    jaxsun.quant.codebook     the codebook quantizer and an RTN baseline
    jaxsun.quant.layers       CodebookLinear, quantize_model
"""
