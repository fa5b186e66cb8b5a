"""llm_bsm_kernel: bundled scaled matmul, many independent `scale * A @ B` at once across all cores.

Example:
    >>> import numpy as np, llm_bsm_kernel as bk
    >>> x, w = np.ones((256, 896), np.float32), np.ones((128, 896), np.float32)
    >>> k, scores = bk.bsm([(x, w.T, 1.0), (x, x, 0.125, "nt")])
    >>> bk.backend()  # 'openblas', 'mkl', 'torch' or 'fallback'
    'openblas'
"""

from .blas import backend, backend_info
from .bundled import bsm
from .quant_gemv import int4_matmul, int8_matmul, int8_matmul_reference, prepare_int4_scales, quant_gemv_isa

__version__ = "0.3.0"
__all__ = [
    "__version__",
    "backend",
    "backend_info",
    "bsm",
    "int4_matmul",
    "int8_matmul",
    "int8_matmul_reference",
    "prepare_int4_scales",
    "quant_gemv_isa",
]
