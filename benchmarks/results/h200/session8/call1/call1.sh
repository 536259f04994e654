#!/bin/bash
# GPU call 1 of session 8: serving at saturation with httptools (C HTTP parser) and uvloop, against
# httptools with asyncio's loop. 1000 requests at once (~200 in / 180 out), Llama-3-8B shape,
# benchmarks/serve_gpu.sh; three servers with uvloop, one without.
export PYTHONPATH=$PWD:${PYTHONPATH:-} MINI_INFER_SHARED_MODELS=$PWD/.gpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/logs
START=$(date +%s); BUDGET=${BUDGET:-540}
step() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $left -lt 50 ]; then echo "SKIP $name (no time)" | tee -a $R/summary.txt; return; fi
  [ $t -gt $left ] && t=$left
  local s=$(date +%s)
  timeout -k 5 $t "$@" > $R/logs/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a $R/summary.txt
  tail -5 $R/logs/$name.log
}
# the wheels once, into /tmp/site (serve_gpu.sh then finds fastapi and installs nothing)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PYTHONPATH
port=8100
serve() { local name=$1; shift; port=$((port + 1))
  step serve_$name 110 env "$@" PORT=$port OUT=$R/serve_$name BUDGET_S=100 RATES=inf SWEEP_PROMPTS=200 BURST_PROMPTS=1000 \
    bash benchmarks/serve_gpu.sh
}
serve uvloop1
serve uvloop2
mv /tmp/site/uvloop /tmp/uvloop_off
serve asyncio1
mv /tmp/uvloop_off /tmp/site/uvloop
serve uvloop3
python3 - $R <<'PY' | tee $R/table.txt
import json, pathlib, sys
r = pathlib.Path(sys.argv[1])
for p in sorted(r.glob("serve_*/serve_all_at_once.json")):
    d = json.loads(p.read_text())
    print(p.parent.name.ljust(18), f"{d['request_throughput']:.2f} req/s, out {d['output_throughput']:.0f} tok/s, TTFT p50 {d['p50_ttft_ms']:.0f} ms, TPOT p50 {d['p50_tpot_ms']:.2f} ms")
PY
grep -h "http parser" $R/logs/serve_*.log | sort | uniq -c
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
