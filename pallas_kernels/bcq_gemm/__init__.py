"""BCQ GEMM (LUT-GEMM's binary-coding-quantized weights): `y = x @ W_hat` without a dense W.

    from pallas_kernels import bcq_gemm as bq
    w = bq.pack(b, alpha, offset)            # i8[bits, K, N] codes -> u32[bits, K/32, N]
    y = bq.bcq_matmul(x, w)                  # "lut"/"dequant" (TPU), "mosaic" (Hopper)
    y_ref = bq.bcq_matmul_reference(x, w)

Depends on jax only (the unpacked codes come from e.g. `jaxsun.quant.ptq.bcq.BCQWeight`).
"""

from pallas_kernels.bcq_gemm.kernel import (BACKENDS, MAX_LUT_BATCH, PackedBCQ, Tiles,
                                            bcq_matmul, bcq_matmul_reference,
                                            dequant_matmul, dequantize_reference,
                                            lut_matmul, lut_reference, lut_tables, pack,
                                            random_bcq, unpack, validate)

__all__ = ["BACKENDS", "MAX_LUT_BATCH", "PackedBCQ", "Tiles", "bcq_matmul",
           "bcq_matmul_reference", "dequant_matmul", "dequantize_reference", "lut_matmul",
           "lut_reference", "lut_tables", "pack", "random_bcq", "unpack", "validate"]
