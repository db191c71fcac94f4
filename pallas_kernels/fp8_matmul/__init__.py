"""FP8 matmul kernels: y = (qa * sa) @ (qb * sb) + bias with float32 accumulation.

    from pallas_kernels import fp8_matmul as fm
    y = fm.fp8_matmul(qa, sa, qb, sb, out_dtype=jnp.bfloat16)   # backend by platform
    y_ref = fm.fp8_matmul_reference(qa, sa, qb, sb)

Depends on jax only. Quantizing (formats, scales) is `jaxsun.quant.fp8`.
"""

from pallas_kernels.fp8_matmul.kernel import (AUTO_TABLE, BACKENDS, FP8_DTYPES, AutoQuery,
                                              Tiles, backend_takes, check_bias,
                                              choose_backend, fp8_matmul,
                                              fp8_matmul_pallas, fp8_matmul_reference,
                                              fp8_matmul_xla, scale_mode)

__all__ = ["AUTO_TABLE", "AutoQuery", "BACKENDS", "FP8_DTYPES", "Tiles", "backend_takes",
           "check_bias", "choose_backend", "fp8_matmul",
           "fp8_matmul_pallas", "fp8_matmul_reference", "fp8_matmul_xla", "scale_mode"]
