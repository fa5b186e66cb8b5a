# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""OpenMP core: cut a bundle into GEMM tiles and run them under `prange` with the GIL released.

Every path must equal the plain reference `out_i = scale_i * A_i @ B_i` (tests compare in float64).
A tile calls one optimised GEMM whose address `blas.py` found at run time, never a loop of ours:
  - route 0: Fortran `sgemm_`/`dgemm_` (MKL inside torch's wheel, or scipy's OpenBLAS);
  - route 1: torch's `addmm.out`/`baddbmm.out` through its stable C shim (oneDNN; used for bf16).
Inside the parallel region MKL, OpenBLAS (set to 1 thread here) and ATen/oneDNN each run one thread.
Nothing links a BLAS or torch at build time. `_plan.pxi` (included below) plans plain bundles fast.
`_quant.pxi` adds the one place with loops of our own: the quantized decode GEMV of `_quant.h`, `_quant_int8.h`.
"""

import sys

import numpy as np

from cpython.buffer cimport PyBUF_STRIDES, PyBuffer_Release, PyObject_CheckBuffer, PyObject_GetBuffer
from cython.parallel cimport prange
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free, malloc, qsort, realloc

cdef extern from "_omp.h" nogil:
    int bsm_openmp()
    int bsm_max_threads()
    void bsm_set_max_threads(int n)
    int bsm_thread_num()
    const char *bsm_openmp_runtime()

# Fortran BLAS (column-major, arguments by pointer, LP64).
ctypedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *,
                         const int *) noexcept nogil
ctypedef void (*dgemm_t)(const char *, const char *, const int *, const int *, const int *, const double *,
                         const double *, const int *, const double *, const int *, const double *, double *,
                         const int *) noexcept nogil
ctypedef int (*mkl_local_t)(int) noexcept nogil
ctypedef int (*get_threads_t)() noexcept nogil
ctypedef void (*set_threads_t)(int) noexcept nogil
# torch's AOTInductor C shim (torch/csrc/inductor/aoti_torch/c/shim.h); 0 means success.
ctypedef void *AtenTensorHandle
ctypedef int32_t (*from_blob_t)(void *, int64_t, const int64_t *, const int64_t *, int64_t, int32_t, int32_t,
                                int32_t, AtenTensorHandle *) noexcept nogil
ctypedef int32_t (*delete_t)(AtenTensorHandle) noexcept nogil
ctypedef int32_t (*addmm_t)(AtenTensorHandle, AtenTensorHandle, AtenTensorHandle, AtenTensorHandle, double,
                            double) noexcept nogil

cdef enum:
    F32 = 0
    F64 = 1
    BF16 = 2
    ROUTE_BLAS = 0
    ROUTE_TORCH = 1
    MAX_TILES = 64

cdef struct Task:
    int dtype
    int route
    int item
    int64_t batch, m, n, k
    char *a
    int64_t sab, sa0, sa1  # element strides: batch, row, column (one of sa0/sa1 is 1)
    char *b
    int64_t sbb, sb0, sb1
    char *c
    int64_t scb, sc0       # C's column stride is 1
    double alpha
    double cost

cdef sgemm_t _sgemm = NULL
cdef dgemm_t _dgemm = NULL
cdef mkl_local_t _mkl_local = NULL
cdef get_threads_t _blas_get_threads = NULL
cdef set_threads_t _blas_set_threads = NULL
cdef from_blob_t _from_blob = NULL
cdef delete_t _delete = NULL
cdef addmm_t _addmm = NULL
cdef addmm_t _baddbmm = NULL
cdef int32_t _torch_dtype[3]
cdef int32_t _torch_cpu = 0
cdef int _route[3]
cdef int64_t _itemsize[3]
_itemsize[:] = [4, 8, 2]
_route[:] = [-1, -1, -1]

# Tiling, per route (BLAS, torch): aim for TASKS_PER_THREAD tiles per thread, none smaller than
# MIN_TASK_FLOPS. Measured on the Qwen2.5-0.5B bundles (benchmarks/bench_bsm.py): 2 tiles per
# thread for BLAS (4 was up to 10% slower); 1 per thread and >= 30 MFLOP for torch's oneDNN, whose
# calls cost ~4 us and which packs B per call (8 MFLOP tiles were up to 20% slower).
TASKS_PER_THREAD = [2, 1]
MIN_TASK_FLOPS = [2.0e6, 3.0e7]

# Last run, for proving parallelism by measurement (`last_run_stats`).
cdef int *_last_tid = NULL
cdef int *_last_item = NULL
cdef int64_t _last_ntasks = 0
cdef int _last_nthreads = 0


def openmp() -> bool:
    """True when this module was compiled with OpenMP."""
    return bool(bsm_openmp())


def max_threads() -> int:
    """OpenMP's default team size (OMP_NUM_THREADS, or torch.set_num_threads: they share the runtime)."""
    return bsm_max_threads()


