#!/bin/bash
# GPU call 3 of session 6: LoRA prefill sweep (16 adapters), LoRA throughput, disaggregation TTFT/ITL.
export PYTHONPATH=$PWD:${PYTHONPATH:-} MINI_INFER_SHARED_MODELS=$PWD/.gpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p $OUT/logs benchmarks/results/h200
START=$(date +%s); BUDGET=${BUDGET:-540}
step() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $left -lt 20 ]; then echo "SKIP $name (no time)" | tee -a $OUT/summary.txt; return; fi
  [ $t -gt $left ] && t=$left
  local s=$(date +%s)
  timeout -k 5 $t "$@" > $OUT/logs/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a $OUT/summary.txt
  tail -15 $OUT/logs/$name.log
}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > $OUT/logs/gpu.txt
step lora_sweep 230 python3 benchmarks/lora_kernels.py --model qwen3-8b --tokens 8192 --adapters 16 --budget-s 150 --output-json benchmarks/results/h200/lora_kernels_qwen3-8b_prefill16.json
step lora_tp 90 python3 benchmarks/lora_throughput.py --model qwen3-8b --output-json benchmarks/results/h200/lora_throughput_qwen3-8b.json
step disagg 220 python3 benchmarks/disagg.py --model llama-3-8b --num-prompts 60 --request-rate 4 --timeout 120 --output-json benchmarks/results/h200/disagg_llama-3-8b.json
tar czf $OUT/call.tgz benchmarks/results/h200 mini_infer/kernels/lora_configs.json $OUT/logs 2>/dev/null
cat $OUT/summary.txt
