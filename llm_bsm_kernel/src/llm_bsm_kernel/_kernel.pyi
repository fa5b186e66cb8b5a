"""Type stub of the compiled OpenMP core (`_kernel.pyx`); see that file for the documentation."""

from typing import Any

TASKS_PER_THREAD: list[int]
MIN_TASK_FLOPS: list[float]

def openmp() -> bool: ...
def max_threads() -> int: ...
def openmp_runtime() -> str: ...
def set_blas(sgemm: int, dgemm: int, mkl_local: int, get_threads: int, set_threads: int) -> None: ...
def set_torch(
    from_blob: int,
    delete: int,
    addmm: int,
    baddbmm: int,
    f32: int,
    f64: int,
    bf16: int,
    cpu: int,
) -> None: ...
def set_route(dtype: int, route: int) -> None: ...
def last_run_stats() -> dict[str, Any]: ...
def plain_records(items: Any) -> tuple[list[tuple[Any, ...]], list[Any]] | None: ...
def run(records: list[tuple[Any, ...]], num_threads: int) -> None: ...
def quant_have_avx2() -> bool: ...
def int4_gemv(
    isa: int,
    layout: int,
    bn: int,
    M: int,
    N: int,
    K: int,
    g: int,
    x: int,
    x_bf16: int,
    q: int,
    sz: int,
    sz_bf16: int,
    y: int,
    nthreads: int,
) -> None: ...
def int8_gemv(
    isa: int, M: int, N: int, K: int, x: int, x_bf16: int, q: int, scales: int, y: int, nthreads: int, xblock: int
) -> None: ...
