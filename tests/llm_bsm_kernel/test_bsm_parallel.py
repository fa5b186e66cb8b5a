"""Parallelism proven by measurement: OpenMP compiled in, tasks on 2 threads, the GIL released.

Functional checks only; no timings are asserted.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from llm_bsm_kernel import backend_info, blas, bsm

kernel, _ = blas.extension()
needs_kernel = pytest.mark.skipif(kernel is None or not kernel.openmp(), reason="no compiled OpenMP kernel")


@needs_kernel
def test_openmp_compiled_in_and_reported():
    info = backend_info()
    assert info["extension"] and info["openmp"]
    assert info["max_threads"] >= 1
    assert "libgomp" in info["openmp_runtime"] or "libomp" in info["openmp_runtime"]


@needs_kernel
def test_one_openmp_runtime_shared_with_torch():
    """torch and the kernel call the same libgomp, so nested regions stay single-threaded."""
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


@needs_kernel
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tasks_run_on_two_threads(dtype):
    x = torch.randn(256, 512).to(getattr(torch, dtype))
    items = [(x, torch.randn(512, 512).to(x.dtype), 1.0) for _ in range(8)]
    # On a busy machine the second thread may start late and find no task left.
    for _ in range(20):
        bsm(items, num_threads=2)
        stats = kernel.last_run_stats()
        if set(stats["thread_ids"]) == {0, 1}:
            break
    assert stats["num_threads"] == 2
    assert set(stats["thread_ids"]) == {0, 1}
    assert set(stats["items"]) == set(range(8))
    bsm(items, num_threads=1)
    assert set(kernel.last_run_stats()["thread_ids"]) == {0}


@needs_kernel
def test_gil_released_during_bundle():
    """Another Python thread keeps counting while a long bundle runs on one OpenMP thread."""
    rng = np.random.default_rng(0)
    a, b = (
        rng.standard_normal((512, 1024), dtype=np.float32),
        rng.standard_normal((1024, 1024), dtype=np.float32),
    )
    items = [(a, b, 1.0)] * 24  # ~25 GFLOP: well over 0.1 s on one core
    count, started, stop = [0], threading.Event(), threading.Event()

    def counter():
        started.set()
        while not stop.is_set():
            count[0] += 1

    worker = threading.Thread(target=counter)
    worker.start()
    started.wait()
    before = count[0]
    bsm(items, num_threads=1)
    during = count[0] - before
    stop.set()
    worker.join()
    assert during > 1000, f"the other thread counted only {during} times during the bundle"


@needs_kernel
def test_concurrent_bundles_from_two_python_threads():
    """Two Python threads run bundles at once (the GIL is released); both get right answers."""
    from bsm_helpers import assert_matches

    rng = np.random.default_rng(1)
    bundles = [
        [(rng.standard_normal((96, 64)), rng.standard_normal((64, 80)), 0.5)] * 6,
        [(torch.randn(5, 40, 32), torch.randn(32, 48), 2.0, "nn")] * 6,
    ]
    results: list = [None, None]

    def work(j: int) -> None:
        for _ in range(20):
            results[j] = bsm(bundles[j], num_threads=2)

    workers = [threading.Thread(target=work, args=(j,)) for j in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for outs, items in zip(results, bundles):
        for got, item in zip(outs, items):
            assert_matches(got, item, "float64" if got.dtype == np.float64 else "float32")


@needs_kernel
def test_openblas_thread_count_restored():
    if blas.gemm("float32").name != "openblas":
        pytest.skip("float32 does not run on OpenBLAS here")
    lib, prefix, _ = blas._openblas_library()
    get_threads = getattr(lib, f"{prefix}openblas_get_num_threads")
    before = get_threads()
    bsm(
        [(np.ones((64, 64), np.float32), np.ones((64, 64), np.float32), 1.0)] * 4,
        num_threads=2,
    )
    assert get_threads() == before
