#!/usr/bin/env bash
# One prepared GPU check for a lent machine (one H100/H200, under 8 minutes), printing one summary line per
# check as it finishes (also when a check fails or reaches its time limit):
#
#   install          the wheels of scripts/gpu_wheels.sh (TRL, datasets, math-verify...) into a target dir
#   step_paper       a paper-shaped step: fp32 master weights + bf16 autocast, gradient checkpointing (TRL's
#                    default), transformers generation, in-process teacher 3x the student (~0.5B / ~1.5B
#                    Qwen2 shapes), GRPO/OPD/SCOPE over 2 rounds x 2 steps: synchronised phase timings, the
#                    measured wall time beside their sum, SCOPE/GRPO, peak memory
#   step_server      the same with the teacher behind `scope serve-teacher`
#   microbatch       peak CUDA memory of one full-length micro-batch of the 1.5B preset: R1-Distill-Qwen-1.5B's
#                    shape (random weights, 151,936 vocabulary), fp32 weights + AdamW, bf16 autocast, gradient
#                    checkpointing, TRL's fused LM head, 4 rows x 12,600 tokens, forward + backward + step
#   fused_logits     the teacher's fused and logits paths: peak memory and their largest log-prob difference
#   smollm2_shape    the step benchmark on a random model of SmolLM2-135M's shape with its real tokenizer
#
#   bash scripts/gpu_wheels.sh                                     # here: downloads .cache/gpu_wheels (~60 MiB)
#   benchmarks/gpu_check.sh --wheels .cache/gpu_wheels [OUT_DIR]    # there (run(carry=[".cache/gpu_wheels"]))
#   benchmarks/gpu_check.sh --dry-run [OUT_DIR]                     # CPU, tiny shapes: the script end to end
#
# OUT_DIR defaults to $OUT, else ./gpu_check_out; each check's full output is OUT_DIR/<name>.txt and
# OUT_DIR/summary.txt collects the summary lines.
set -uo pipefail

DRY_RUN=0
WHEELS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        *) break ;;
    esac
done
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CHECK_START=$SECONDS

