"""Quantization: one rule-based interface over integer (qwix), FP8, codebook and learned
(FlexRound / LRQ / UniQuanF / BCQ) weights.

    jaxsun.quant.api           Rule(path regex, scheme), quantize, quantize_split, to_bcq
    jaxsun.quant.schemes       IntScheme (w8a8, w4a8, w4a16, w3a16, w2a16), Fp8Scheme,
                               CodebookScheme
    jaxsun.quant.qlinear       SimLinear, IntLinear (qwix QArray), BCQLinear
    jaxsun.quant.qwix_adapter  everything taken from qwix (pinned), incl. GPTQ / AWQ / SQ
    jaxsun.quant.ptq           quantizers, BCQ, UniQuanF, methods, block reconstruction
    jaxsun.quant.fp8           FP8 formats, block scales, current and delayed scaling
    jaxsun.quant.float_sim     any ExMy format simulated in float32
    jaxsun.quant.masked_gemm   training with ExMy-masked GEMM operands, forward and backward
    jaxsun.quant.codebook      the codebook quantizer and an RTN baseline
    jaxsun.quant.layers        CodebookLinear, quantize_model (the codebook rule)
"""