def openmp_runtime() -> str:
    """Path of the OpenMP runtime library this module calls, '' without OpenMP."""
    return bsm_openmp_runtime().decode()


def set_blas(size_t sgemm, size_t dgemm, size_t mkl_local, size_t get_threads, size_t set_threads) -> None:
    """Install Fortran `sgemm_`/`dgemm_` addresses and the thread controls of their library (0 = absent)."""
    global _sgemm, _dgemm, _mkl_local, _blas_get_threads, _blas_set_threads
    _sgemm = <sgemm_t>sgemm
    _dgemm = <dgemm_t>dgemm
    _mkl_local = <mkl_local_t>mkl_local
    _blas_get_threads = <get_threads_t>get_threads
    _blas_set_threads = <set_threads_t>set_threads


def set_torch(size_t from_blob, size_t delete, size_t addmm, size_t baddbmm, int f32, int f64, int bf16,
              int cpu) -> None:
    """Install torch's C shim: tensor-from-pointer, delete, addmm.out, baddbmm.out and dtype/device codes."""
    global _from_blob, _delete, _addmm, _baddbmm, _torch_cpu
    _from_blob = <from_blob_t>from_blob
    _delete = <delete_t>delete
    _addmm = <addmm_t>addmm
    _baddbmm = <addmm_t>baddbmm
    _torch_dtype[F32] = f32
    _torch_dtype[F64] = f64
    _torch_dtype[BF16] = bf16
    _torch_cpu = cpu


def set_route(int dtype, int route) -> None:
    """Choose how tiles of `dtype` (0 f32, 1 f64, 2 bf16) run: 0 BLAS, 1 torch shim, -1 not served."""
    if route == ROUTE_BLAS:
        assert (_sgemm if dtype == F32 else _dgemm) != NULL and dtype != BF16, "no BLAS installed for dtype"
    if route == ROUTE_TORCH:
        assert _addmm != NULL, "torch shim not installed"
    _route[dtype] = route


def last_run_stats() -> dict:
    """Tasks of the last `run`: OpenMP thread id and item index of each, and the team size asked for."""
    return {
        "num_threads": _last_nthreads,
        "thread_ids": [_last_tid[i] for i in range(_last_ntasks)],
        "items": [_last_item[i] for i in range(_last_ntasks)],
    }


include "_plan.pxi"
include "_quant.pxi"


cdef char *_address(object x) except? NULL:
    """Data pointer of a numpy array (buffer protocol) or a torch tensor (`data_ptr`, offset included)."""
    cdef Py_buffer view
    cdef char *p
    if PyObject_CheckBuffer(x):
        PyObject_GetBuffer(x, &view, PyBUF_STRIDES)
        p = <char *>view.buf
        PyBuffer_Release(&view)
        return p
    return <char *><size_t>x.data_ptr()


cdef int _by_cost(const void *x, const void *y) noexcept nogil:
    cdef double cx = (<const Task *>x).cost, cy = (<const Task *>y).cost
    return (cx < cy) - (cx > cy)  # largest first


