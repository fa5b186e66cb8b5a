/* OpenMP queries that also compile without -fopenmp (then the kernel runs its tasks one after another). */
#ifndef LLM_BSM_KERNEL_OMP_H
#define LLM_BSM_KERNEL_OMP_H

#include <dlfcn.h>

#ifdef _OPENMP
#include <omp.h>
static int bsm_openmp(void) { return 1; }
static int bsm_max_threads(void) { return omp_get_max_threads(); }
static void bsm_set_max_threads(int n) { omp_set_num_threads(n); }
static int bsm_thread_num(void) { return omp_get_thread_num(); }
/* Which libgomp/libomp serves us: after `import torch` it should be torch's copy, one runtime in all. */
static const char *bsm_openmp_runtime(void) {
    Dl_info info;
    if (dladdr((void *)&omp_get_max_threads, &info) && info.dli_fname) return info.dli_fname;
    return "";
}
#else
static int bsm_openmp(void) { return 0; }
static int bsm_max_threads(void) { return 1; }
static void bsm_set_max_threads(int n) { (void)n; }
static int bsm_thread_num(void) { return 0; }
static const char *bsm_openmp_runtime(void) { return ""; }
#endif

#endif
