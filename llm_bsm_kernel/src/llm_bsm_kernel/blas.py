"""Find, at run time, the single-threaded GEMM that each dtype's tiles call, and install it in the kernel.

Nothing is linked at build time; addresses come from libraries the process already uses:
  - `mkl`: MKL's Fortran `sgemm_`/`dgemm_`, exported by torch's x86-64 wheel (`libtorch_cpu.so`).
  - `openblas`: scipy's OpenBLAS through the documented `scipy.linalg.cython_blas` capsules.
  - `torch`: torch's own `addmm.out`/`baddbmm.out` through its stable C shim (AOTInductor), i.e.
    oneDNN for bfloat16. MKL's `cblas_gemm_bf16bf16f32` is not used: on AMD it is no faster than fp32.
  - `fallback`: no extension or no GEMM: per-item numpy/torch calls (`fallback.py`).

Default order for float32/float64: Intel CPUs mkl, openblas, torch (on a Xeon, bundles ran 10-25%
faster on MKL); other CPUs openblas, mkl, torch, because MKL takes an AVX2 path on AMD (91 GF/s per
core on a Zen 5 EPYC, against 200 for OpenBLAS's SkylakeX kernels, 102 if OPENBLAS_CORETYPE=Haswell
pins its AVX2 ones). bfloat16: torch. `LLM_BSM_KERNEL_BLAS=mkl|openblas|torch` puts one first;
`LLM_BSM_KERNEL_NO_EXT=1` forces the fallback for everything.

Example:
    >>> import llm_bsm_kernel as bk
    >>> bk.backend("float32")  # 'openblas', 'mkl', 'torch' or 'fallback'
    'openblas'
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from types import FrameType, ModuleType
from typing import Any

DTYPES = ("float32", "float64", "bfloat16")
DTYPE_CODE = {"float32": 0, "float64": 1, "bfloat16": 2}
ROUTE_BLAS, ROUTE_TORCH = 0, 1
AOTI_SHIM = (
    "aoti_torch_create_tensor_from_blob",
    "aoti_torch_delete_tensor_object",
    "aoti_torch_cpu_addmm_out",
    "aoti_torch_cpu_baddbmm_out",
)


@dataclass(frozen=True)
class Gemm:
    """Which GEMM serves a dtype: `name` is mkl, openblas, torch or fallback; `detail` says where from."""

    name: str
    detail: str


def _addr(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0


def _mapped_libraries() -> list[str]:
    """Shared objects mapped into this process (Linux); [] elsewhere."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f if ".so" in line and "/" in line})
    except OSError:
        return []


@functools.cache
def _vendor() -> str:
    """CPU vendor_id from /proc/cpuinfo ('GenuineIntel', 'AuthenticAMD', ...); '' where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


def _caller_level() -> int:
    """`stacklevel` of the first frame outside this package, so warnings point at the user's call."""
    package, level = os.path.dirname(__file__), 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _preload_torch_openmp() -> None:
    """Load torch's libgomp first, so that the kernel and torch share one OpenMP runtime whichever
    is imported first (both link `libgomp.so.1`; the loader then reuses the loaded copy)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return
    path = os.path.join(spec.submodule_search_locations[0], "lib", "libgomp.so.1")
    if os.path.exists(path):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


@functools.cache
def extension() -> tuple[ModuleType | None, str | None]:
    """(the compiled `_kernel` module or None, why it is not used)."""
    if os.environ.get("LLM_BSM_KERNEL_NO_EXT"):
        return None, "LLM_BSM_KERNEL_NO_EXT is set"
    _preload_torch_openmp()
    try:
        return importlib.import_module("llm_bsm_kernel._kernel"), None
    except ImportError as exc:
        why = f"compiled extension not available ({exc})"
    message = f"llm_bsm_kernel: {why}; using the per-item numpy/torch fallback"
    warnings.warn(message, stacklevel=_caller_level())
    return None, why


@functools.cache
def _torch_lib() -> tuple[ctypes.CDLL | None, str]:
    """torch's libtorch_cpu.so (importing torch if it is installed), or (None, reason)."""
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return None, "torch is not installed"
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not os.path.exists(path):
        return None, f"{path} not found"
    return ctypes.CDLL(path), f"torch {torch.__version__}"


def _mkl(kernel: ModuleType) -> Gemm | None:
    lib, why = _torch_lib()
    if lib is None or not all(hasattr(lib, s) for s in ("sgemm_", "dgemm_", "MKL_Get_Version_String")):
        return None
    buf = ctypes.create_string_buffer(256)
    lib.MKL_Get_Version_String(buf, len(buf))
    version = buf.value.decode(errors="replace").split(" Product")[0]
    local = _addr(lib, "MKL_Set_Num_Threads_Local") if hasattr(lib, "MKL_Set_Num_Threads_Local") else 0
    kernel.set_blas(_addr(lib, "sgemm_"), _addr(lib, "dgemm_"), local, 0, 0)
    return Gemm("mkl", f"MKL sgemm_/dgemm_ ({version}) from {why}")


def _openblas_library() -> tuple[ctypes.CDLL, str, str] | None:
    """The LP64 OpenBLAS that scipy loaded: (library, its symbol prefix, path), or None."""
    paths = sorted(_mapped_libraries(), key=lambda p: "scipy" not in p)  # scipy's own first
    for path in paths:
        name = os.path.basename(path)
        # numpy's copy is ILP64 (suffix 64_): not the one behind scipy's capsules
        if "openblas" not in name.lower() or "64_" in name:
            continue
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_", ""):
            if hasattr(lib, f"{prefix}openblas_set_num_threads"):
                return lib, prefix, path
    return None


