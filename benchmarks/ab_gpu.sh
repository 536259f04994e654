#!/usr/bin/env bash
# Before/after on one GPU in one call: the engine's decode latency (Llama-3-8B, batch 1..256) and its
# 256-request throughput (Qwen3-0.6B), for several checkouts of the engine (TREES: NAME:FOLDER pairs, each
# folder holding a mini_infer/), alternating ROUNDS times; JSON under $OUT/NAME-ROUND, a table last. The
# commands are engine_gpu.sh's latency and mini-infer throughput steps, without transformers. Each runs in
# its tree's folder: `python -m` puts the working directory first on sys.path.
#
#   TREES="before:.gpu/before after:." OUT=/tmp/ab ROUNDS=1 WHAT=latency,throughput [BATCHES=1,2,4] \
#       bash benchmarks/ab_gpu.sh
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:?}" ROUNDS="${ROUNDS:-1}" WHAT="${WHAT:-latency,throughput}" TREES="${TREES:?NAME:FOLDER pairs}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
COMMON=(--load-format dummy --max-model-len 4096)
for round in $(seq 1 "$ROUNDS"); do
    for tree in $TREES; do
        name=${tree%%:*} src="$(cd "$REPO" && cd "${tree#*:}" && pwd)"
        dir="$OUT/$name-$round"
        mkdir -p "$dir"
        if [[ ",$WHAT," == *,latency,* ]]; then
            (cd "$src" && PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$PY" -m mini_infer.cli bench latency \
                --model llama-3-8b "${COMMON[@]}" --batch-sizes "${BATCHES:-1,2,4,8,16,32,64,128,256}" \
                --input-len 128 --output-len 128 --output-json "$dir/latency_llama-3-8b.json" >"$dir/latency.log" 2>&1) \
                || tail -n 20 "$dir/latency.log"
        fi
        if [[ ",$WHAT," == *,throughput,* ]]; then
            (cd "$src" && PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" timeout 300 "$PY" -m mini_infer.cli bench throughput \
                --model qwen3-0.6b "${COMMON[@]}" --output-json "$dir/throughput_qwen3-0.6b.json" \
                >"$dir/throughput.log" 2>&1) || tail -n 20 "$dir/throughput.log"
        fi
        (cd "$src" && "$PY" -c "import sys, mini_infer; print(sys.argv[1], 'ran', mini_infer.__file__)" "$name")
    done
done
"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    row = [run.name]
    lat = run / "latency_llama-3-8b.json"
    if lat.exists():
        for r in json.loads(lat.read_text())["results"]:
            row.append(f"b{r['batch_size']}={r['mean_step_ms']:.3f}ms({100 * r['roofline_fraction']:.1f}%)")
    tp = run / "throughput_qwen3-0.6b.json"
    if tp.exists():
        for r in json.loads(tp.read_text())["runs"]:
            row.append(f"{r['backend']}={r['output_tok_per_s']:.0f}tok/s({100 * r['roofline_fraction']:.1f}%)")
    print(" ".join(row))
PYEOF