cdef int64_t _tile(Task *item, int64_t pieces, Task *out) noexcept nogil:
    """Cut `item` into about `pieces` tasks: batch chunks first, then N (or M) tiles of 16 multiples."""
    cdef int64_t isz = _itemsize[item.dtype]
    cdef int64_t nbc = min(pieces, item.batch)
    cdef int64_t bchunk = (item.batch + nbc - 1) // nbc
    nbc = (item.batch + bchunk - 1) // bchunk
    cdef int64_t per = min((pieces + nbc - 1) // nbc, <int64_t>MAX_TILES)
    # Split the dimension of the larger operand, so each tile reads only its share of it.
    cdef bint along_n = item.n >= item.m
    cdef int64_t dim = item.n if along_n else item.m
    cdef int64_t tile = (dim + per - 1) // per
    if dim >= 32:
        tile = min(dim, (tile + 15) // 16 * 16)
    cdef int64_t ntile = (dim + tile - 1) // tile
    cdef int64_t j, t, b0, d0, w = 0
    cdef Task *task
    for j in range(nbc):
        b0 = j * bchunk
        for t in range(ntile):
            d0 = t * tile
            task = &out[w]
            task[0] = item[0]
            task.batch = min(bchunk, item.batch - b0)
            task.a = item.a + b0 * item.sab * isz
            task.b = item.b + b0 * item.sbb * isz
            task.c = item.c + b0 * item.scb * isz
            if along_n:
                task.n = min(tile, dim - d0)
                task.b += d0 * item.sb1 * isz
                task.c += d0 * isz
            else:
                task.m = min(tile, dim - d0)
                task.a += d0 * item.sa0 * isz
                task.c += d0 * item.sc0 * isz
            task.cost = 2.0 * task.batch * task.m * task.n * task.k
            w += 1
    return w


cdef int _blas_task(Task *t) noexcept nogil:
    """Row-major C = alpha * A @ B as column-major C^T = alpha * B^T A^T, batch slice by slice."""
    cdef char ta = b'N' if t.sb1 == 1 else b'T'  # first Fortran operand is B^T (n x k)
    cdef char tb = b'N' if t.sa1 == 1 else b'T'  # second is A^T (k x m)
    cdef int m = <int>t.n, n = <int>t.m, k = <int>t.k
    cdef int lda = <int>(t.sb0 if t.sb1 == 1 else t.sb1)
    cdef int ldb = <int>(t.sa0 if t.sa1 == 1 else t.sa1)
    cdef int ldc = <int>t.sc0
    cdef float alpha_f = <float>t.alpha, beta_f = 0.0
    cdef double alpha_d = t.alpha, beta_d = 0.0
    cdef int64_t j, isz = _itemsize[t.dtype]
    cdef int old = 0
    if _mkl_local != NULL:
        old = _mkl_local(1)
    for j in range(t.batch):
        if t.dtype == F32:
            _sgemm(&ta, &tb, &m, &n, &k, &alpha_f, <float *>(t.b + j * t.sbb * isz), &lda,
                   <float *>(t.a + j * t.sab * isz), &ldb, &beta_f, <float *>(t.c + j * t.scb * isz), &ldc)
        else:
            _dgemm(&ta, &tb, &m, &n, &k, &alpha_d, <double *>(t.b + j * t.sbb * isz), &lda,
                   <double *>(t.a + j * t.sab * isz), &ldb, &beta_d, <double *>(t.c + j * t.scb * isz), &ldc)
    if _mkl_local != NULL:
        _mkl_local(old)
    return 0


cdef int _torch_task(Task *t) noexcept nogil:
    """One `addmm.out` (batch 1) or `baddbmm.out` over the tile, beta=0 so C's old contents are ignored."""
    cdef AtenTensorHandle ha = NULL, hb = NULL, hc = NULL
    cdef int64_t size[3]
    cdef int64_t stride[3]
    cdef int32_t err = 0, code = _torch_dtype[t.dtype]
    cdef int off = 0 if t.batch > 1 else 1  # 2-D tensors when the tile has one batch slice
    size[:] = [t.batch, t.m, t.k]
    stride[:] = [t.sab, t.sa0, t.sa1]
    err |= _from_blob(t.a, 3 - off, &size[off], &stride[off], 0, code, _torch_cpu, 0, &ha)
    size[:] = [t.batch, t.k, t.n]
    stride[:] = [t.sbb, t.sb0, t.sb1]
    err |= _from_blob(t.b, 3 - off, &size[off], &stride[off], 0, code, _torch_cpu, 0, &hb)
    size[:] = [t.batch, t.m, t.n]
    stride[:] = [t.scb, t.sc0, 1]
    err |= _from_blob(t.c, 3 - off, &size[off], &stride[off], 0, code, _torch_cpu, 0, &hc)
    if err == 0:
        err = (_addmm if off else _baddbmm)(hc, hc, ha, hb, 0.0, t.alpha)
    if ha != NULL:
        _delete(ha)
    if hb != NULL:
        _delete(hb)
    if hc != NULL:
        _delete(hc)
    return err


cdef int _run_task(Task *t) noexcept nogil:
    if t.route == ROUTE_BLAS:
        return _blas_task(t)
    return _torch_task(t)


cdef int _blas_users = 0  # runs in flight that pinned the BLAS to 1 thread (changed under the GIL)
cdef int _blas_saved = 1  # the BLAS's own thread count, restored when the last run ends


cdef void _pin_blas() noexcept:
    """scipy's OpenBLAS is a pthreads build: called from two threads at its default of N threads it
    serialises (0.4 ms -> 12 ms); at 1 thread concurrent calls are independent. Called with the GIL."""
    global _blas_users, _blas_saved
    if _blas_users == 0:
        _blas_saved = _blas_get_threads()
        if _blas_saved != 1:
            _blas_set_threads(1)
    _blas_users += 1


cdef void _unpin_blas() noexcept:
    global _blas_users
    _blas_users -= 1
    if _blas_users == 0 and _blas_saved != 1:
        _blas_set_threads(_blas_saved)


def run(list records, int num_threads) -> None:
    """Compute every record's C = alpha * A @ B in parallel tiles; C arrays must not alias inputs.

    A record (built and validated by `bundle.py`, or `plain_records`) is
    (dtype, batch, M, N, K, A, sab, sa0, sa1, B, sbb, sb0, sb1, C, scb, sc0, alpha), element strides.
    """
    global _last_tid, _last_item, _last_ntasks, _last_nthreads
    cdef int64_t nitems = len(records), i, ntasks = 0, npieces = 0
    cdef Task *items = <Task *>malloc(max(nitems, 1) * sizeof(Task))
    cdef int64_t *pieces = <int64_t *>malloc(max(nitems, 1) * sizeof(int64_t))
    cdef Task *tasks = NULL
    cdef int *status = NULL
    cdef int *tids = NULL
    cdef Task *it
    cdef double total = 0.0, target
    cdef int nt = max(1, num_threads), old_omp = 0
    cdef bint pin_blas = False, pinned = False
    if items == NULL or pieces == NULL:
        free(items)
        free(pieces)
        raise MemoryError()
    try:
        for i in range(nitems):
            r = records[i]
            it = &items[i]
            it.dtype = r[0]
            it.route = _route[it.dtype]
            if it.route < 0:
                raise RuntimeError(f"no GEMM installed for dtype code {it.dtype}")
            it.item = <int>i
            it.batch, it.m, it.n, it.k = r[1], r[2], r[3], r[4]
            it.a, it.sab, it.sa0, it.sa1 = _address(r[5]), r[6], r[7], r[8]
            it.b, it.sbb, it.sb0, it.sb1 = _address(r[9]), r[10], r[11], r[12]
            it.c, it.scb, it.sc0 = _address(r[13]), r[14], r[15]
            it.alpha = r[16]
            it.cost = 2.0 * it.batch * it.m * it.n * it.k
            total += it.cost
            pin_blas = pin_blas or (it.route == ROUTE_BLAS and _blas_set_threads != NULL)
        for i in range(nitems):
            it = &items[i]
            target = it.cost
            # One item on torch's route is one call that oneDNN parallelises itself (below): tiles
            # would each pack B again. BLAS tiles are cheap and beat the BLAS's own threading.
            if nt > 1 and not (nitems == 1 and it.route == ROUTE_TORCH):
                target = max(total / (nt * TASKS_PER_THREAD[it.route]), MIN_TASK_FLOPS[it.route])
            pieces[i] = max(1, min(<int64_t>(it.cost / target + 0.5), it.batch * MAX_TILES))
            npieces += pieces[i]
        tasks = <Task *>malloc(2 * npieces * sizeof(Task))
        status = <int *>malloc(2 * npieces * sizeof(int))
        tids = <int *>malloc(2 * npieces * sizeof(int))
        if tasks == NULL or status == NULL or tids == NULL:
            raise MemoryError()
        for i in range(nitems):
            ntasks += _tile(&items[i], pieces[i], &tasks[ntasks])
        qsort(tasks, ntasks, sizeof(Task), _by_cost)

        if pin_blas:
            _pin_blas()
            pinned = True
        with nogil:
            if nt == 1 or ntasks == 1:
                # No team: ATen/oneDNN on this thread use nt threads (one when asked for one).
                old_omp = bsm_max_threads()
                bsm_set_max_threads(nt)
                for i in range(ntasks):
                    status[i] = _run_task(&tasks[i])
                    tids[i] = 0
                bsm_set_max_threads(old_omp)
            else:
                for i in prange(ntasks, schedule="dynamic", chunksize=1, num_threads=nt):
                    status[i] = _run_task(&tasks[i])
                    tids[i] = bsm_thread_num()

        # Keep the last run's thread ids and items (with the GIL: concurrent runs do not race).
        free(_last_tid)
        free(_last_item)
        _last_tid, tids = tids, NULL
        _last_item = <int *>malloc(max(ntasks, 1) * sizeof(int))
        _last_ntasks = ntasks if _last_item != NULL else 0
        _last_nthreads = nt
        for i in range(_last_ntasks):
            _last_item[i] = tasks[i].item
        for i in range(ntasks):
            if status[i] != 0:
                raise RuntimeError(f"torch's GEMM failed on item {tasks[i].item} (see the message above)")
    finally:
        if pinned:
            _unpin_blas()
        free(items)
        free(pieces)
        free(tasks)
        free(status)
        free(tids)
