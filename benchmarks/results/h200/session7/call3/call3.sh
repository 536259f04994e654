#!/bin/bash
# GPU call 3 of session 7: the committed PDL default on CUDA (tests, the whole latency curve), serving at
# saturation (benchmarks/serve_gpu.sh), then a profiled Llama-3-8B batch-1 step.
export PYTHONPATH=$PWD:${PYTHONPATH:-} MINI_INFER_SHARED_MODELS=$PWD/.gpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/logs
START=$(date +%s); BUDGET=${BUDGET:-500}
step() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $left -lt 40 ]; then echo "SKIP $name (no time)" | tee -a $R/summary.txt; return; fi
  [ $t -gt $left ] && t=$left
  local s=$(date +%s)
  timeout -k 5 $t "$@" > $R/logs/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a $R/summary.txt
  tail -12 $R/logs/$name.log
}
T="python3 -m pytest -p no:cacheprovider --timeout 120"
step t_pdl 100 $T tests/test_pdl.py
step latency 100 python3 -m mini_infer.cli bench latency --model llama-3-8b --load-format dummy \
    --max-model-len 4096 --batch-sizes 1,2,4,8,16,32,64,128,256 --input-len 128 --output-len 128 \
    --output-json $R/latency_llama-3-8b.json
LEFT=$(( BUDGET - ($(date +%s) - START) - 70 ))
step serve $(( LEFT + 20 )) env OUT=$R/serve BUDGET_S=$LEFT RATES=16,32,inf SWEEP_PROMPTS=200 BURST_PROMPTS=1000 \
    bash benchmarks/serve_gpu.sh
step profile 60 python3 benchmarks/profile_step.py --model llama-3-8b --batch-size 1 --context-len 128 \
    --output-json $R/profile_llama-3-8b_b1.json
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
