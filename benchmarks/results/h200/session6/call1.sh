#!/bin/bash
# GPU call 1 of session 6: tests of the merged work on CUDA, structured-output overhead, LoRA sweep + throughput.
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
step t_lora_kernels 60 $T tests/test_lora_kernels.py
step t_lora 90 $T tests/test_lora.py
step t_quant 60 $T tests/test_quant_kernels.py -k "scaled_mm_fp8 or fp8_rowwise or w8a8_linear_quantized"
step t_reserve 90 $T tests/test_kv_profiling.py tests/test_spec_decode_graphs.py -k "graph_reserve or graph_outputs or profil"
step t_structured 90 $T tests/test_structured_outputs.py
step structured 130 python3 benchmarks/structured_outputs.py --model qwen3-8b --tokenizer .gpu/bpe151k --output-json benchmarks/results/h200/structured_outputs_qwen3-8b.json
step lora_sweep 130 python3 benchmarks/lora_kernels.py --model qwen3-8b --budget-s 100 --output-json benchmarks/results/h200/lora_kernels_qwen3-8b.json
step lora_tp 200 python3 benchmarks/lora_throughput.py --model qwen3-8b --output-json benchmarks/results/h200/lora_throughput_qwen3-8b.json
tar czf $OUT/call.tgz benchmarks/results/h200 mini_infer/kernels/lora_configs.json $OUT/logs 2>/dev/null
cat $OUT/summary.txt
