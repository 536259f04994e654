#!/bin/bash
# GPU call 1 of session 7: PDL on CUDA (tests), then Llama-3-8B decode latency A/B over PDL settings.
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
  tail -6 $OUT/logs/$name.log
}
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv > $OUT/logs/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> $OUT/logs/gpu.txt
T="python3 -m pytest -p no:cacheprovider --timeout 120"
step t_pdl 150 $T tests/test_pdl.py tests/test_skinny_mm.py
lat() { # name env...
  local name=$1; shift
  step lat_$name 150 env "$@" python3 -m mini_infer.cli bench latency --model llama-3-8b --load-format dummy \
    --max-model-len 4096 --batch-sizes 1,2,4,16,64 --input-len 128 --output-len 128 \
    --output-json $OUT/ab/$name.json
}
lat off1 MINI_INFER_PDL=0
lat pf1024_1 MINI_INFER_PDL=1
lat pf0_1 MINI_INFER_PDL=1 MINI_INFER_PDL_PREFETCH=0
lat off2 MINI_INFER_PDL=0
lat pf1024_2 MINI_INFER_PDL=1
lat pf4096_1 MINI_INFER_PDL=1 MINI_INFER_PDL_PREFETCH=4096
step t_kernels 100 $T tests/test_kernels.py -x -q
python3 - $OUT/ab <<'PY' | tee $OUT/table.txt
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(p.read_text())["results"]
    print(p.stem.ljust(10), " ".join(f"b{x['batch_size']}={x['mean_step_ms']:.3f}({100*x['roofline_fraction']:.1f}%)" for x in r))
PY
cat $OUT/summary.txt
