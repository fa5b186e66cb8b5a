#!/usr/bin/env bash
# The checks that need a GPU machine, in one call of the device tool (issue 15 items 18-19, issue 16):
#
#   run(command="bash benchmarks/device/device_checks.sh", timeout_s=420)
#
# Our packages are not installed there: they run from their src folders (PYTHONPATH). Every step has
# its own timeout inside an overall budget (DEVICE_BUDGET_S, default 390 s) and a failing step does not
# stop the others; a summary comes last. Everything printed also goes to $OUT/device_log.txt (with
# junit XML per pytest step). Without CUDA (a dry run on the dev box) the CUDA tests skip and the
# script still completes. Exit status: the number of failed steps.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/device_checks_out}"
mkdir -p "$OUT"
LOG="$OUT/device_log.txt"
PY="${PYTHON:-python3}"
BUDGET="${DEVICE_BUDGET_S:-390}"
START=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH="llm_sepweight/src:llm_lazy_qwen/src:llm_lora_mmap/src:llm_sft/src:llm_sampler/src:llm_pipeline/src${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY=()
FAILED=0

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with timeout min(CAP, what is left of the budget)
step() {
    local name="$1" cap="$2"
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit=$((cap < left - 5 ? cap : left - 5))
    if ((limit < 10)); then
        SUMMARY+=("$(printf '%-22s %-10s %5s s' "$name" "NOT RUN" "-")  (budget spent)")
        FAILED=$((FAILED + 1))
        return
    fi
    echo
    echo "=== $name (timeout ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local dt=$(($(date +%s) - t0))
    local status="PASS"
    if ((rc == 124 || rc == 137)); then
        status="TIMEOUT"
    elif ((rc == 5)); then
        status="NO TESTS"  # pytest: nothing collected
    elif ((rc != 0)); then
        status="FAIL rc=$rc"
    fi
    [[ $status == PASS || $status == "NO TESTS" ]] || FAILED=$((FAILED + 1))
    SUMMARY+=("$(printf '%-22s %-10s %5s s' "$name" "$status" "$dt")")
}

pytest_step() {  # pytest_step NAME CAP FILES...
    local name="$1" cap="$2"
    shift 2
    step "$name" "$cap" $PY -m pytest -x -q -p no:cacheprovider --durations=5 --junitxml="$OUT/junit_$name.xml" "$@"
}

main() {
echo "=== machine"
date -u
if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not available"; fi
$PY - <<'EOF'
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "SMs", p.multi_processor_count)
print("nccl", torch.distributed.is_available() and torch.distributed.is_nccl_available())
print("cpu capability", torch.backends.cpu.get_cpu_capability())
from importlib.metadata import PackageNotFoundError, version
for name in ("transformers", "peft", "accelerate", "safetensors", "tokenizers", "gguf"):
    try:
        print(name, version(name))
    except PackageNotFoundError:
        print(name, "not installed")
EOF
flags=$(grep -m1 -o -w -E 'avx512[a-z0-9_]*|amx[a-z0-9_]*' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "cpu flags avx512*/amx*: ${flags:-none}"
(lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core)') 2>/dev/null

# what only a GPU machine can check first (issue 15 items 18-19), then its CPU's int4 layout (AVX512
# there, which the dev box lacks), the existing CUDA tests, and the layouts the dev box can check too
INT4=benchmarks/device/check_int4_layout.py
pytest_step lazy_cuda_stress 150 tests/llm_lazy_qwen/test_cuda_stress.py
pytest_step sft_nccl 100 tests/llm_sft/test_nccl.py
if [[ -f $INT4 ]]; then
    step int4_layout 40 $PY $INT4
else
    SUMMARY+=("$(printf '%-22s %-10s %5s s' int4_layout "MISSING" "-")  ($INT4)")
fi
pytest_step lazy_cuda_quant 60 tests/llm_lazy_qwen/test_cuda_quant.py
pytest_step lazy_cuda 90 tests/llm_lazy_qwen/test_cuda.py
pytest_step sampler_cuda 60 tests/llm_sampler/test_cuda.py
if [[ -f $INT4 ]]; then
    step int4_layout_avx2 30 env ATEN_CPU_CAPABILITY=avx2 $PY $INT4
    step int4_layout_default 30 env ATEN_CPU_CAPABILITY=default $PY $INT4
fi

echo
echo "=== summary ($(($(date +%s) - START)) s of a ${BUDGET} s budget; log: $LOG)"
printf '%s\n' "${SUMMARY[@]}"
echo "failed steps: $FAILED"
return "$FAILED"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
