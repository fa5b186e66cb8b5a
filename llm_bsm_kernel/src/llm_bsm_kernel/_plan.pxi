# The fast path (included by _kernel.pyx, same extension module): records for plain bundles
# without bundle.py's Python-level validation, ~2 us per item instead of ~15. Mirrors
# bundle.prepare + bundle.record for inputs that need no copy, no zero-fill and no given `out`;
# anything else returns None and bundle.py validates (with its messages) and plans it.
# tests/llm_bsm_kernel/test_bsm_fast_path.py checks both build the same records.

cdef struct Geo:
    int ndim
    int64_t batch, rows, cols, sb, s0, s1

cdef object _ndarray = np.ndarray
cdef object _np_empty = np.empty
cdef object _np_dtypes = (np.dtype(np.float32), np.dtype(np.float64))
cdef object _tensor = None
cdef object _strided = None
cdef object _torch_empty = None
cdef object _torch_dtypes = ()
cdef int64_t INT32_MAX = 2147483647


cdef int _layout(Geo *g) noexcept:
    """bundle._blas_layout: make one of s0/s1 the unit stride and the other a valid leading dim."""
    cdef int64_t s0, s1
    if g.cols == 1 or g.s1 == 1:
        s0 = g.s0 if g.rows > 1 else max(g.cols, 1)
        if s0 >= max(g.cols, 1):
            g.s0, g.s1 = s0, 1
            return 1
    if g.rows == 1 or g.s0 == 1:
        s1 = g.s1 if g.cols > 1 else max(g.rows, 1)
        if s1 >= max(g.rows, 1):
            g.s0, g.s1 = 1, s1
            return 1
    return 0


cdef int _operand(object x, bint trans, bint is_torch, Geo *g) except -2:
    """dtype code (0 f32, 1 f64, 2 bf16) of a plain operand, its geometry in `g`; -1 if not plain."""
    cdef int code = -1
    cdef int64_t isz
    cdef object dtype
    if is_torch:
        if not isinstance(x, _tensor) or not x.is_cpu or x.layout is not _strided:
            return -1
        dtype = x.dtype
        for code in range(3):
            if dtype is _torch_dtypes[code]:
                break
        else:
            return -1
        shape, strides = x.shape, x.stride()
    else:
        if type(x) is not _ndarray:
            return -1
        dtype = x.dtype
        code = 0 if dtype is _np_dtypes[0] else (1 if dtype is _np_dtypes[1] else -1)
        if code < 0:
            return -1
        isz = 4 if code == 0 else 8
        shape, strides = x.shape, x.strides
        if any(s % isz for s in strides):
            return -1
        strides = tuple(s // isz for s in strides)
    g.ndim = len(shape)
    if g.ndim == 2:
        g.batch, g.sb = 1, 0
        g.rows, g.cols = shape
        g.s0, g.s1 = strides
    elif g.ndim == 3:
        g.batch, g.rows, g.cols = shape
        g.sb, g.s0, g.s1 = strides
        if g.batch == 1:
            g.sb = 0
    else:
        return -1
    if trans:
        g.rows, g.cols, g.s0, g.s1 = g.cols, g.rows, g.s1, g.s0
    return code if _layout(g) else -1


def plain_records(object items):
    """(records, outputs) for a bundle of plain items, or None to let bundle.py handle it.

    Plain: (A, B, scale[, "nt"]) with a float/int scale; A and B both numpy arrays or both strided
    CPU tensors of one dtype the kernel serves, 2-D or 3-D, each with a unit stride in its last two
    dims; no empty dimension. Outputs are allocated here (contiguous).
    """
    global _tensor, _strided, _torch_empty, _torch_dtypes
    cdef Geo ga, gb
    cdef int code, code_b
    cdef bint ta, tb, is_torch
    cdef int64_t batch, m, n, k, scb
    if type(items) is not list and type(items) is not tuple:
        return None
    if _tensor is None and "torch" in sys.modules:
        torch = sys.modules["torch"]
        _tensor, _strided, _torch_empty = torch.Tensor, torch.strided, torch.empty
        _torch_dtypes = (torch.float32, torch.float64, torch.bfloat16)
    records, outs = [], []
    for raw in items:
        if type(raw) is not tuple and type(raw) is not list:
            return None
        if len(raw) == 3:
            ta = tb = False
        elif len(raw) == 4 and raw[3] in ("nn", "nt", "tn", "tt"):
            ta, tb = raw[3][0] == "t", raw[3][1] == "t"
        else:
            return None
        a, b, scale = raw[0], raw[1], raw[2]
        if type(scale) is not float and type(scale) is not int:
            return None
        is_torch = _tensor is not None and isinstance(a, _tensor)
        code = _operand(a, ta, is_torch, &ga)
        code_b = _operand(b, tb, is_torch, &gb)
        if code < 0 or code_b != code or _route[code] < 0 or ga.cols != gb.rows:
            return None
        if ga.batch != gb.batch and ga.batch != 1 and gb.batch != 1:
            return None
        batch, m, n, k = max(ga.batch, gb.batch), ga.rows, gb.cols, ga.cols
        if batch * m * n * k == 0:
            return None
        if ga.ndim == 3 or gb.ndim == 3:
            shape = (batch, m, n)
        else:
            shape = (m, n)
        c = _torch_empty(shape, dtype=a.dtype) if is_torch else _np_empty(shape, a.dtype)
        scb = m * n if batch > 1 else 0  # C is contiguous: row stride n
        if batch > 1 and gb.batch == 1 and ga.s1 == 1 and ga.sb == m * ga.s0:
            # (batch, M, K) @ (K, N) with A and C stacked row after row: one (batch*M, K) GEMM
            batch, m, ga.sb, scb = 1, batch * m, 0, 0
        if max(m, n, k, ga.s0, ga.s1, gb.s0, gb.s1) > INT32_MAX:
            return None
        records.append((code, batch, m, n, k, a, ga.sb, ga.s0, ga.s1, b, gb.sb, gb.s0, gb.s1,
                        c, scb, n, float(scale)))
        outs.append(c)
    return records, outs
