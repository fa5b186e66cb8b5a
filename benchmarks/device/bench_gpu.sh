#!/usr/bin/env bash
# Issue 16's first GPU measurement (benchmarks/bench_gpu.py) in one call of the device tool:
#
#   run(command="bash benchmarks/device/bench_gpu.sh", timeout_s=420)
#
# Builds the Qwen2.5-7B-shaped model on the machine's disk (nothing large travels), then measures; the
# Python script has a hard budget (BENCH_GPU_BUDGET_S, default 330 s) and always prints its table.
# Extra arguments go to bench_gpu.py (e.g. `--engines vram,bf16_p1,int4_p1`, `--layers 8`, `--tiny`).
# What comes back in $OUT: bench_gpu.txt (the report), bench_gpu.json, bench_gpu_children.log (the
# engines' stderr), bench_gpu_log.txt (everything printed). The model folders are kept on the machine
# (--keep), so a second call on the same warm machine skips the build.
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/bench_gpu_out}"
export OUT
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${BENCH_GPU_BUDGET_S:-330}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="llm_sepweight/src:llm_lazy_qwen/src:llm_lora_mmap/src:llm_sft/src:llm_sampler/src:llm_pipeline/src${PYTHONPATH:+:$PYTHONPATH}"

main() {
    echo "=== machine"
    date -u
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max --format=csv
    else
        echo "nvidia-smi: not available"
    fi
    # the model's three folders take ~29 GB: the first place with room (the page cache keeps them warm)
    WORK=""
    for d in "${BENCH_GPU_WORK_ROOT:-}" /tmp /var/tmp /root "$PWD/.."; do
        [[ -n $d && -d $d && -w $d ]] || continue
        free=$(df -P --block-size=1G "$d" | awk 'NR==2 {print $4}')
        echo "free in $d: ${free} GiB"
        if ((free >= 34)); then
            WORK="$d/bench_gpu_work"
            break
        fi
    done
    if [[ -z $WORK ]]; then
        WORK=/tmp/bench_gpu_work
        echo "no place with 34 GiB free: using $WORK; pass --layers 8 if the build runs out of room"
    fi
    echo "work: $WORK; budget ${BUDGET} s"
    timeout --kill-after=10 $((BUDGET + 45)) $PY benchmarks/bench_gpu.py --budget-s "$BUDGET" --work "$WORK" --keep "$@"
    local rc=$?
    ((rc == 124 || rc == 137)) && echo "bench_gpu.py was killed at its outer timeout ($((BUDGET + 45)) s)"
    return $rc
}

main "$@" 2>&1 | tee "$OUT/bench_gpu_log.txt"
exit "${PIPESTATUS[0]}"
