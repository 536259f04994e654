#!/bin/bash
# GPU call 4 of session 7: what bounds serving at saturation. 1000 requests at once (~200 in / 180 out),
# Llama-3-8B shape, through benchmarks/serve_gpu.sh, with the GIL switch interval and max_num_seqs varied;
# and the engine alone on the same workload (bench throughput).
export PYTHONPATH=$PWD:${PYTHONPATH:-} MINI_INFER_SHARED_MODELS=$PWD/.gpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R/logs
START=$(date +%s); BUDGET=${BUDGET:-480}
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
port=8100
serve() { local name=$1; shift; port=$((port + 1))
  step serve_$name 100 env "$@" PORT=$port OUT=$R/serve_$name BUDGET_S=90 RATES=inf SWEEP_PROMPTS=200 BURST_PROMPTS=1000 \
    bash benchmarks/serve_gpu.sh
}
step offline 90 python3 -m mini_infer.cli bench throughput --model llama-3-8b --load-format dummy --max-model-len 2048 \
  --num-prompts 1000 --input-len 200 --output-len 180 --output-json $R/offline_llama-3-8b_1000x200x180.json
serve base
serve switch1ms MINI_INFER_SWITCH_INTERVAL_MS=1
serve seqs512 SERVE_ARGS="--max-num-seqs 512"
serve switch20ms MINI_INFER_SWITCH_INTERVAL_MS=20
serve base2
python3 - $R <<'PY' | tee $R/table.txt
import json, pathlib, sys
r = pathlib.Path(sys.argv[1])
for p in sorted(r.glob("serve_*/serve_all_at_once.json")):
    d = json.loads(p.read_text())
    print(p.parent.name.ljust(18), f"{d['request_throughput']:.2f} req/s, out {d['output_throughput']:.0f} tok/s, TTFT p50 {d['p50_ttft_ms']:.0f} ms, TPOT p50 {d['p50_tpot_ms']:.2f} ms")
for p in r.glob("offline_*.json"):
    print(p.name, [(x["backend"], round(x["output_tok_per_s"]), x.get("wall_s")) for x in json.loads(p.read_text())["runs"]])
PY
tar czf $OUT/r.tgz -C $OUT r
cat $R/summary.txt
