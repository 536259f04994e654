#!/bin/bash
# GPU call 4 of session 8: split-K end to end. quant_decode.py (bf16, fp8, int8 at batch 1 and 8) with the
# dispatch table call 3 wrote (split-K on some 8-bit products and o_proj) against the table before it,
# alternated A B A B.
export PYTHONPATH=$PWD:${PYTHONPATH:-} MINI_INFER_SHARED_MODELS=$PWD/.gpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/logs
START=$(date +%s); BUDGET=${BUDGET:-420}
step() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $left -lt 40 ]; then echo "SKIP $name (no time)" | tee -a $R/summary.txt; return; fi
  [ $t -gt $left ] && t=$left
  local s=$(date +%s)
  timeout -k 5 $t "$@" > $R/logs/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a $R/summary.txt
}
cp mini_infer/kernels/gemv_configs.json /tmp/after.json
for i in 1 2; do
  cp /tmp/after.json mini_infer/kernels/gemv_configs.json
  step splitk_$i 100 python3 benchmarks/quant_decode.py --model llama-3-8b --batch-sizes 1,8 --output $R/quant_decode_splitk_$i
  cp .gpu/gemv_configs_before.json mini_infer/kernels/gemv_configs.json
  step nosplit_$i 100 python3 benchmarks/quant_decode.py --model llama-3-8b --batch-sizes 1,8 --output $R/quant_decode_nosplit_$i
done
cp /tmp/after.json mini_infer/kernels/gemv_configs.json
for f in $R/quant_decode_*.md; do echo "== $(basename $f)"; grep "^| [nfi]" $f | cut -d'|' -f2,5,6,8; done | tee $R/table.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
