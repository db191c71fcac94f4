"""Psumbook GEMM (CodeGEMM): codebook-quantized matmuls without dequantization.

    from pallas_kernels import psumbook_gemm as pg
    fmt = pg.CodebookFormat.parse("m1v4g128")
    w = pg.random_quantized(key, fmt, k=4096, n=14336)
    y = pg.psumbook_matmul(x, w)               # lookups for decode, dequant for prefill
    y_ref = pg.dequant_matmul_reference(x, w)

Depends on jax only.
"""

from pallas_kernels.psumbook_gemm.format import (BACKEND_SUPPORT, CodebookFormat,
                                                 QuantizedWeight, random_quantized,
                                                 validate)
from pallas_kernels.psumbook_gemm.kernel import (AUTO_TABLE, BACKEND_ALIASES, BACKENDS,
                                                 Tiles, choose_backend,
                                                 dequant_matmul,
                                                 dequant_matmul_reference,
                                                 dequantize_reference, psumbook,
                                                 psumbook_matmul, psumbook_matmul_reference)

__all__ = [
    "BACKEND_SUPPORT", "CodebookFormat", "QuantizedWeight", "random_quantized", "validate",
    "AUTO_TABLE", "BACKEND_ALIASES", "BACKENDS", "Tiles", "choose_backend", "dequant_matmul",
    "dequant_matmul_reference",
    "dequantize_reference", "psumbook", "psumbook_matmul", "psumbook_matmul_reference",
]
