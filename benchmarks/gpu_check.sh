#!/usr/bin/env bash
# One prepared GPU check (one H100/H200, under 8 minutes): the step benchmark in bf16 on CUDA with
# random-init Qwen2 shapes (~0.5B student, ~1.5B teacher), in-process and server teacher, then the
# teacher memory comparison (fused vs logits) at the paper's scale. Same scripts and code paths as
# the CPU runs; the GPU only changes the device and dtype they pick.
#
#   benchmarks/gpu_check.sh [OUT_DIR]            # OUT_DIR defaults to $OUT, else ./gpu_check_out
#   benchmarks/gpu_check.sh --dry-run [OUT_DIR]  # CPU, tiny shapes: checks the script end to end anywhere
#
# Each run writes its full output to OUT_DIR/<name>.txt; OUT_DIR/summary.txt collects the last lines.
# Random-init students never emit EOS, so every row runs to the length limit: the overlapped SCOPE
# uses --chunk-groups (chunked generation) here, the mode that also serves vLLM.
set -uo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; run with --dry-run for the CPU check" >&2
    exit 2
fi

if [[ $DRY_RUN == 1 ]]; then
    STEP_ARGS=(--random-qwen2 tiny --prompts 2 --generations 2 --max-completion-length 8 --rounds 1 --steps-per-round 1 --chunk-groups 1)
    MEMORY_RUNS=("default:--rows 2 --completion-tokens 256")
    STEP_LIMIT=900
    MEMORY_LIMIT=600
else
    STEP_ARGS=(--random-qwen2 0.5b --prompts 4 --generations 8 --max-completion-length 128 --rounds 1 --steps-per-round 1 --chunk-groups 2)
    # The issue's 2 x 4,096 tokens, then the paper preset's teacher_batch_size 8 x 12,288 (~28 GiB of bf16 logits).
    MEMORY_RUNS=("default:--rows 2 --completion-tokens 4096" "paper:--rows 8 --completion-tokens 12288 --hidden 896")
    STEP_LIMIT=140
    MEMORY_LIMIT=90
fi

status=0
run() {  # run NAME LIMIT_SECONDS COMMAND...
    local name="$1" limit="$2"
    shift 2
    echo "== $name: $*" | tee -a "$OUT_DIR/summary.txt"
    local start=$SECONDS
    if timeout "$limit" "$@" >"$OUT_DIR/$name.txt" 2>&1; then
        tail -n 1 "$OUT_DIR/$name.txt" | tee -a "$OUT_DIR/summary.txt"
    else
        local rc=$?
        status=1
        echo "FAILED (exit $rc; last lines below, full output in $name.txt)" | tee -a "$OUT_DIR/summary.txt"
        tail -n 5 "$OUT_DIR/$name.txt" | tee -a "$OUT_DIR/summary.txt"
    fi
    echo "($((SECONDS - start)) s)" | tee -a "$OUT_DIR/summary.txt"
}

: >"$OUT_DIR/summary.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$OUT_DIR/summary.txt"
run bench_step_in_process "$STEP_LIMIT" "$PY" "$HERE/bench_step.py" "${STEP_ARGS[@]}" --teacher in-process
run bench_step_server "$STEP_LIMIT" "$PY" "$HERE/bench_step.py" "${STEP_ARGS[@]}" --teacher server
for spec in "${MEMORY_RUNS[@]}"; do
    # shellcheck disable=SC2086  # the spec's flags are meant to split
    run "teacher_memory_${spec%%:*}" "$MEMORY_LIMIT" "$PY" "$HERE/bench_teacher_memory.py" ${spec#*:}
done
echo "gpu_check: outputs in $OUT_DIR (exit $status)"
exit $status
