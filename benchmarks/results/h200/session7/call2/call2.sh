#!/bin/bash
# GPU call 2 of session 7: PDL per kernel (Llama-3-8B decode latency), gpt-fast-style baseline in the same
# call, Qwen3-0.6B 256-request throughput with PDL off and on.
export PYTHONPATH=$PWD:${PYTHONPATH:-} MINI_INFER_SHARED_MODELS=$PWD/.gpu HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p $OUT/logs $OUT/ab
START=$(date +%s); BUDGET=${BUDGET:-540}
step() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $left -lt 40 ]; then echo "SKIP $name (no time)" | tee -a $OUT/summary.txt; return; fi
  [ $t -gt $left ] && t=$left
  local s=$(date +%s)
  timeout -k 5 $t "$@" > $OUT/logs/$name.log 2>&1; local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s" | tee -a $OUT/summary.txt
  tail -4 $OUT/logs/$name.log
}
T="python3 -m pytest -p no:cacheprovider --timeout 120"
step t_pdl 100 $T tests/test_pdl.py
lat() { # name env...
  local name=$1; shift
  step lat_$name 120 env "$@" python3 -m mini_infer.cli bench latency --model llama-3-8b --load-format dummy \
    --max-model-len 4096 --batch-sizes 1,2,4,16,64 --input-len 128 --output-len 128 \
    --output-json $OUT/ab/$name.json
}
lat off MINI_INFER_PDL=0
lat all MINI_INFER_PDL=1
lat small MINI_INFER_PDL=norm,rotary,attention,silu
lat skinny MINI_INFER_PDL=skinny
lat all_early MINI_INFER_PDL=1 MINI_INFER_PDL_EARLY=1
lat no_attention MINI_INFER_PDL=norm,rotary,silu,skinny
lat small_early MINI_INFER_PDL=norm,rotary,attention,silu MINI_INFER_PDL_EARLY=1
step compiled 200 python3 benchmarks/compiled_decode.py --model llama-3-8b --batch-sizes 1 --output $OUT/compiled_decode_llama-3-8b
tp() { local name=$1; shift
  step tp_$name 130 env "$@" python3 -m mini_infer.cli bench throughput --model qwen3-0.6b --load-format dummy \
    --max-model-len 4096 --output-json $OUT/ab/throughput_$name.json
}
tp off MINI_INFER_PDL=0
tp all MINI_INFER_PDL=1
python3 - $OUT/ab <<'PY' | tee $OUT/table.txt
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(p.read_text())
    if "results" in d:
        print(p.stem.ljust(14), " ".join(f"b{x['batch_size']}={x['mean_step_ms']:.3f}({100*x['roofline_fraction']:.1f}%)" for x in d["results"]))
    else:
        print(p.stem.ljust(14), " ".join(f"{r['backend']}={r['output_tok_per_s']:.0f}tok/s({100*r['roofline_fraction']:.1f}%)" for r in d["runs"]))
PY
tail -12 $OUT/logs/compiled.log
tar czf $OUT/logs.tgz -C $OUT logs
cat $OUT/summary.txt
