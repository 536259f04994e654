#!/usr/bin/env bash
# Issue 4's engine benchmarks on one GPU, within BUDGET_S seconds: JSON, logs and PNG plots under $OUT,
# then a short markdown table. Every model is an architecture preset with dummy bf16 weights, so
# nothing is downloaded. Each step has its own timeout and writes its JSON as runs complete, so a
# step that runs out of time still leaves what it finished.
#
#   OUT=/some/dir bash benchmarks/engine_gpu.sh       # BUDGET_S (default 560) bounds the whole run
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/engine_gpu.sh   # the same plumbing on a CPU, tiny model
#
# Steps (timeouts in seconds; the heaviest last, so a budget overrun costs the least):
#   1. latency   Llama-3-8B: decode step time, tok/s, GB/s and % HBM at batch 1..256   (120)
#   2. throughput Qwen3-0.6B: 256 nano-vllm requests, with async scheduling and without (sync);
#      transformers generate_batch's continuous batching and padded static generate on the first 8
#      of them, mini-infer rerun on those 8 (240)
#   3. static vs continuous, Qwen3-0.6B: the same 256 requests, max_num_seqs 64; also with
#      prefill steps run eagerly (no prefill CUDA graphs)                                  (150)
#   4. throughput Llama-3-8B: 256 requests, and transformers generate_batch on the same 256, stopped
#      after HF_LIMIT_S (default 460; it took 314 s on an H100), which would make the ratio a lower
#      bound; this step alone needs a call of its own: STEPS=throughput_large BUDGET_S=595      (570)
# With all 256 requests in one batch (max_num_seqs 256) static and continuous batching schedule the
# same steps, so step 3 caps the batch at 64: four static waves, each waiting for its longest request.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/benchmarks/results/local}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET_S="${BUDGET_S:-560}"
START=$(date +%s)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
BENCH=("$PY" -m mini_infer.cli bench)
COMMON=(--load-format dummy --max-model-len 4096)
SMALL=qwen3-0.6b LARGE=llama-3-8b
BATCHES=1,2,4,8,16,32,64,128,256 LAT_LEN=(--input-len 128 --output-len 128)
WORK=() HF_SMALL=8 HF_LIMIT_S="${HF_LIMIT_S:-460}" STATIC_SEQS=64
if [[ "${SMOKE:-0}" == 1 ]]; then  # plumbing check on a CPU: tiny model, tiny workload
    SMALL=tiny-llama LARGE=tiny-llama BATCHES=1,2,4 LAT_LEN=(--input-len 16 --output-len 8)
    WORK=(--num-prompts 8 --min-input-len 8 --max-input-len 32 --min-output-len 4 --max-output-len 16)
    HF_SMALL=4 HF_LIMIT_S=120 STATIC_SEQS=2 COMMON=(--load-format dummy --max-model-len 256)
fi
declare -a SUMMARY=()

# step NAME CAP_SECONDS COMMAND...: runs with min(cap, what is left of the budget less 20 s for the report)
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START) - 20))
    local limit=$((cap < left ? cap : left))
    if ((limit < 30)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee "$OUT/$name.log"
        SUMMARY+=("$name: skipped (out of time)")
        return
    fi
    echo "== $name (timeout ${limit}s): $*"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$? took=$(($(date +%s) - t0))
    tail -n 25 "$OUT/$name.log"
    if ((rc == 124 || rc == 137)); then
        SUMMARY+=("$name: TIMED OUT after ${took}s (partial JSON kept)")
    else
        SUMMARY+=("$name: exit $rc in ${took}s")
    fi
}

{
    echo "== environment"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)"
    git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/environment.txt"

# STEPS=latency,throughput_small,static,throughput_large picks steps (default: all)
want() { [[ -z "${STEPS:-}" || ",$STEPS," == *",$1,"* ]]; }

want latency && step "latency_$LARGE" 120 "${BENCH[@]}" latency --model "$LARGE" "${COMMON[@]}" \
    --batch-sizes "$BATCHES" "${LAT_LEN[@]}" --output-json "$OUT/latency_$LARGE.json"

want throughput_small && step "throughput_$SMALL" 240 "${BENCH[@]}" throughput --model "$SMALL" "${COMMON[@]}" "${WORK[@]}" \
    --compare sync,hf,hf-static --hf-num-prompts "$HF_SMALL" --output-json "$OUT/throughput_$SMALL.json" \
    --step-log "$OUT/steps_$SMALL.json"

want static && step "static_vs_continuous_$SMALL" 150 "${BENCH[@]}" throughput --model "$SMALL" "${COMMON[@]}" "${WORK[@]}" \
    --max-num-seqs "$STATIC_SEQS" --compare static,eager-prefill --output-json "$OUT/static_vs_continuous_$SMALL.json"

want throughput_large && step "throughput_$LARGE" 570 "${BENCH[@]}" throughput --model "$LARGE" "${COMMON[@]}" "${WORK[@]}" \
    --compare hf --hf-time-limit "$HF_LIMIT_S" --output-json "$OUT/throughput_$LARGE.json"

echo "== plots"
"$PY" -m mini_infer.bench.plots --out-dir "$OUT" \
    --latency $(ls "$OUT"/latency_*.json 2>/dev/null) \
    --throughput $(ls "$OUT"/throughput_*.json "$OUT"/static_vs_*.json 2>/dev/null) >"$OUT/plots.log" 2>&1 \
    && cat "$OUT/plots.log" || tail -n 5 "$OUT/plots.log"

"$PY" -m mini_infer.bench.report "$OUT" >"$OUT/summary.md" 2>&1
echo
echo "== steps ($(($(date +%s) - START))s in all)"
printf '%s\n' "${SUMMARY[@]}"
echo
cat "$OUT/summary.md"

# the device tool returns at most 8 files: keep JSON, PNG and the summary loose, pack the logs
(cd "$OUT" && tar czf logs.tar.gz ./*.log environment.txt && rm -f ./*.log environment.txt)
