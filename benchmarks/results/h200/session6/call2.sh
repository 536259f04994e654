#!/bin/bash
# GPU call 2 of session 6: re-run tests, LoRA prefill sweep + throughput, swap vs recompute, spec self_draft.
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
T="python3 -m pytest -p no:cacheprovider --timeout 120"
step t_quant 45 $T tests/test_quant_kernels.py -k "scaled_mm_fp8 or fp8_rowwise"
step t_structured 60 $T tests/test_structured_outputs.py
step t_lora_server 45 $T tests/test_lora.py -k server
step lora_sweep 140 python3 benchmarks/lora_kernels.py --model qwen3-8b --tokens 8192,2048,16 --budget-s 110 --output-json benchmarks/results/h200/lora_kernels_qwen3-8b_prefill.json
step lora_tp 90 python3 benchmarks/lora_throughput.py --model qwen3-8b --output-json benchmarks/results/h200/lora_throughput_qwen3-8b_prefill_tuned.json
step swap 130 python3 benchmarks/swap_preemption.py --model llama-3-8b --prompt-lens 128,2048 --num-requests 64 --max-tokens 128 --swap-space 24 --repeats 2 --output-json benchmarks/results/h200/swap_preemption_llama-3-8b.json
step self_draft 120 python3 benchmarks/spec_decode.py --model llama-3-8b --parts self_draft --proposer-batch-sizes 1,4,16 --ks 1,3,5 --output-json benchmarks/results/h200/spec_self_draft_llama-3-8b.json
tar czf $OUT/call.tgz benchmarks/results/h200 mini_infer/kernels/lora_configs.json $OUT/logs 2>/dev/null
cat $OUT/summary.txt
