#!/bin/bash
# GPU call 3 of session 8: split-K for the few-row products (kernels/skinny_mm.py). The skinny tests on the GPU
# (atomics on real hardware), a batch-1 sweep of Llama-3-8B's products in bf16 / fp8 / int8 with the split-K
# tiles added (writes the dispatch table), the PDL graph tests with the new table, then W8A8 decode at
# batch 1 and 8 against bf16 (quant_decode.py) on it.
export PYTHONPATH=$PWD:${PYTHONPATH:-} MINI_INFER_SHARED_MODELS=$PWD/.gpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/logs
START=$(date +%s); BUDGET=${BUDGET:-560}
step() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $left -lt 50 ]; then echo "SKIP $name (no time)" | tee -a $R/summary.txt; return; fi
  [ $t -gt $left ] && t=$left
  local s=$(date +%s)
  timeout -k 5 $t "$@" > $R/logs/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a $R/summary.txt
  tail -4 $R/logs/$name.log
}
step pytest_skinny 90 python3 -m pytest -p no:cacheprovider --timeout 80 -q tests/test_skinny_mm.py
cp mini_infer/kernels/gemv_configs.json $R/gemv_configs_before.json
step sweep 260 python3 benchmarks/gemv_sweep.py --models llama-3-8b --rows 1 --dtypes bfloat16,float8_e4m3fn,int8 \
  --budget-s 200 --results $R/gemv_sweep_splitk_rows1
cp mini_infer/kernels/gemv_configs.json $R/gemv_configs_after.json
step pytest_pdl 90 python3 -m pytest -p no:cacheprovider --timeout 80 -q tests/test_pdl.py tests/test_skinny_mm.py
step quant_decode 150 python3 benchmarks/quant_decode.py --model llama-3-8b --batch-sizes 1,8 --output $R/quant_decode_llama-3-8b_splitk
cat $R/gemv_sweep_splitk_rows1.md | tee $R/table.txt
cat $R/quant_decode_llama-3-8b_splitk.md 2>/dev/null | grep "|" | tee -a $R/table.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