def _openblas(kernel: ModuleType) -> Gemm | None:
    if importlib.util.find_spec("scipy") is None:
        return None
    from scipy.linalg import cython_blas

    found = _openblas_library()
    # scipy on another BLAS: we cannot pin its threads, so we do not call it in parallel
    if found is None:
        return None
    lib, prefix, path = found
    # Private prototypes: ctypes.pythonapi's shared function objects are left untouched.
    getname = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    getptr = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi)
    )
    capsules = cython_blas.__pyx_capi__
    sgemm, dgemm = (getptr(capsules[n], getname(capsules[n])) for n in ("sgemm", "dgemm"))
    get_threads = _addr(lib, f"{prefix}openblas_get_num_threads")
    kernel.set_blas(sgemm, dgemm, 0, get_threads, _addr(lib, f"{prefix}openblas_set_num_threads"))
    corename = getattr(lib, f"{prefix}openblas_get_corename", None)
    core = "?"
    if corename is not None:
        corename.restype = ctypes.c_char_p
        core = corename().decode()
    import scipy

    # OPENBLAS_CORETYPE=Haswell on an AVX-512 machine halves sgemm speed (102 vs 200 GF/s per core here).
    pinned = f", OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}" if "OPENBLAS_CORETYPE" in os.environ else ""
    return Gemm(
        "openblas",
        f"OpenBLAS sgemm/dgemm (core {core}{pinned}) from scipy {scipy.__version__}: {path}",
    )


def _torch(kernel: ModuleType) -> Gemm | None:
    lib, why = _torch_lib()
    if lib is None or not all(hasattr(lib, s) for s in AOTI_SHIM):
        return None
    code = {n: getattr(lib, f"aoti_torch_dtype_{n}")() for n in DTYPES}
    kernel.set_torch(
        *(_addr(lib, s) for s in AOTI_SHIM),
        *code.values(),
        lib.aoti_torch_device_type_cpu(),
    )
    return Gemm(
        "torch",
        f"torch addmm.out/baddbmm.out via its C shim (oneDNN for bf16) from {why}",
    )


@functools.cache
def _float_gemm(kernel: ModuleType) -> Gemm | None:
    """The float32/float64 GEMM: the first provider that loads, in the order described above."""
    order = ["mkl", "openblas"] if _vendor() == "GenuineIntel" else ["openblas", "mkl"]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        order = ["openblas"]  # torch's aarch64 wheel has no MKL
    chosen = os.environ.get("LLM_BSM_KERNEL_BLAS", "").lower()
    if chosen:
        order = [chosen] + [p for p in order if p != chosen]
    for provider in order:
        found = {"mkl": _mkl, "openblas": _openblas, "torch": lambda k: None}.get(provider, lambda k: None)(kernel)
        if found is not None:
            return found
    return None


@functools.cache
def _torch_gemm(kernel: ModuleType) -> Gemm | None:
    return _torch(kernel)


@functools.cache
def gemm(dtype: str) -> Gemm:
    """The GEMM serving `dtype` ('float32', 'float64' or 'bfloat16'); installs it in the kernel."""
    kernel, why = extension()
    if kernel is None:
        return Gemm("fallback", why or "")
    found = None
    chosen = os.environ.get("LLM_BSM_KERNEL_BLAS", "").lower()
    if dtype != "bfloat16" and chosen != "torch":
        found = _float_gemm(kernel)
        if found is not None:
            kernel.set_route(DTYPE_CODE[dtype], ROUTE_BLAS)
            return found
    found = _torch_gemm(kernel)
    if found is not None:
        kernel.set_route(DTYPE_CODE[dtype], ROUTE_TORCH)
        return found
    return Gemm("fallback", "no GEMM found: install scipy (OpenBLAS) or torch (MKL, oneDNN)")


def kernel_ready() -> ModuleType | None:
    """The extension with a GEMM installed for every dtype in use (bf16 once torch is imported)."""
    kernel, _ = extension()
    if kernel is not None:
        gemm("float32")
        gemm("float64")
        if "torch" in sys.modules:
            gemm("bfloat16")
    return kernel


def backend(dtype: str = "float32") -> str:
    """Name of the GEMM that bundles of `dtype` run on: 'mkl', 'openblas', 'torch' or 'fallback'.

    Example:
        >>> backend("bfloat16")
        'torch'
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return gemm(dtype).name


def backend_info() -> dict[str, Any]:
    """What runs a bundle: extension and OpenMP status, thread count, and the GEMM for each dtype.

    Example:
        >>> info = backend_info()
        >>> info["openmp"], info["float32"]
        (True, 'openblas: OpenBLAS sgemm/dgemm (core SkylakeX, ...) from scipy 1.17.1: ...')
    """
    from . import __version__

    kernel, why = extension()
    info: dict[str, Any] = {
        "version": __version__,
        "extension": kernel is not None,
        "openmp": bool(kernel and kernel.openmp()),
        "max_threads": kernel.max_threads() if kernel else 1,
        "openmp_runtime": kernel.openmp_runtime() if kernel else "",
        "fallback_reason": why,
    }
    for dtype in DTYPES:
        found = gemm(dtype)
        info[dtype] = f"{found.name}: {found.detail}"
    return info