if [[ $DRY_RUN == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; run with --dry-run for the CPU check" >&2
    exit 2
fi

if [[ $DRY_RUN == 1 ]]; then
    STEP_PAPER=(--random-qwen2 tiny --prompts 2 --generations 2 --max-completion-length 8 --rounds 1 --steps-per-round 1 --chunk-groups 1
                --methods "grpo(beta=0),scope(sync),scope(overlap+sampler)")
    STEP_SERVER=()
    MICRO=(--hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 --vocab 4096 --rows 2 --tokens 128)
    FUSED=(--rows 2 --completion-tokens 256)
    SMOL=()
    LIMIT_INSTALL=120 LIMIT_STEP=600 LIMIT_MICRO=300 LIMIT_FUSED=300
else
    STEP_PAPER=(--random-qwen2 0.5b --prompts 4 --generations 8 --max-completion-length 256 --rounds 2 --steps-per-round 2 --chunk-groups 2)
    STEP_SERVER=(--random-qwen2 0.5b --prompts 4 --generations 8 --max-completion-length 256 --rounds 1 --steps-per-round 1 --chunk-groups 2)
    MICRO=(--hidden 1536 --layers 28 --heads 12 --kv-heads 2 --intermediate 8960 --vocab 151936 --rows 4 --tokens 12600)
    FUSED=(--rows 2 --completion-tokens 4096)
    SMOL=(--prompts 4 --generations 4 --max-completion-length 128 --rounds 1 --steps-per-round 1)
    LIMIT_INSTALL=60 LIMIT_STEP=130 LIMIT_MICRO=60 LIMIT_FUSED=50
fi

status=0
: >"$OUT_DIR/summary.txt"
say() { echo "$*" | tee -a "$OUT_DIR/summary.txt"; }

run() {  # run NAME LIMIT_SECONDS SUMMARY_PATTERN COMMAND...: one summary line when it ends, however it ends
    local name="$1" limit="$2" pattern="$3"
    shift 3
    local start=$SECONDS rc=0
    if [[ "$(type -t "$1")" == function ]]; then  # timeout runs programs: a shell function goes through bash
        timeout "$limit" bash -c '"$@"' _ "$@" >"$OUT_DIR/$name.txt" 2>&1 || rc=$?
    else
        timeout "$limit" "$@" >"$OUT_DIR/$name.txt" 2>&1 || rc=$?
    fi
    local took=$((SECONDS - start))
    if [[ $rc == 0 ]]; then
        say "$name: ok (${took} s) $(grep -E "$pattern" "$OUT_DIR/$name.txt" | tr '\n' ' ' | tr -s ' ')"
    else
        status=1
        local why="exit $rc"
        [[ $rc == 124 ]] && why="TIMEOUT after ${limit} s"
        say "$name: FAILED ($why) last line: $(grep -v '^\s*$' "$OUT_DIR/$name.txt" | tail -n 1 | cut -c1-300)"
    fi
}

say "gpu_check $( [[ $DRY_RUN == 1 ]] && echo '--dry-run (CPU, tiny shapes)' ) $("$PY" -c "import torch, transformers; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')")"

# -- install: only the wheels whose distribution is missing (what is there stays in charge)
SITE="$OUT_DIR/site"
if [[ -n "$WHEELS" ]]; then
    install_missing() {
        local missing=()
        for wheel in "$WHEELS"/*.whl; do
            local dist
            dist="$(basename "$wheel" | cut -d- -f1)"
            "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null || missing+=("$wheel")
        done
        echo "installing ${#missing[@]} wheel(s): ${missing[*]##*/}"
        if [[ ${#missing[@]} -gt 0 ]]; then
            "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${missing[@]}" || return 1
        fi
        PYTHONPATH="$SITE:$ROOT/src" "$PY" -c "import trl, datasets, math_verify, scope_opd.trainer; print('imports ok: trl', trl.__version__, 'datasets', datasets.__version__)"
    }
    export -f install_missing
    export WHEELS SITE ROOT PY
    run install "$LIMIT_INSTALL" "installing|imports ok" install_missing
else
    say "install: skipped (no --wheels DIR; using the packages already importable)"
fi
export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

STEP_PATTERN="^(peak memory|measured wall time|SCOPE/GRPO step ratio)"
run step_paper "$LIMIT_STEP" "$STEP_PATTERN" "$PY" "$HERE/bench_step.py" "${STEP_PAPER[@]}" --teacher in-process
if [[ ${#STEP_SERVER[@]} -gt 0 ]]; then
    run step_server "$LIMIT_STEP" "$STEP_PATTERN" "$PY" "$HERE/bench_step.py" "${STEP_SERVER[@]}" --teacher server
else
    say "step_server: skipped in --dry-run (keeps the CPU run short; the server path is the same script)"
fi

microbatch() {
    "$PY" - "$@" <<'PYEOF'
import argparse, time
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.trainer.utils import add_fused_lm_head

p = argparse.ArgumentParser()
for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab", "rows", "tokens"):
    p.add_argument(f"--{name}", type=int)
a = p.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
config = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                     num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate, max_position_embeddings=a.tokens + 8,
                     tie_word_embeddings=False)
torch.manual_seed(0)
model = Qwen2ForCausalLM(config).to(device)  # float32: the optimiser's master weights
model.gradient_checkpointing_enable()
model.config.use_cache = False
add_fused_lm_head(model, temperature=0.6)
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
ids = torch.randint(0, a.vocab, (a.rows, a.tokens), device=device)
labels = torch.roll(ids, -1, dims=1)
labels[:, : a.tokens // 40] = -100  # the prompt
for step in range(2):  # the second step has Adam's states allocated, as every step after the first
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(input_ids=ids, shift_labels=labels, fused_lm_head=True)
    loss = -(out.log_probs * (labels != -100)).sum() / (labels != -100).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
params = sum(p.numel() for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()} | {str(t.dtype) for s in optimizer.state.values() for t in s.values() if t.dim()})
peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
print(f"params {params / 1e9:.3f}B, weights/grads/Adam {params * 16 / 2**30:.1f} GiB (fp32), states {dtypes}")
print(f"micro-batch {a.rows} rows x {a.tokens} tokens: peak CUDA memory {peak:.1f} GiB (activations + logits ~{peak - params * 16 / 2**30:.1f} GiB), {seconds:.1f} s/step")
PYEOF
}
export -f microbatch
export PY
run microbatch "$LIMIT_MICRO" "^micro-batch|^params" microbatch "${MICRO[@]}"

run fused_logits "$LIMIT_FUSED" "^max \|fused|^teacher peak" "$PY" "$HERE/bench_teacher_memory.py" "${FUSED[@]}"

SHAPE="${WHEELS:-/nonexistent}/smollm2-shape"
if [[ ${#SMOL[@]} -gt 0 && -f "$SHAPE/config.json" ]]; then
    run smollm2_shape "$LIMIT_STEP" "$STEP_PATTERN" "$PY" "$HERE/bench_step.py" --random-like "$SHAPE" "${SMOL[@]}" --teacher in-process
else
    say "smollm2_shape: skipped ($( [[ $DRY_RUN == 1 ]] && echo 'dry run' || echo "no $SHAPE: run scripts/gpu_wheels.sh after scripts/smollm2.sh" ))"
fi

say "not checked here: vLLM colocate and sleep mode (vLLM's CUDA wheel is far over the 64 MiB a call carries); DDP, ZeRO-2/3 and FSDP (one GPU, no DeepSpeed; the ZeRO load runs on CPU in tests/test_gpu_paths.py); the overlap thread on rank >= 1 (one GPU); the real SmolLM2 weights (538 MB); the 7B/8B teachers' memory (random 1.5B-shaped teacher at most)"
say "gpu_check: done in $((SECONDS - CHECK_START)) s, outputs in $OUT_DIR (exit $status)"
exit $status
