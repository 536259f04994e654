#!/bin/bash
# GPU call 2 of session 8: (1) multi-LoRA throughput (qwen3-8b, rank 16, 1/4/16 adapters vs base) with the
# default PDL set and with PDL on the LoRA shrink/expand kernels too, plus their GPU tests with it on;
# (2) the full serving sweep (offered 4/8/16/32/inf req/s, then 1000 at once) with httptools + uvloop.
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
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PYTHONPATH
step pytest_lora_pdl 150 env MINI_INFER_PDL=skinny,lora python3 -m pytest -p no:cacheprovider --timeout 120 -q tests/test_lora.py tests/test_pdl.py
step lora_default 130 python3 benchmarks/lora_throughput.py --model qwen3-8b --output-json $R/lora_throughput_default.json
step lora_pdl 130 env MINI_INFER_PDL=skinny,lora python3 benchmarks/lora_throughput.py --model qwen3-8b --output-json $R/lora_throughput_pdl_lora.json
step serve_sweep 230 env PORT=8201 OUT=$R/serve_sweep BUDGET_S=220 bash benchmarks/serve_gpu.sh
python3 - $R <<'PY' | tee $R/table.txt
import json, pathlib, sys
r = pathlib.Path(sys.argv[1])
for p in sorted(r.glob("lora_throughput_*.json")):
    d = json.loads(p.read_text())
    print(p.name, json.dumps(d.get("runs", d))[:600])
PY
tail -12 $R/serve_sweep/bench.log 2>/dev/null | tee -a $R/table.txt
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
